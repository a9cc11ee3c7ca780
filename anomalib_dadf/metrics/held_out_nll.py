"""The flows' negative log-likelihood of held-out normal images, and a stop of flow training on it.

A normalizing flow is a density model, so the one signal that needs no anomaly to say whether more
training helps is the likelihood it gives normal images it does not train on: anomalib's validation
split holds such images (training images it sets aside). :class:`HeldOutFlowNll` averages it over
them, per latent dimension so that flows of any size compare on one scale, and
:func:`held_out_flow_stop` ends training once it stops improving.

The likelihood is that of the layer-normalised features, so it counts the log-determinant of the
LayerNorm's elementwise affine map in front of the flow. DADF's and FastFlow's training objective
leaves it out, yet trains that affine map: shrinking its weights lowers the objective without bound
(on ELPV mono by about 1.6 nats per dimension in 40 epochs), while the features' likelihood stops
improving after about 30 epochs and then gets worse (``benchmarks/results/flow_likelihood_curves.md``).
Without that term, the held-out objective would keep falling and never stop a run.

Example:
    >>> import torch
    >>> metric = HeldOutFlowNll()
    >>> norm = torch.nn.LayerNorm([4, 2, 2])
    >>> latents, log_jacobians = [torch.zeros(2, 4, 2, 2)], [torch.tensor([8.0, 0.0])]
    >>> metric.update(latents, log_jacobians, [norm], labels=torch.tensor([0, 1]))  # only the normal image counts
    >>> metric.compute().item()
    -0.5
"""

import logging
from collections.abc import Sequence

import torch
from anomalib.data.utils import ValSplitMode
from anomalib.models.image.fastflow.loss import FastflowLoss
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import EarlyStopping
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn
from torchmetrics import MeanMetric

logger = logging.getLogger(__name__)

HELD_OUT_FLOW_NLL = "held_out_flow_nll"

# Validation splits made of test images: a stop on them would let the test set choose the training length.
TEST_IMAGE_SPLITS = {ValSplitMode.FROM_TEST, ValSplitMode.SAME_AS_TEST}

# "paper": DADF's and FastFlow's objective; "exact": the likelihood of the layer-normalised features.
FLOW_OBJECTIVES = ("paper", "exact")

# An epoch that lowers the held-out NLL by less than this (nats per latent dimension) has not improved it.
MIN_FLOW_IMPROVEMENT = 1e-3


def check_flow_objective(objective: str, anomaly_map: str = "probability") -> None:
    """Refuse an unknown flow objective; warn when the ``"density"`` map would score the paper's.

    The density map counts the log-determinant of the norms' affine weights, which the paper's objective
    shrinks without bound, so under it that map scores a degenerate density.

    Raises:
        ValueError: ``objective`` is not one of :data:`FLOW_OBJECTIVES`.
    """
    if objective not in FLOW_OBJECTIVES:
        msg = f"Unknown flow_objective '{objective}': choose one of {list(FLOW_OBJECTIVES)}."
        raise ValueError(msg)
    if anomaly_map == "density" and objective == "paper":
        logger.warning(
            "anomaly_map 'density' counts the log-determinant of the LayerNorm in front of each flow, whose weights "
            "the paper's flow objective shrinks without bound, so the map would score a degenerate density: set "
            "flow_objective to 'exact'.",
        )


def with_norm_log_jacobians(log_jacobians: Sequence[torch.Tensor], norms: Sequence[nn.LayerNorm]) -> list[torch.Tensor]:
    """The flows' log-determinants plus that of the elementwise affine map of the LayerNorm in front of each.

    Per image (``(B,)``) or per position (``(B, H, W)``, the norm's log-weights summed over channels).
    """
    summed = []
    for jacobian, norm in zip(log_jacobians, norms, strict=True):
        if norm.weight is None:
            summed.append(jacobian)
            continue
        log_weights = torch.log(norm.weight.abs())  # (C, H, W)
        summed.append(jacobian + (log_weights.sum(dim=0) if jacobian.dim() > 1 else log_weights.sum()))
    return summed


def per_image(log_jacobians: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Log-determinants per image, ``(B,)``, from per-image or per-position (``(B, H, W)``) ones."""
    return [jacobian.flatten(1).sum(dim=1) if jacobian.dim() > 1 else jacobian for jacobian in log_jacobians]


class HeldOutFlowNll(MeanMetric):
    """Mean over normal images (label 0) of the negative log-likelihood of their layer-normalised features, per dimension.

    That is ``0.5 * sum(z^2) - log|det J|`` summed over scales, where ``J`` is the Jacobian of the flow and of
    the LayerNorm's affine map before it (see the module docstring).
    """

    def __init__(self) -> None:
        super().__init__()
        self.loss = FastflowLoss()

    def update(  # type: ignore[override]
        self,
        latents: Sequence[torch.Tensor],
        log_jacobians: Sequence[torch.Tensor],
        norms: Sequence[nn.LayerNorm],
        labels: torch.Tensor | None,
    ) -> None:
        """Add the normal images among a batch; a batch without labels or normal images adds nothing.

        Args:
            latents: The flows' latents, ``(B, C, H, W)`` per scale.
            log_jacobians: The flows' log-determinants, ``(B,)`` or ``(B, H, W)`` per scale.
            norms: The LayerNorm in front of each scale's flow.
            labels: The images' labels; 0 is normal.
        """
        if labels is None:
            return
        normal = torch.as_tensor(labels, device=latents[0].device).flatten() == 0
        if not normal.any():
            return
        dimensions = sum(latent[0].numel() for latent in latents)
        jacobians = with_norm_log_jacobians([jacobian[normal] for jacobian in per_image(log_jacobians)], norms)
        nll = self.loss([latent[normal] for latent in latents], jacobians)
        super().update(nll / dimensions, weight=int(normal.sum()))

    @property
    def measured(self) -> bool:
        """Whether any normal image was added since the last reset."""
        return bool(self.weight > 0)


def held_out_flow_stop(patience: int) -> EarlyStopping:
    """Lightning's early stop on :data:`HELD_OUT_FLOW_NLL`: end training after ``patience`` epochs without improvement.

    Epochs that do not log the metric (DADF's stage 1) are not counted.

    Raises:
        ValueError: ``patience`` below 1.
    """
    if patience < 1:
        msg = f"flow_patience must be at least 1 (or None to train the flows for all their epochs), got {patience}."
        raise ValueError(msg)
    return EarlyStopping(
        monitor=HELD_OUT_FLOW_NLL,
        mode="min",
        patience=patience,
        min_delta=MIN_FLOW_IMPROVEMENT,
        check_on_train_epoch_end=False,
        strict=False,
    )


class HeldOutFlowStopMixin:
    """For a flow model's LightningModule: log its ``held_out_flow_nll`` metric after each validation, stop on it.

    The module keeps a :class:`HeldOutFlowNll` as ``held_out_flow_nll``, updates it in ``validation_step`` and
    saves ``flow_patience`` (an ``int`` or ``None``) among its hyperparameters.
    """

    def on_validation_epoch_end(self) -> None:
        """Log the likelihood of the normal validation images, when any were measured this epoch."""
        if self.held_out_flow_nll.measured:
            self.log(HELD_OUT_FLOW_NLL, self.held_out_flow_nll.compute(), logger=True)
        self.held_out_flow_nll.reset()

    def configure_callbacks(self) -> list[Callback]:
        """The module's other callbacks, and the stop when ``flow_patience`` is set.

        A warning says so when a fit's data module takes its validation images from the test set.
        """
        patience = self.hparams["flow_patience"]
        if patience is None:
            return super().configure_callbacks()
        fitting = self._trainer is not None and self._trainer.state.fn == TrainerFn.FITTING
        split = getattr(getattr(self._trainer, "datamodule", None), "val_split_mode", None)
        if fitting and split in TEST_IMAGE_SPLITS:
            logger.warning(
                "flow_patience stops training on the validation split's normal images, and this data module takes "
                "them from the test set (val_split_mode=%s), so the test score would depend on test images: set "
                "val_split_mode to from_train or synthetic.",
                ValSplitMode(split).value,
            )
        return [*super().configure_callbacks(), held_out_flow_stop(patience)]
