"""DADF anomaly map: the flows' per-position likelihood, upsampled to the input size and averaged over scales.

Per scale, the log-likelihood of each position is ``-0.5 * mean_c(z^2)``. The paper's map (``"probability"``)
is the negative probability ``-exp(log-likelihood)``: exactly FastFlow's flow map, so anomalib's generator
is reused for it. It saturates at 0 wherever a scale is confident that a position is anomalous, so one
scale's strong evidence counts at most a third. ``"log_likelihood"`` maps the negative log-likelihood
itself, unbounded, so a defect that only the finest scale sees (a hairline crack) can dominate the score.

Example:
    >>> import torch
    >>> from anomalib_dadf.anomaly_map import AnomalyMapGenerator
    >>> latents = [torch.zeros(1, 8, 16, 16), torch.full((1, 8, 8, 8), 10.0)]
    >>> AnomalyMapGenerator((32, 32))(latents).amax().item() > -1
    True
    >>> AnomalyMapGenerator((32, 32), kind="log_likelihood")(latents).amax().item()
    25.0
"""

import torch
from anomalib.models.image.fastflow.anomaly_map import AnomalyMapGenerator as ProbabilityMapGenerator
from torch.nn import functional as F  # noqa: N812

ANOMALY_MAPS = ("probability", "log_likelihood")


class AnomalyMapGenerator(ProbabilityMapGenerator):
    """FastFlow's map generator, or the negative log-likelihood map (see the module docstring).

    Args:
        input_size: Height and width of the map.
        kind: ``"probability"`` (the paper's and FastFlow's) or ``"log_likelihood"``.

    Raises:
        ValueError: Unknown ``kind``.
    """

    def __init__(self, input_size: tuple[int, int], kind: str = "probability") -> None:
        super().__init__(input_size=input_size)
        if kind not in ANOMALY_MAPS:
            msg = f"Unknown anomaly map '{kind}': choose one of {list(ANOMALY_MAPS)}."
            raise ValueError(msg)
        self.kind = kind

    def forward(self, hidden_variables: list[torch.Tensor]) -> torch.Tensor:
        """Anomaly map ``(N, 1, H, W)`` of the flows' latents, one ``(N, C, h, w)`` tensor per scale."""
        if self.kind == "probability":
            return super().forward(hidden_variables)
        maps = [
            F.interpolate(0.5 * torch.mean(latent**2, dim=1, keepdim=True), size=self.input_size, mode="bilinear")
            for latent in hidden_variables
        ]
        return torch.stack(maps, dim=-1).mean(dim=-1)
