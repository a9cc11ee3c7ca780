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

With ``flow_stop="per_flow"`` each flow instead stops on its own likelihood (:class:`PerFlowStop`): flows of
different sizes (a fine map's and a coarse one's) stop improving at different epochs, and the sum is led by the
largest.
"""

import logging
import math
from collections.abc import Sequence

import torch
from anomalib.data.utils import ValSplitMode
from anomalib.models.image.fastflow.loss import FastflowLoss
from lightning.pytorch import Callback, LightningModule, Trainer
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

# "joint": stop every flow when their summed likelihood stalls; "per_flow": each flow on its own.
FLOW_STOPS = ("joint", "per_flow")


def held_out_flow_nll_key(scale: int) -> str:
    """The logged name of one flow's held-out NLL (scales counted finest first, from 0)."""
    return f"{HELD_OUT_FLOW_NLL}/{scale}"


def check_flow_stop(flow_stop: str, patience: int | None) -> None:
    """Refuse an unknown flow stop; warn when a stop per flow is asked for without the patience it needs.

    Raises:
        ValueError: ``flow_stop`` is not one of :data:`FLOW_STOPS`.
    """
    if flow_stop not in FLOW_STOPS:
        msg = f"Unknown flow_stop '{flow_stop}': choose one of {list(FLOW_STOPS)}."
        raise ValueError(msg)
    if flow_stop == "per_flow" and patience is None:
        logger.warning(
            "flow_stop 'per_flow' stops each flow after flow_patience epochs without improvement, and flow_patience "
            "is not set, so no flow will stop before the last epoch: set flow_patience (for example 5).",
        )


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


class PerFlowStop(Callback):
    """Stop each flow once its own held-out NLL has not improved for ``patience`` epochs; end training when all have.

    A stopped flow (with the norm in front of it) stops receiving gradients, so the optimizer leaves it as it
    was, and the others train on. The module names its flows' parameters per scale with ``flow_scales()``
    and logs each flow's NLL under :func:`held_out_flow_nll_key`; epochs that do not log them (DADF's stage 1)
    are not counted. After the fit the stopped flows' parameters ask for gradients again, so the module is left
    as it was found (parameters that never did, such as FrEIA's fixed permutations, stay as they are).

    Example:
        >>> stop = PerFlowStop(patience=3)
        >>> stop.stopped  # each stopped flow's scale, and the epoch after which it stopped
        {}
    """

    def __init__(self, patience: int) -> None:
        held_out_flow_stop(patience)  # the same refusal of a patience that cannot work
        self.patience = patience
        self.best: dict[int, float] = {}
        self.waited: dict[int, int] = {}
        self.stopped: dict[int, int] = {}
        self._frozen: list[nn.Parameter] = []

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Count this epoch for every flow still training; stop those that stalled."""
        if trainer.sanity_checking:
            return
        scales = pl_module.flow_scales()
        values = [trainer.callback_metrics.get(held_out_flow_nll_key(scale)) for scale in range(len(scales))]
        if any(value is None for value in values):
            return
        for scale, value in enumerate(float(value) for value in values):
            if scale in self.stopped:
                continue
            if value < self.best.get(scale, math.inf) - MIN_FLOW_IMPROVEMENT:
                self.best[scale], self.waited[scale] = value, 0
                continue
            self.waited[scale] = self.waited.get(scale, 0) + 1
            if self.waited[scale] >= self.patience:
                self.stopped[scale] = trainer.current_epoch
                logger.info(
                    "Flow %d of %d stops after epoch %d: its held-out NLL has not improved for %d epochs (best %.4f).",
                    scale, len(scales), trainer.current_epoch, self.patience, self.best[scale],
                )
        self._freeze(scales)
        trainer.should_stop = trainer.should_stop or len(self.stopped) == len(scales)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Keep the flows stopped before a resumed fit's checkpoint was written stopped."""
        del trainer
        self._freeze(pl_module.flow_scales())

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Let every stopped flow train again, as a later fit of the same module would expect."""
        del trainer, pl_module
        for parameter in self._frozen:
            parameter.requires_grad_(True)
        self._frozen = []

    def _freeze(self, scales: Sequence[nn.Module]) -> None:
        for scale in self.stopped:
            trainable = [parameter for parameter in scales[scale].parameters() if parameter.requires_grad]
            for parameter in trainable:
                parameter.requires_grad_(False)
            self._frozen.extend(trainable)

    def state_dict(self) -> dict[str, object]:
        """What a checkpoint keeps, so that a resumed fit stops where this one would have."""
        return {"best": dict(self.best), "waited": dict(self.waited), "stopped": dict(self.stopped)}

    def load_state_dict(self, state_dict: dict[str, object]) -> None:
        """Restore :meth:`state_dict`."""
        self.best, self.waited = dict(state_dict["best"]), dict(state_dict["waited"])
        self.stopped = dict(state_dict["stopped"])


class HeldOutFlowStopMixin:
    """For a flow model's LightningModule: log the flows' held-out NLL after each validation, stop on it.

    The module calls :meth:`init_held_out_flow_nll` with its number of flows, :meth:`measure_held_out` in
    ``validation_step``, implements ``flow_scales()`` (each flow's modules, with the norm in front of it,
    finest first) and saves ``flow_patience`` (an ``int`` or ``None``) and ``flow_stop`` among its
    hyperparameters.
    """

    def init_held_out_flow_nll(self, scales: int) -> None:
        """The metrics of the flows' likelihood of held-out normal images: all together and each flow's."""
        self.held_out_flow_nll = HeldOutFlowNll()
        self.held_out_flow_nlls = nn.ModuleList(HeldOutFlowNll() for _ in range(scales))

    def measure_held_out(
        self,
        latents: Sequence[torch.Tensor],
        log_jacobians: Sequence[torch.Tensor],
        norms: Sequence[nn.LayerNorm],
        labels: torch.Tensor | None,
    ) -> None:
        """Add a validation batch's normal images to every flow's likelihood (see :meth:`HeldOutFlowNll.update`)."""
        self.held_out_flow_nll.update(latents, log_jacobians, norms, labels)
        for metric, *flow in zip(self.held_out_flow_nlls, latents, log_jacobians, norms, strict=True):
            metric.update(*([part] for part in flow), labels)

    def on_validation_epoch_end(self) -> None:
        """Log the likelihood of the normal validation images (all flows' and each one's), when any were measured."""
        if self.held_out_flow_nll.measured:
            self.log(HELD_OUT_FLOW_NLL, self.held_out_flow_nll.compute(), logger=True)
            for scale, metric in enumerate(self.held_out_flow_nlls):
                self.log(held_out_flow_nll_key(scale), metric.compute(), logger=True)
        for metric in (self.held_out_flow_nll, *self.held_out_flow_nlls):
            metric.reset()

    def configure_callbacks(self) -> list[Callback]:
        """The module's other callbacks, and the stop (``flow_stop``'s kind) when ``flow_patience`` is set.

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
        # Checkpoints from before the per-flow stop saved no flow_stop.
        per_flow = self.hparams.get("flow_stop", "joint") == "per_flow"
        return [*super().configure_callbacks(), PerFlowStop(patience) if per_flow else held_out_flow_stop(patience)]
