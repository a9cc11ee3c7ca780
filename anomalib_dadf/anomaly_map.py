"""DADF anomaly map: the flows' per-position likelihood, upsampled to the input size and averaged over scales.

Per scale, the log-likelihood of each position is ``-0.5 * mean_c(z^2)``. The paper's map (``"probability"``)
is the negative probability ``-exp(log-likelihood)``: exactly FastFlow's flow map, so anomalib's generator
is reused for it. It saturates at 0 wherever a scale is confident that a position is anomalous, so one
scale's strong evidence counts at most a third. ``"log_likelihood"`` maps the negative log-likelihood
itself, unbounded, so a defect that only the finest scale sees (a hairline crack) can dominate the score.

Both leave out the log-determinant of the flows' Jacobian, which the likelihood of a feature counts: where the
flow contracts, a feature lands near the latent's origin and looks normal, though its density is low. ``"density"``
is the paper's map with it put back: per scale ``-exp(log p / C)``, with ``log p`` the exact log-density of the
``C`` layer-normalised features at each position (``-0.5 * sum_c(z^2)`` plus the log-determinant of the flow and of
the norm's affine weights at that position), as CFLOW and MSFlow score.

Example:
    >>> import torch
    >>> from anomalib_dadf.anomaly_map import AnomalyMapGenerator
    >>> latents = [torch.zeros(1, 8, 16, 16), torch.full((1, 8, 8, 8), 10.0)]
    >>> AnomalyMapGenerator((32, 32))(latents).amax().item() > -1
    True
    >>> AnomalyMapGenerator((32, 32), kind="log_likelihood")(latents).amax().item()
    25.0
    >>> log_jacobians = [torch.full((1, 16, 16), 8.0), torch.zeros(1, 8, 8)]  # per position, each scale
    >>> density_map = AnomalyMapGenerator((32, 32), kind="density")(latents, log_jacobians)
    >>> round(density_map[0, 0, 0, 0].item(), 4)  # -(e + exp(-50)) / 2: the first scale's Jacobian raises its density
    -1.3591
"""

import torch
from anomalib.models.image.fastflow.anomaly_map import AnomalyMapGenerator as ProbabilityMapGenerator
from torch.nn import functional as F  # noqa: N812

ANOMALY_MAPS = ("probability", "log_likelihood", "density")


class AnomalyMapGenerator(ProbabilityMapGenerator):
    """FastFlow's map generator, the negative log-likelihood map or the density map (see the module docstring).

    Args:
        input_size: Height and width of the map.
        kind: ``"probability"`` (the paper's and FastFlow's), ``"log_likelihood"`` or ``"density"``.

    Raises:
        ValueError: Unknown ``kind``.
    """

    def __init__(self, input_size: tuple[int, int], kind: str = "probability") -> None:
        super().__init__(input_size=input_size)
        if kind not in ANOMALY_MAPS:
            msg = f"Unknown anomaly map '{kind}': choose one of {list(ANOMALY_MAPS)}."
            raise ValueError(msg)
        self.kind = kind

    @property
    def uses_log_jacobians(self) -> bool:
        """Whether the map needs the log-determinants per position (only ``"density"`` does)."""
        return self.kind == "density"

    def forward(
        self,
        hidden_variables: list[torch.Tensor],
        log_jacobians: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Anomaly map ``(N, 1, H, W)`` of the flows' latents.

        Args:
            hidden_variables: The latents, one ``(N, C, h, w)`` tensor per scale.
            log_jacobians: For ``"density"``: the log-determinant of the norm and flow at each position,
                one ``(N, h, w)`` tensor per scale; the other maps ignore it.

        Raises:
            ValueError: ``"density"`` without ``log_jacobians``.
        """
        if self.kind == "probability":
            return super().forward(hidden_variables)
        if self.kind == "log_likelihood":
            maps = [0.5 * torch.mean(latent**2, dim=1, keepdim=True) for latent in hidden_variables]
        elif log_jacobians is None:
            msg = "The density map needs the flows' log-determinant per position; pass log_jacobians."
            raise ValueError(msg)
        else:
            maps = [
                -torch.exp(torch.mean(-0.5 * latent**2, dim=1, keepdim=True) + jacobian.unsqueeze(1) / latent.shape[1])
                for latent, jacobian in zip(hidden_variables, log_jacobians, strict=True)
            ]
        upsampled = [F.interpolate(scale_map, size=self.input_size, mode="bilinear") for scale_map in maps]
        return torch.stack(upsampled, dim=-1).mean(dim=-1)
