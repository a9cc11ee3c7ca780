"""DADF anomaly map.

Per scale, the log-likelihood of each position is ``-0.5 * mean_c(z^2)``; the map is the negative
probability, bilinearly upsampled to the input size and averaged over scales. That is exactly
FastFlow's flow map, so anomalib's generator is reused rather than re-written.
"""

from anomalib.models.image.fastflow.anomaly_map import AnomalyMapGenerator

__all__ = ["AnomalyMapGenerator"]
