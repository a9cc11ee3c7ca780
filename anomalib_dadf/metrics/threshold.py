"""A threshold that needs no defective images: the score that flags a chosen share of normal ones.

anomalib's :class:`~anomalib.metrics.F1AdaptiveThreshold` needs anomalous validation images; without
them it falls back to an extreme score. Factories usually start with good images only, and what they
can state is how many false alarms they accept: this threshold flags at most ``false_positive_rate``
of the normal validation scores (images for ``pred_score``, pixels for ``anomaly_map``).

Example:
    >>> import torch
    >>> from anomalib.data import ImageBatch
    >>> from anomalib_dadf.metrics import FalsePositiveRateThreshold
    >>> threshold = FalsePositiveRateThreshold(false_positive_rate=0.1, fields=["pred_score", "gt_label"])
    >>> threshold.update(ImageBatch(image=torch.rand(10, 3, 8, 8), pred_score=torch.arange(10.0),
    ...                             gt_label=torch.zeros(10, dtype=torch.long)))
    >>> float(threshold.compute())  # 1 of the 10 normal scores lies above it
    8.0
"""

import math

import torch
from anomalib.metrics import AnomalibMetric
from anomalib.metrics.threshold import Threshold
from torchmetrics.utilities.data import dim_zero_cat


class _FalsePositiveRateThreshold(Threshold):
    """Threshold at the ``1 - false_positive_rate`` quantile of the scores of normal samples.

    Args:
        false_positive_rate: Largest share of normal scores above the threshold, in ``[0, 1)``.
        kwargs: Passed to :class:`torchmetrics.Metric`.

    Raises:
        ValueError: ``false_positive_rate`` outside ``[0, 1)``.
    """

    full_state_update = False

    def __init__(self, false_positive_rate: float = 0.01, **kwargs) -> None:
        super().__init__(**kwargs)
        if not 0 <= false_positive_rate < 1:
            msg = f"false_positive_rate must be in [0, 1), got {false_positive_rate}: e.g. 0.01 flags 1 % of normal images."
            raise ValueError(msg)
        self.false_positive_rate = false_positive_rate
        self.add_state("normal_scores", default=[], dist_reduce_fx="cat")

    def update(self, preds: torch.Tensor, labels: torch.Tensor) -> None:
        """Keep the scores of the normal samples (label 0) of a batch.

        Args:
            preds: Image scores ``(B,)`` or anomaly maps ``(B, ...)``: every pixel of a normal image counts.
            labels: Image labels ``(B,)``.
        """
        normal = labels.reshape(-1) == 0
        self.normal_scores.append(preds.reshape(labels.numel(), -1)[normal].reshape(-1).detach().float())

    def compute(self) -> torch.Tensor:
        """The smallest score that leaves at most ``false_positive_rate`` of the normal scores above it.

        Raises:
            ValueError: No normal sample was seen.
        """
        scores = dim_zero_cat(self.normal_scores) if self.normal_scores else torch.empty(0)
        if scores.numel() == 0:
            msg = "No normal validation sample: a false-positive-rate threshold is set on normal images."
            raise ValueError(msg)
        rank = max(1, math.ceil((1 - self.false_positive_rate) * scores.numel()))
        # kthvalue, unlike torch.quantile, takes the millions of pixel scores of a validation set.
        return torch.kthvalue(scores, rank).values


class FalsePositiveRateThreshold(AnomalibMetric, _FalsePositiveRateThreshold):  # type: ignore[misc]
    """:class:`_FalsePositiveRateThreshold` updated from anomalib batches (``fields``: scores, then labels)."""
