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

The image score is the maximum of a map (the paper's), or with ``score_top_fraction`` the mean of that share of
the map's highest values (MSFlow scores with its top 10 %), so that one stray position cannot set it alone. By
default the map and the score see every scale; ``map_scales`` and ``score_scales`` give each its own, so that fine
scales can draw the map while coarse ones, less prone to false alarms on a single position, score the image.
With ``sigma`` both maps are blurred by anomalib's Gaussian filter before the score is read, as PatchCore's and
PaDiM's maps are: a defect that raises a neighbourhood then outscores a lone noisy position of the same height.
With ``score_margin`` the score leaves out the map's border band, that share of each side (the map keeps it): a
CNN's features near the border see its zero padding, and aligned parts (cells, boards) vary most at their edges,
so a normal image's highest positions tend to lie there, the more so the finer the grid.

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
    >>> split = AnomalyMapGenerator((32, 32), kind="log_likelihood", map_scales=[0], score_scales=[1])
    >>> scores = split.score(latents)
    >>> scores.anomaly_map.amax().item(), scores.pred_score.item()  # the map from the first scale, the score from the second
    (0.0, 50.0)
    >>> peak = torch.zeros(1, 1, 4, 4)
    >>> peak[..., 0, 0] = 4.0  # one position of 16 stands out: its map value is 0.5 * 4^2 = 8
    >>> AnomalyMapGenerator((4, 4), kind="log_likelihood", score_top_fraction=0.25).score([peak]).pred_score.item()
    2.0
    >>> inside = AnomalyMapGenerator((4, 4), kind="log_likelihood", score_margin=0.25).score([peak])
    >>> inside.pred_score.item(), inside.anomaly_map.amax().item()  # the peak lies in the band: scored without it
    (0.0, 8.0)
    >>> blurred = AnomalyMapGenerator((16, 16), kind="log_likelihood", sigma=1.0).score([peak])
    >>> blurred.pred_score.item() < 8.0, blurred.anomaly_map[0, 0, 8, 8].item() > 0.0  # the peak is spread out
    (True, True)
"""

from collections.abc import Sequence

import torch
from anomalib.data import InferenceBatch
from anomalib.models.components import GaussianBlur2d
from anomalib.models.components.filters.blur import compute_kernel_size
from anomalib.models.image.fastflow.anomaly_map import AnomalyMapGenerator as ProbabilityMapGenerator
from torch import nn
from torch.nn import functional as F  # noqa: N812

from .metrics import with_norm_log_jacobians

ANOMALY_MAPS = ("probability", "log_likelihood", "density")


def scale_indices(chosen: Sequence | None, scales: Sequence, argument: str) -> tuple[int, ...] | None:
    """Positions in ``scales`` of the ``chosen`` ones (``None``: every scale, kept as ``None``).

    Args:
        chosen: A non-empty subset of ``scales``, or ``None``.
        scales: The model's scales (layer names or feature indices), finest first.
        argument: The argument's name, for the error.

    Raises:
        ValueError: ``chosen`` is empty, repeats a scale or names one the model does not have.

    Example:
        >>> scale_indices(["blocks.4", "blocks.6"], ["blocks.1", "blocks.2", "blocks.4", "blocks.6"], "score_layers")
        (2, 3)
    """
    if chosen is None:
        return None
    chosen, scales = list(chosen), list(scales)
    if not chosen or len(set(chosen)) != len(chosen) or any(scale not in scales for scale in chosen):
        msg = f"{argument} must be a non-empty subset of the model's scales {scales} without repeats, got {chosen}."
        raise ValueError(msg)
    return tuple(sorted(scales.index(scale) for scale in chosen))


class AnomalyMapGenerator(ProbabilityMapGenerator):
    """FastFlow's map generator, the negative log-likelihood map or the density map (see the module docstring).

    Args:
        input_size: Height and width of the map.
        kind: ``"probability"`` (the paper's and FastFlow's), ``"log_likelihood"`` or ``"density"``.
        map_scales: Positions of the scales that draw the map :meth:`score` gives; ``None``: all.
        score_scales: Positions of the scales whose map gives the image score; ``None``: all.
        score_top_fraction: Share of the score map's positions (at ``input_size``) whose mean is the image score,
            in (0, 1]; ``None``: its maximum.
        sigma: Standard deviation, in pixels of ``input_size``, of the Gaussian blur of the map and the score map
            in :meth:`score` (PatchCore's is 4); 0: none. :meth:`forward` gives the unblurred map.
        score_margin: Share of each side of the score map (rows at the top and bottom, columns at the left and
            right, rounded to whole pixels of ``input_size``) left out of the image score; 0: none.
            ``score_top_fraction`` is then a share of the positions inside.

    Raises:
        ValueError: Unknown ``kind``, a ``score_top_fraction`` outside (0, 1], a negative ``sigma`` or one whose
            kernel (``2 * int(4 * sigma + 0.5) + 1`` pixels wide) does not fit in the map, or a ``score_margin``
            outside [0, 0.5) or one that leaves no position of the map inside.
    """

    def __init__(
        self,
        input_size: tuple[int, int],
        kind: str = "probability",
        map_scales: Sequence[int] | None = None,
        score_scales: Sequence[int] | None = None,
        score_top_fraction: float | None = None,
        sigma: float = 0.0,
        score_margin: float = 0.0,
    ) -> None:
        super().__init__(input_size=input_size)
        if kind not in ANOMALY_MAPS:
            msg = f"Unknown anomaly map '{kind}': choose one of {list(ANOMALY_MAPS)}."
            raise ValueError(msg)
        self.kind = kind
        self.map_scales = None if map_scales is None else tuple(map_scales)
        self.score_scales = None if score_scales is None else tuple(score_scales)
        if score_top_fraction is not None and not 0 < score_top_fraction <= 1:
            msg = f"score_top_fraction must be in (0, 1] (or None for the map's maximum), got {score_top_fraction}."
            raise ValueError(msg)
        self.score_window = self._inside(score_margin)
        positions = (self.score_window[0].stop - self.score_window[0].start) * (
            self.score_window[1].stop - self.score_window[1].start
        )
        self.score_positions = None if score_top_fraction is None else max(1, round(score_top_fraction * positions))
        if sigma < 0:
            msg = f"The anomaly map's blur sigma must be 0 (no blur) or positive, got {sigma}."
            raise ValueError(msg)
        kernel_size = compute_kernel_size(sigma)
        if sigma > 0 and kernel_size // 2 >= min(self.input_size):
            msg = (
                f"The anomaly map's blur sigma {sigma} needs a {kernel_size}-pixel kernel, too wide for the "
                f"{self.input_size} map: choose a smaller sigma or a larger input size."
            )
            raise ValueError(msg)
        # Identity keeps the state dict of an unblurred model as it was, so its older checkpoints still load.
        self.blur = GaussianBlur2d(sigma=sigma, channels=1) if sigma > 0 else nn.Identity()

    def _inside(self, margin: float) -> tuple[slice, slice]:
        """Rows and columns of the map inside a border band of ``margin`` of each side."""
        height, width = self.input_size
        rows, columns = round(margin * height), round(margin * width)
        if not 0 <= margin < 0.5 or 2 * rows >= height or 2 * columns >= width:
            msg = (
                f"score_margin must be in [0, 0.5) and leave part of the {self.input_size} map inside its border band, "
                f"got {margin}: choose a smaller margin."
            )
            raise ValueError(msg)
        return slice(rows, height - rows), slice(columns, width - columns)

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

    def score(
        self,
        hidden_variables: Sequence[torch.Tensor],
        log_jacobians: Sequence[torch.Tensor] | None = None,
        norms: Sequence[nn.LayerNorm] = (),
    ) -> InferenceBatch:
        """Anomaly map of the ``map_scales`` and image score from the ``score_scales``' map (its maximum or top share).

        The score leaves out the map's border band of ``score_margin``; the map covers the whole input.

        Args:
            hidden_variables: The latents, one ``(N, C, h, w)`` tensor per scale.
            log_jacobians: The flows' log-determinants per position, as for :meth:`forward`.
            norms: The LayerNorm in front of each scale's flow, whose affine map's log-determinant the ``"density"``
                map adds to the flows'; the other maps ignore it.
        """
        if log_jacobians is not None and self.uses_log_jacobians and norms:
            log_jacobians = with_norm_log_jacobians(log_jacobians, norms)
        anomaly_map = self._scales_map(self.map_scales, hidden_variables, log_jacobians)
        score_map = (
            anomaly_map
            if self.score_scales == self.map_scales
            else self._scales_map(self.score_scales, hidden_variables, log_jacobians)
        )
        score_map = score_map[..., self.score_window[0], self.score_window[1]]
        if self.score_positions is None:
            pred_score = torch.amax(score_map, dim=(-2, -1))
        else:
            pred_score = torch.topk(score_map.flatten(start_dim=-2), self.score_positions, dim=-1).values.mean(dim=-1)
        return InferenceBatch(pred_score=pred_score, anomaly_map=anomaly_map)

    def _scales_map(
        self,
        scales: tuple[int, ...] | None,
        hidden_variables: Sequence[torch.Tensor],
        log_jacobians: Sequence[torch.Tensor] | None,
    ) -> torch.Tensor:
        """The blurred map of some scales (``None``: all)."""
        indices = range(len(hidden_variables)) if scales is None else scales
        chosen_jacobians = None if log_jacobians is None else [log_jacobians[index] for index in indices]
        return self.blur(self([hidden_variables[index] for index in indices], chosen_jacobians))
