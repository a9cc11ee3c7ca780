"""Lightning module of DADF for anomalib.

One ``anomalib train`` run trains both of DADF's stages: for ``reconstruction_epochs`` epochs the
Transformer learns to reconstruct the frozen prior (AdamW), then for ``flow_epochs`` epochs the
flows learn the likelihood of [prior, local, global] with the Transformer frozen (Adam). With
``reconstruction_patience`` set, stage 1 instead ends once the reconstruction loss of held-out normal
training images stops improving (``reconstruction_epochs`` is then the cap); with ``flow_patience`` set,
stage 2 ends once the flows' likelihood of the validation split's normal images stops improving
(``flow_epochs`` is then the cap). The stage follows from the
epoch counter and the epoch stage 2 began at (saved with checkpoints), so resuming from a checkpoint
continues in the right stage with both optimizers' states.

Example:
    >>> from anomalib.data import MVTecAD
    >>> from anomalib.engine import Engine
    >>> from anomalib_dadf import Dadf
    >>> engine = Engine()
    >>> engine.train(model=Dadf(), datamodule=MVTecAD(category="bottle"))  # doctest: +SKIP

Paper:
    Dual-Attention Transformer and Discriminative Flow for Industrial Visual Anomaly Detection,
    Yao et al., IEEE T-ASE 2023, https://arxiv.org/abs/2303.17882
"""

import inspect
import logging
import os
from collections.abc import Callable, Sequence
from enum import Enum
from typing import Any

import torch
from anomalib import LearningType
from anomalib.data import Batch, MVTecLOCO
from anomalib.engine.plugins import AnomalibCheckpointIO
from anomalib.metrics import AUPRO, AUROC, PRO, Evaluator, F1Score
from anomalib.models.components import AnomalibModule
from anomalib.post_processing import PostProcessor
from anomalib.pre_processing import PreProcessor
from anomalib.visualization import Visualizer
from lightning.pytorch import Callback, seed_everything
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch import nn, optim
from torch.nn.utils import get_total_norm
from torchmetrics import MeanMetric
from torchvision.transforms.v2 import Compose, Normalize, Resize

from .callbacks import UnreadableImages
from .checkpoint_io import AtomicCheckpointIO
from .components import (
    Plateau,
    RunCache,
    check_holdout,
    delivers_blanks,
    held_out_images,
    input_statistics,
    pretrained_features,
    read_images_again,
    skip_reading_images,
)
from .export_mixin import DadfExportMixin
from .loss import FlowLoss, ReconstructionLoss
from .metrics import (
    SPRO,
    FieldAwareEvaluator,
    HeldOutFlowStopMixin,
    check_flow_objective,
    check_flow_stop,
    held_out_flow_stop,
    with_norm_log_jacobians,
)
from .post_processing import FalseAlarmPostProcessor
from .torch_model import DadfModel

logger = logging.getLogger(__name__)

# Arguments that shape the network or its scores, and so must match a checkpoint's weights and thresholds.
ARCHITECTURE = (
    "backbone",
    "layers",
    "embed_dim",
    "depth",
    "num_heads",
    "mlp_ratio",
    "flow_steps",
    "flow_clamp",
    "flow_hidden_ratio",
    "flow_subnet",
    "flow_positions",
    "flow_inputs",
    "anomaly_map",
    "map_layers",
    "score_layers",
    "score_top_fraction",
    "prior_pooling",
    "map_sigma",
    "score_margin",
)


def _plain(value: object) -> object:
    """Lists and tuples compare equal: a checkpoint stores what the command line or Python gave."""
    return list(value) if isinstance(value, tuple | list) else value


class Stage(str, Enum):
    """DADF's training stages, in order."""

    RECONSTRUCTION = "reconstruction"
    FLOW = "flow"


class TrainingDivergedError(RuntimeError):
    """A loss or its gradients stopped being finite; raised before the optimizer takes the step."""


class Dadf(DadfExportMixin, HeldOutFlowStopMixin, AnomalibModule):
    """DADF: Dual-Attention Transformer and Discriminative Flow.

    Args:
        backbone (str): timm CNN giving the frozen prior, optionally with timm's pretrained tag. Defaults to
            ``"wide_resnet50_2.tv_in1k"``: the paper's prior, torchvision's ImageNet weights (timm's untagged
            ``wide_resnet50_2`` is another training recipe, ``racm_in1k``).
        layers (Sequence[str]): Backbone layers, finest first: the paper's three, or more when ``map_layers``
            and ``score_layers`` share them out.
            Defaults to ``("layer1", "layer2", "layer3")``.
        pre_trained (bool): Load the backbone's ImageNet weights. Defaults to ``True``.
        backbone_weights (str | None): Local checkpoint of the whole timm backbone (``.safetensors``
            or ``.pth``) to load instead of timm's download; needs ``pre_trained``. Defaults to ``None``.
        embed_dim (int): Patch-embedding width per scale; tokens are ``embed_dim`` times the number of layers wide.
            Defaults to ``480``.
        depth (int): Dual-attention blocks. Defaults to ``8``.
        num_heads (int): Attention heads. Defaults to ``8``.
        mlp_ratio (float): MLP width relative to the token width. Defaults to ``4.0``.
        flow_steps (int): Coupling steps per scale. Defaults to ``8``.
        flow_clamp (float): Affine clamping of the couplings. Defaults to ``2.0``.
        flow_hidden_ratio (int): Channel multiplier of the coupling subnets' hidden layer. Defaults to ``1``.
        flow_subnet (str): Coupling subnets: ``"depthwise"`` (DADF's depthwise + pointwise convolutions)
            or ``"conv"`` (FastFlow's two full convolutions, more capacity). Defaults to ``"depthwise"``.
        flow_positions (int): Width (0 or a multiple of 4) of a fixed 2-D sin-cos encoding of each position that
            every coupling's subnet also reads, as CFLOW conditions its flows: on aligned parts (cells, boards) a
            position's normal look depends on where it is, which the flows on the prior alone cannot tell, the
            Transformer's positional embedding being out of their path. Defaults to ``0``: none, as the paper does.
        flow_inputs (Sequence[str]): Views the flows see; DADF uses ``("prior", "local", "global")``
            (the default), a subset in that order is an ablation. With ``("prior",)`` nothing scores through
            the Transformer, so stage 1 is skipped and ``reconstruction_epochs`` is not used.
        anomaly_map (str): ``"probability"`` (the paper's and FastFlow's map: the flows' negative
            probability, which saturates at 0 on strong evidence), ``"log_likelihood"`` (their negative
            log-likelihood, unbounded) or ``"density"`` (the paper's map with the log-determinant of the
            flows' Jacobian counted at each position, the exact density). Defaults to ``"probability"``.
        map_layers (Sequence[str] | None): The ``layers`` whose flows draw the anomaly map. Defaults to ``None``:
            all of them, as the paper does.
        score_layers (Sequence[str] | None): The ``layers`` whose flows' map gives the image score, for example
            the coarser ones of four while the finer three draw the map. Defaults to ``None``: all.
        score_top_fraction (float | None): The image score is the mean of this share (in (0, 1]) of the score map's
            highest positions, as MSFlow scores with its top 10 %. Defaults to ``None``: the map's maximum, as the
            paper does.
        prior_pooling (int): Average each prior map over this odd width of neighbourhood (stride 1, so the grid
            stays) before the Transformer and the flows see it, so that a flow models a position's neighbourhood
            as PatchCore's patch features do. Defaults to ``1``: no pooling, as the paper does.
        map_sigma (float): Standard deviation, in pixels of the input size, of a Gaussian blur of the anomaly map
            before the image score (its maximum or top share) is read, as PatchCore's and PaDiM's maps are blurred
            (their sigma is 4): a defect that raises a neighbourhood then outscores one noisy position. Defaults to
            ``0.0``: no blur, as the paper does.
        score_margin (float): Share of each side of the anomaly map (in [0, 0.5)) left out of the image score: a
            normal part's highest map values tend to lie in this border band, where the backbone sees its padding
            and aligned parts vary most. The map itself keeps the band. Defaults to ``0.0``: the whole map, as the
            paper scores.
        reconstruction_epochs (int): Epochs of stage 1 (Transformer); the cap when ``reconstruction_patience``
            is set. Defaults to ``200``.
        reconstruction_patience (int | None): End stage 1 once the reconstruction loss of held-out normal
            training images has not improved by 0.5 % for this many epochs; ``None`` trains stage 1 for
            exactly ``reconstruction_epochs`` (the paper). Defaults to ``None``.
        reconstruction_holdout (float): Share of the training images held out of stage 1 to measure that loss
            (a fixed random choice, at least one image); stage 2 trains on all. Used only with
            ``reconstruction_patience``. Defaults to ``0.1``.
        flow_epochs (int): Epochs of stage 2 (flows); the cap when ``flow_patience`` is set. Defaults to ``15``.
        flow_patience (int | None): End stage 2 once the flows' negative log-likelihood of the validation
            split's normal images (logged as ``held_out_flow_nll``, per latent dimension, every stage-2 epoch)
            has not improved by 0.001 for this many epochs (Lightning's ``EarlyStopping``); the flows keep
            the last epoch's weights. Validation images should be training images (``val_split_mode``
            ``from_train`` or ``synthetic``); a split taken from the test set gets a warning. ``None`` trains
            stage 2 for exactly ``flow_epochs``. Defaults to ``None``.
        flow_stop (str): With ``flow_patience``, ``"joint"`` ends stage 2 when the flows' likelihood summed over
            them stalls; ``"per_flow"`` stops each flow (and the norm in front of it) when its own likelihood
            stalls (logged as ``held_out_flow_nll/0``, ``/1``, ... finest first) and ends stage 2 when all have
            stopped, so that the largest flow's likelihood does not decide when the others stop. Defaults to
            ``"joint"``.
        flow_objective (str): ``"paper"`` (DADF's and FastFlow's maximum-likelihood loss) or ``"exact"`` (the
            same plus the log-determinant of the LayerNorm's elementwise affine map in front of each flow).
            The paper's loss trains that map but leaves its log-determinant out, so it falls without bound
            as the map's weights shrink, and past some epochs the flows' likelihood of held-out normal images
            gets worse (:mod:`anomalib_dadf.metrics.held_out_nll`); ``"exact"`` is the likelihood of the
            layer-normalised features, bounded below. Defaults to ``"paper"``.
        reconstruction_lr (float): AdamW learning rate of stage 1. Defaults to ``1e-4``.
        flow_lr (float): Adam learning rate of stage 2. Defaults to ``1e-3``.
        flow_weight_decay (float): Adam weight decay of stage 2. Defaults to ``1e-5``.
        flow_batch_size (int): Images per optimizer step of stage 2, reached by accumulating training
            batches (the reference trains the flows at 16, the Transformer at 8). A multiple of the
            training batch size gives exactly the update of one such batch. Defaults to ``16``.
        cache_features (bool): Compute each training image's prior once per run (and, in stage 2, its
            reconstructions) and train from the cache, without reading the training images again once all
            are cached; validation images' priors are cached too unless they are augmented. Skipped, with a
            log line, when the data module augments training images. Defaults to ``True``.
        cache_memory_gb (float): Memory the cache may use; beyond it the cache is memory-mapped from a
            temporary file. Defaults to ``4.0``.
        seed (int | None): Seed the run with Lightning's ``seed_everything`` before the network is built,
            so that its weights, the validation split's synthetic anomalies and the order of the training
            images repeat. ``anomalib train`` needs it to repeat a run (``--model.seed 0``): anomalib's
            command line reads ``seed_everything`` but does not apply it. Being an argument, it is saved
            with checkpoints, so ``load_from_checkpoint`` seeds again. ``None`` leaves the random generators
            as they are. Defaults to ``None``.
        pre_processor (PreProcessor | bool): Pre-processor, or ``True`` for anomalib's default resizing
            (256x256) with the backbone's own input statistics (timm's ``pretrained_cfg``: ImageNet's
            for most CNNs, 0.5 / 0.5 for ``tf_efficientnet_lite0``). Defaults to ``True``.
        post_processor (PostProcessor | bool): Post-processor, or ``True`` for
            :class:`~anomalib_dadf.post_processing.FalseAlarmPostProcessor`: anomalib's F1-adaptive
            thresholds, or thresholds that flag 1 % of the normal validation images (and pixels) when the
            validation set holds no anomalous image. Defaults to ``True``.
        evaluator (Evaluator | bool): Evaluator. Defaults to ``True``.
        visualizer (Visualizer | bool): Visualizer. Defaults to ``True``.

    Raises:
        ValueError: On a configuration that cannot work: unknown backbone or layers, fewer than three layers,
            map or score layers outside ``layers``, a score top fraction outside (0, 1], a score margin outside
            [0, 0.5), a prior pooling width that
            is not a positive odd number, an input size the token grid cannot take, a stage without epochs, a held-out
            share outside (0, 1) for the stage-1 stop, a flow patience below 1, or an unknown flow objective or flow
            stop.
    """

    def __init__(
        self,
        backbone: str = "wide_resnet50_2.tv_in1k",
        layers: Sequence[str] = ("layer1", "layer2", "layer3"),
        pre_trained: bool = True,
        backbone_weights: str | None = None,
        embed_dim: int = 480,
        depth: int = 8,
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
        flow_steps: int = 8,
        flow_clamp: float = 2.0,
        flow_hidden_ratio: int = 1,
        flow_subnet: str = "depthwise",
        flow_positions: int = 0,
        flow_inputs: Sequence[str] = ("prior", "local", "global"),
        anomaly_map: str = "probability",
        map_layers: Sequence[str] | None = None,
        score_layers: Sequence[str] | None = None,
        score_top_fraction: float | None = None,
        prior_pooling: int = 1,
        map_sigma: float = 0.0,
        score_margin: float = 0.0,
        reconstruction_epochs: int = 200,
        reconstruction_patience: int | None = None,
        reconstruction_holdout: float = 0.1,
        flow_epochs: int = 15,
        flow_patience: int | None = None,
        flow_stop: str = "joint",
        flow_objective: str = "paper",
        reconstruction_lr: float = 1e-4,
        flow_lr: float = 1e-3,
        flow_weight_decay: float = 1e-5,
        flow_batch_size: int = 16,
        cache_features: bool = True,
        cache_memory_gb: float = 4.0,
        seed: int | None = None,
        pre_processor: PreProcessor | bool = True,
        post_processor: PostProcessor | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
        if seed is not None:
            seed_everything(seed, workers=True)
        super().__init__(
            pre_processor=pre_processor,
            post_processor=post_processor,
            evaluator=evaluator,
            visualizer=visualizer,
        )
        for name, epochs in (("reconstruction_epochs", reconstruction_epochs), ("flow_epochs", flow_epochs)):
            if epochs < 1:
                msg = f"{name} must be at least 1, got {epochs}: DADF trains both stages, each for at least one epoch."
                raise ValueError(msg)
        if reconstruction_patience is not None:
            check_holdout(reconstruction_holdout)
        if flow_batch_size < 1:
            msg = f"flow_batch_size must be at least 1, got {flow_batch_size}."
            raise ValueError(msg)
        if pre_processor is True:
            self.pre_processor = self.configure_pre_processor(backbone=backbone)
        if backbone_weights is not None and not pre_trained:
            msg = "backbone_weights is given but pre_trained is false: set pre_trained=True to load the weights file."
            raise ValueError(msg)
        if self.input_size is None:
            msg = "DADF builds its token grid from the input size: give it a pre-processor that resizes images."
            raise ValueError(msg)

        self.reconstruction_epochs = reconstruction_epochs
        self.flow_epochs = flow_epochs
        self.reconstruction_lr = reconstruction_lr
        self.flow_lr = flow_lr
        self.flow_weight_decay = flow_weight_decay
        self.flow_batch_size = flow_batch_size
        self._flow_images = 0
        self._cache: RunCache | None = None
        self._plateau = None if reconstruction_patience is None else Plateau(reconstruction_patience)
        self._held_out: frozenset[str] = frozenset()
        self.held_out_loss = MeanMetric()
        self.init_held_out_flow_nll(len(layers))
        if flow_patience is not None:
            held_out_flow_stop(flow_patience)  # refuses a patience that cannot work before any training
        check_flow_stop(flow_stop, flow_patience)
        check_flow_objective(flow_objective, anomaly_map)
        # Two stages with two optimizers of different kinds: Lightning needs manual optimization for that.
        self.automatic_optimization = False

        self.model = self._build_model(self.input_size)
        self.reconstruction_loss = ReconstructionLoss()
        self.loss = FlowLoss()
        # Saved with every checkpoint, so an export can tell a model whose flows never trained.
        self.register_buffer("flow_steps_trained", torch.zeros((), dtype=torch.long))
        self.register_buffer("flow_start_epoch", torch.tensor(self._reconstruction_stage_epochs, dtype=torch.long))

    @property
    def _reconstruction_stage_epochs(self) -> int:
        """Planned epochs of stage 1: none when the flows see only the prior, since nothing they score with is trained there."""
        return self.reconstruction_epochs if self.model.uses_reconstructions else 0

    def _build_model(self, input_size: Sequence[int]) -> DadfModel:
        """Build the torch model without backbone weights.

        The frozen backbone is part of every checkpoint, so restoring one never needs the pretrained
        weights; they are loaded in :meth:`on_fit_start` when training starts from scratch.
        """
        model_arguments = {key: self.hparams[key] for key in ARCHITECTURE}
        return DadfModel(input_size=input_size, pre_trained=False, **model_arguments)

    def _refuse_arguments_the_checkpoint_predates(self, saved: dict[str, Any]) -> None:
        """Name the architecture arguments set away from their defaults that the checkpoint has no value for.

        A checkpoint without a value was saved before the argument existed, so its weights (and its
        thresholds) were made without what the argument adds; rebuilt with it, the network would miss
        weights (a blur kernel, a position encoding) or score differently from the thresholds.

        Raises:
            ValueError: Such an argument is set.
        """
        defaults = inspect.signature(type(self).__init__).parameters
        newer = [
            key for key in ARCHITECTURE
            if key not in saved and _plain(self.hparams.get(key)) != _plain(defaults[key].default)
        ]
        if newer:
            settings = ", ".join(f"{key}={self.hparams.get(key)!r}" for key in newer)
            msg = (
                f"This checkpoint was saved before {', '.join(newer)} existed, so it was trained without them, but "
                f"this model sets {settings}. Leave them out (e.g. drop --model.{newer[0]} from the command "
                "line) to test or export the checkpoint as trained, or train a new model with them."
            )
            raise ValueError(msg)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the pre-processor and rebuild the network as the checkpoint's, before its weights load.

        The token grid and the flows' norms depend on the input size (from the checkpoint's
        pre-processor), and the layers on the architecture the checkpoint was trained with, which may
        differ from the arguments this module was built with (``anomalib test --ckpt_path`` builds it
        from the command line). Lightning loads the state dict after this hook.

        Raises:
            ValueError: The checkpoint is not a DADF checkpoint, or it predates an architecture argument that
                this module sets away from its default.
        """
        state = checkpoint.get("state_dict", {})
        if not any(key.startswith("model.transformer.") for key in state):
            found = sorted({key.split(".")[1] for key in state if key.startswith("model.")})[:5]
            msg = (
                f"This is not a DADF checkpoint (its model holds {found or 'nothing'}, no dual-attention Transformer). "
                "Load it with the model class it was trained with."
            )
            raise ValueError(msg)
        super().on_load_checkpoint(checkpoint)
        saved = checkpoint.get("hyper_parameters", {})
        architecture = {key: saved[key] for key in ARCHITECTURE if key in saved}
        self._refuse_arguments_the_checkpoint_predates(saved)
        differs = any(_plain(self.hparams.get(key)) != _plain(value) for key, value in architecture.items())
        if differs or (self.input_size is not None and tuple(self.input_size) != self.model.input_size):
            self.hparams.update(architecture)
            self.model = self._build_model(self.input_size)
            self.init_held_out_flow_nll(len(self.model.flows))
        if "flow_steps_trained" not in state:
            # Checkpoints of version 0.1 predate the counter: a stage-2 epoch means the flows trained.
            reconstruction_epochs = saved.get("reconstruction_epochs", self.reconstruction_epochs)
            flow_epochs_done = checkpoint.get("epoch", 0) >= reconstruction_epochs
            state["flow_steps_trained"] = torch.tensor(int(flow_epochs_done), dtype=torch.long)
        if "flow_start_epoch" not in state:
            # Checkpoints before the held-out stop ran stage 1 for exactly reconstruction_epochs.
            state["flow_start_epoch"] = torch.tensor(saved.get("reconstruction_epochs", self.reconstruction_epochs))

    def on_fit_start(self) -> None:
        """Say when nothing seeded the run; load the backbone's pretrained weights when training starts from scratch."""
        if "PL_GLOBAL_SEED" not in os.environ:
            logger.info(
                "No seed was set, so this run will not repeat exactly (anomalib's command line does not apply "
                "seed_everything): pass --model.seed N to make it repeatable.",
            )
        if not self.hparams["pre_trained"] or self.trainer.ckpt_path is not None:
            return
        pretrained = pretrained_features(
            self.hparams["backbone"],
            self.model.feature_extractor.idx,
            self.hparams["backbone_weights"],
        )
        self.model.feature_extractor.feature_extractor.load_state_dict(pretrained.state_dict())

    @classmethod
    def configure_pre_processor(
        cls,
        image_size: tuple[int, int] | None = None,
        backbone: str = "wide_resnet50_2.tv_in1k",
    ) -> PreProcessor:
        """anomalib's resizing (256x256 by default), normalised with the statistics ``backbone`` was trained with."""
        mean, std = input_statistics(backbone)
        return PreProcessor(transform=Compose([Resize(image_size or (256, 256), antialias=True), Normalize(mean, std)]))

    @classmethod
    def configure_post_processor(cls) -> PostProcessor:
        """anomalib's post-processing, with thresholds at a false-positive rate when validation has no anomaly."""
        return FalseAlarmPostProcessor()

    def configure_callbacks(self) -> list[Callback]:
        """anomalib's component callbacks, the flow stop, and naming (when predicting, skipping) unreadable images."""
        return [*super().configure_callbacks(), UnreadableImages()]

    @staticmethod
    def configure_evaluator() -> Evaluator:
        """Image AUROC and F1; with masks also pixel AUROC, F1, PRO and AUPRO; sPRO is added on MVTec LOCO.

        Metrics that the data cannot feed (pixel metrics without masks) are left out of the report.
        """
        image_metrics = [
            AUROC(fields=["pred_score", "gt_label"], prefix="image_"),
            F1Score(fields=["pred_label", "gt_label"], prefix="image_"),
        ]
        pixel_metrics = [
            AUROC(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False),
            F1Score(fields=["pred_mask", "gt_mask"], prefix="pixel_", strict=False),
            PRO(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False),
            AUPRO(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False),
        ]
        return FieldAwareEvaluator(test_metrics=image_metrics + pixel_metrics)

    @property
    def stage(self) -> Stage:
        """Stage of the current training epoch."""
        return Stage.RECONSTRUCTION if self.current_epoch < int(self.flow_start_epoch) else Stage.FLOW

    def setup(self, stage: str) -> None:
        """Add sPRO on MVTec LOCO data, write checkpoints atomically, let DDP accept the idle stage's parameters.

        anomalib's (and Lightning's) default checkpoint writer is replaced by
        :class:`~anomalib_dadf.checkpoint_io.AtomicCheckpointIO` (a user's own writer is kept).

        Each stage leaves the other stage's parameters without gradients. Freezing them through
        ``requires_grad`` instead would hide the flows from DDP's gradient synchronisation for good
        when training starts in stage 1, so DDP is told to expect unused parameters.
        """
        del stage
        self._add_spro_on_loco()
        strategy = self.trainer.strategy
        if type(strategy.checkpoint_io) in {TorchCheckpointIO, AnomalibCheckpointIO}:
            safe_globals = getattr(strategy.checkpoint_io, "extra_safe_globals", None)
            strategy.checkpoint_io = AtomicCheckpointIO(extra_safe_globals=safe_globals)
        if isinstance(strategy, DDPStrategy) and not strategy._ddp_kwargs.get("find_unused_parameters"):  # noqa: SLF001
            logger.info("DADF trains its stages in turn: enabling DDP's find_unused_parameters.")
            strategy._ddp_kwargs["find_unused_parameters"] = True  # noqa: SLF001

    def _add_spro_on_loco(self) -> None:
        """Give the default evaluator sPRO when the data is MVTec LOCO (a user's own evaluator is left as is)."""
        test_metrics = getattr(self.evaluator, "test_metrics", [])
        if (
            isinstance(self.evaluator, FieldAwareEvaluator)
            and isinstance(getattr(self.trainer, "datamodule", None), MVTecLOCO)
            and not any(isinstance(metric, SPRO) for metric in test_metrics)
        ):
            test_metrics.append(SPRO())

    def training_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """Run one optimisation step of the current stage.

        Args:
            batch (Batch): Training batch of normal images.
            args: Unused.
            kwargs: Unused.

        Returns:
            STEP_OUTPUT: The stage's loss.
        """
        del args, kwargs
        reconstruction_optimizer, flow_optimizer = self.optimizers()
        images = batch.image.shape[0]
        priors = self._cached("priors", batch, lambda: self._training_priors(batch))
        if self.stage == Stage.RECONSTRUCTION:
            priors = self._measure_held_out(batch, priors)
            if not len(priors[0]):
                return None
            loss = self.reconstruction_loss(priors, *self.model.reconstruct(priors))
            self._stop_if_diverged("loss", loss)
            reconstruction_optimizer.zero_grad()
            self.manual_backward(loss)
            self._step(reconstruction_optimizer)
            images = len(priors[0])
        else:
            views = (
                self._cached("reconstructions", batch, lambda: self._reconstruct_without_gradients(priors))
                if self.model.uses_reconstructions
                else []
            )
            latents, log_jacobians = self.model.discriminate(priors, views[: len(priors)], views[len(priors) :])
            if self.hparams["flow_objective"] == "exact":
                log_jacobians = with_norm_log_jacobians(log_jacobians, self.model.flow_norms)
            loss = self.loss(latents, log_jacobians)
            self._stop_if_diverged("loss", loss)
            # Summed over images here and divided by their count at the step: the gradient of the mean over the
            # accumulated images, exactly that of one batch of flow_batch_size when it is a multiple of this batch.
            self.manual_backward(loss * images)
            self._flow_images += images
            if self._flow_images >= self.flow_batch_size or self.trainer.is_last_batch:
                for group in flow_optimizer.param_groups:
                    for parameter in group["params"]:
                        if parameter.grad is not None:
                            parameter.grad.div_(self._flow_images)
                self._step(flow_optimizer)
                flow_optimizer.zero_grad()
                self._flow_images = 0
                self.flow_steps_trained += 1
        self.log(
            f"train_{self.stage.value}_loss",
            loss.detach(),
            on_epoch=True,
            prog_bar=True,
            logger=True,
            batch_size=images,
        )
        return {"loss": loss.detach()}

    def _measure_held_out(self, batch: Batch, priors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Add the held-out images' reconstruction loss to the epoch's mean; the priors of the others."""
        if not self._held_out:
            return priors
        held_out = torch.tensor([path in self._held_out for path in batch.image_path], device=priors[0].device)
        if held_out.any():
            with torch.no_grad():
                held_out_priors = [prior[held_out] for prior in priors]
                loss = self.reconstruction_loss(held_out_priors, *self.model.reconstruct(held_out_priors))
            self.held_out_loss.update(loss, weight=int(held_out.sum()))
        return [prior[~held_out] for prior in priors]

    def _training_priors(self, batch: Batch) -> list[torch.Tensor]:
        """The training batch's priors, computed from its images.

        Raises:
            RuntimeError: The loader delivers blank images, so a prior missing from the cache cannot be computed.
        """
        if delivers_blanks(self.trainer.train_dataloader):
            msg = (
                "DADF's feature cache lost a training image's prior after the images stopped being read; "
                "train with cache_features=False and report this."
            )
            raise RuntimeError(msg)
        return self.model.extract_priors(batch.image)

    def _reconstruct_without_gradients(self, priors: list[torch.Tensor]) -> list[torch.Tensor]:
        with torch.no_grad():
            local, global_ = self.model.reconstruct(priors)
        return [*local, *global_]

    def _step(self, optimizer: optim.Optimizer) -> None:
        """Take the optimizer's step unless a gradient stopped being finite."""
        gradients = [parameter.grad for group in optimizer.param_groups for parameter in group["params"]]
        self._stop_if_diverged("gradient norm", get_total_norm([grad for grad in gradients if grad is not None]))
        optimizer.step()

    def on_train_epoch_start(self) -> None:
        """Start every flow epoch with no accumulated gradient; stop reading training images once all priors are cached."""
        self._flow_images = 0
        self.optimizers()[1].zero_grad()
        cached = self._cache is not None and self._cache.full("priors")
        if cached and skip_reading_images(self.trainer.train_dataloader, self.model.input_size):
            logger.info("DADF's feature cache holds every training image's prior: the images are not read again.")

    def on_train_epoch_end(self) -> None:
        """End stage 1 when the held-out reconstruction loss has stalled; end the run after the flow epochs."""
        if self.stage == Stage.RECONSTRUCTION and self._held_out:
            loss = float(self.held_out_loss.compute())
            self.held_out_loss.reset()
            self.log("held_out_reconstruction_loss", loss, logger=True)
            stalled = self._plateau.stalled(loss)
            if stalled or self.current_epoch + 1 == self.reconstruction_epochs:
                logger.info(
                    "DADF's stage 1 ends after epoch %d: the held-out reconstruction loss %s (best %.6g at epoch %d).",
                    self.current_epoch,
                    f"has not improved for {self._plateau.patience} epochs" if stalled else "reached the epoch cap",
                    self._plateau.best,
                    self._plateau.best_epoch,
                )
                self.flow_start_epoch.fill_(self.current_epoch + 1)
                self._held_out = frozenset()
        elif self.current_epoch + 1 >= int(self.flow_start_epoch) + self.flow_epochs:
            self.trainer.should_stop = True

    def on_train_start(self) -> None:
        """Hold out stage 1's images when its stop is on; prepare the feature cache unless it is off or images are augmented."""
        self.on_train_end()
        if not self.model.uses_reconstructions:
            logger.info("DADF's flows see only the prior: stage 1 is skipped, the Transformer is neither trained nor run.")
        self._hold_out_images()
        if not self.hparams["cache_features"]:
            return
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None or getattr(datamodule, "train_augmentations", None) is not None:
            reason = "no data module to tell" if datamodule is None else "the data module augments training images"
            logger.info("DADF's feature cache is off: %s, so a training image's prior may differ between epochs.", reason)
            return
        images = len(self.trainer.train_dataloader.dataset)
        capacities = {"priors": images, "reconstructions": images}
        validation_set = getattr(datamodule, "val_data", None)
        if validation_set is not None and getattr(datamodule, "val_augmentations", None) is None:
            capacities["validation priors"] = len(validation_set)
        self._cache = RunCache(capacities, int(self.hparams["cache_memory_gb"] * 1e9))

    def _hold_out_images(self) -> None:
        """Choose the images that stage 1 holds out to measure its reconstruction loss (when the stop is on).

        Raises:
            ValueError: The training set does not name its images' paths, so none can be held out.
        """
        if self._plateau is None or self.stage != Stage.RECONSTRUCTION:
            return
        samples = getattr(self.trainer.train_dataloader.dataset, "samples", None)
        if samples is None or "image_path" not in samples:
            msg = (
                "reconstruction_patience needs a training set that names its images' paths (an anomalib data module) "
                "to hold some out; set reconstruction_patience=None to train stage 1 for reconstruction_epochs."
            )
            raise ValueError(msg)
        self._held_out = held_out_images(samples["image_path"], self.hparams["reconstruction_holdout"])

    def _cached(self, kind: str, batch: Batch, compute: Callable[[], list[torch.Tensor]]) -> list[torch.Tensor]:
        """``compute()``, or what it gave for these images earlier in this run when the cache is on.

        Priors are fixed for the whole run (frozen backbone, no augmentation); reconstructions from stage 2 on.
        """
        if self._cache is None or not self._cache.caches(kind) or batch.image_path is None:
            return list(compute())
        return self._cache.get(kind, list(batch.image_path), compute, self.device)

    def on_train_end(self) -> None:
        """Free the feature cache; the run's training loader reads images again."""
        read_images_again(self.trainer.train_dataloader)
        if self._cache is not None:
            self._cache.close()
            self._cache = None

    def _stop_if_diverged(self, what: str, value: torch.Tensor) -> None:
        """Stop training at the first non-finite loss or gradient, before an optimizer step can use it.

        Raises:
            TrainingDivergedError: ``value`` is NaN or infinite; the message names stage, epoch, step and fixes.
        """
        if torch.isfinite(value).all():
            return
        if self.stage == Stage.RECONSTRUCTION:
            fix = f"lower reconstruction_lr (now {self.reconstruction_lr:g})"
        else:
            fix = f"lower flow_lr (now {self.flow_lr:g}) or flow_clamp (now {self.hparams['flow_clamp']:g})"
        msg = (
            f"DADF's {self.stage.value} {what} became {value.item()} at epoch {self.current_epoch}, "
            f"step {self.trainer.fit_loop.epoch_loop.batch_idx} of that epoch: training diverged and was stopped before "
            f"the optimizer used it. Likely fix: {fix}. No checkpoint with these weights was written; "
            "earlier checkpoints of this run are intact."
        )
        raise TrainingDivergedError(msg)

    def validation_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """Score a validation batch (from cached priors during training); anomalib's post-processor learns thresholds from it.

        In stage 2 the flows' likelihood of the batch's normal images is measured as well (untrained flows say nothing).
        """
        del args, kwargs
        priors = self._cached("validation priors", batch, lambda: self.model.extract_priors(batch.image))
        latents, log_jacobians = self.model.flow(priors, per_position=self.model.anomaly_map_generator.uses_log_jacobians)
        if self.stage == Stage.FLOW:
            self.measure_held_out(latents, log_jacobians, self.model.flow_norms, batch.gt_label)
        return batch.update(**self.model.score_latents(latents, log_jacobians)._asdict())

    def flow_scales(self) -> list[nn.Module]:
        """Each scale's flow with the norm in front of it, finest first: what the per-flow stop stops."""
        return list(self.model.flows)

    def configure_optimizers(self) -> list[optim.Optimizer]:
        """One optimizer per stage: AdamW for the Transformer, Adam for the flows."""
        return [
            optim.AdamW(self.model.transformer.parameters(), lr=self.reconstruction_lr, betas=(0.9, 0.95)),
            optim.Adam(self.model.flows.parameters(), lr=self.flow_lr, weight_decay=self.flow_weight_decay),
        ]

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        """Run both stages; manual optimisation leaves no automatic gradient clipping."""
        return {
            "max_epochs": self._reconstruction_stage_epochs + self.flow_epochs,
            "gradient_clip_val": None,
            "num_sanity_val_steps": 0,
        }

    @property
    def learning_type(self) -> LearningType:
        """DADF learns from normal images only."""
        return LearningType.ONE_CLASS
