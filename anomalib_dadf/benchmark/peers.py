"""anomalib's FastFlow on any timm CNN, so that every model of a benchmark row shares one backbone.

anomalib's ``Fastflow`` accepts only four backbone names, although its CNN path (timm ``features_only`` maps at
``out_indices`` 1-3, a trainable LayerNorm per scale, FastFlow blocks) is generic. ``TimmFastflow`` routes another
timm CNN through exactly that path; the benchmark table names the model ``TimmFastflow`` wherever it does so. It
also takes DADF's choice of anomaly map, DADF's stop on the flows' likelihood of held-out normal images, its choice
of flow objective, its neighbourhood pooling of the backbone's maps, its blur of the anomaly map, its positional
condition of the couplings and (``out_indices``) other maps of the backbone, with the map and the image score from
their own maps if wished, so that what DADF is tuned over is open to FastFlow too.
"""

from collections.abc import Sequence

import timm
import torch
from anomalib.data import Batch, InferenceBatch
from anomalib.models import Fastflow
from anomalib.models.image.fastflow.torch_model import FastflowModel, create_fast_flow_block, subnet_conv_func
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch import nn

from anomalib_dadf.anomaly_map import AnomalyMapGenerator, scale_indices
from anomalib_dadf.components import PositionalFlow, flow_with_log_jacobian_map, neighbourhood_pooling
from anomalib_dadf.metrics import (
    HeldOutFlowStopMixin,
    check_flow_objective,
    check_flow_stop,
    held_out_flow_stop,
    with_norm_log_jacobians,
)

CNN_OUT_INDICES = (1, 2, 3)


class TimmCnnFastflowModel(FastflowModel):
    """:class:`FastflowModel`'s CNN path for any timm CNN with ``features_only`` support, and DADF's anomaly maps."""

    def __init__(
        self,
        input_size: tuple[int, int],
        backbone: str,
        pre_trained: bool = True,
        flow_steps: int = 8,
        conv3x3_only: bool = False,
        hidden_ratio: float = 1.0,
        anomaly_map: str = "probability",
        out_indices: Sequence[int] = CNN_OUT_INDICES,
        map_out_indices: Sequence[int] | None = None,
        score_out_indices: Sequence[int] | None = None,
        score_top_fraction: float | None = None,
        prior_pooling: int = 1,
        flow_positions: int = 0,
        map_sigma: float = 0.0,
        score_margin: float = 0.0,
    ) -> None:
        # Build anomalib's CNN path once with a name it accepts, then give it this backbone's parts.
        super().__init__(input_size, "resnet18", False, flow_steps, conv3x3_only, hidden_ratio)
        self.feature_extractor = timm.create_model(
            backbone,
            pretrained=pre_trained,
            features_only=True,
            out_indices=list(out_indices),
        ).requires_grad_(False)
        self.prior_pooling = neighbourhood_pooling(prior_pooling)
        shapes = [
            [channels, input_size[0] // scale, input_size[1] // scale]
            for channels, scale in zip(
                self.feature_extractor.feature_info.channels(),
                self.feature_extractor.feature_info.reduction(),
                strict=True,
            )
        ]
        self.norms = nn.ModuleList(nn.LayerNorm(shape, elementwise_affine=True) for shape in shapes)
        self.fast_flow_blocks = nn.ModuleList(
            PositionalFlow(
                tuple(shape),
                flow_steps,
                # anomalib's FastFlow block, its kernels alternating 3 and 1 unless conv3x3_only.
                lambda step: subnet_conv_func(1 if step % 2 and not conv3x3_only else 3, hidden_ratio),
                position_channels=flow_positions,
            )
            if flow_positions
            else create_fast_flow_block(
                input_dimensions=shape,
                conv3x3_only=conv3x3_only,
                hidden_ratio=hidden_ratio,
                flow_steps=flow_steps,
            )
            for shape in shapes
        )
        self.anomaly_map_generator = AnomalyMapGenerator(
            input_size,
            kind=anomaly_map,
            map_scales=scale_indices(map_out_indices, out_indices, "map_out_indices"),
            score_scales=scale_indices(score_out_indices, out_indices, "score_out_indices"),
            score_top_fraction=score_top_fraction,
            sigma=map_sigma,
            score_margin=score_margin,
        )

    def _get_cnn_features(self, input_tensor: torch.Tensor) -> list[torch.Tensor]:
        """FastFlow's normalised CNN features, each map averaged over its neighbourhoods first (``prior_pooling``)."""
        features = (self.prior_pooling(feature) for feature in self.feature_extractor(input_tensor))
        return [norm(feature) for norm, feature in zip(self.norms, features, strict=True)]

    def flow(self, images: torch.Tensor, per_position: bool = False) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """FastFlow's latents and log-determinants (of the flows, not the norms), per image or per position."""
        outputs = [
            flow_with_log_jacobian_map(block, feature) if per_position else block(feature)
            for block, feature in zip(self.fast_flow_blocks, self._get_cnn_features(images), strict=True)
        ]
        return [latent for latent, _ in outputs], [log_jacobian for _, log_jacobian in outputs]

    def score(self, latents: list[torch.Tensor], log_jacobians: list[torch.Tensor]) -> InferenceBatch:
        """FastFlow's anomaly map and image score; the ``"density"`` map counts the norms' log-determinant too."""
        return self.anomaly_map_generator.score(latents, log_jacobians, self.norms)

    def forward(self, input_tensor: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]] | InferenceBatch:
        """As :class:`FastflowModel`: latents and log-determinants in training mode, else the scores."""
        self.feature_extractor.eval()
        per_position = not self.training and self.anomaly_map_generator.uses_log_jacobians
        latents, log_jacobians = self.flow(input_tensor, per_position=per_position)
        return (latents, log_jacobians) if self.training else self.score(latents, log_jacobians)


class TimmFastflow(HeldOutFlowStopMixin, Fastflow):
    """anomalib's :class:`~anomalib.models.Fastflow` with its CNN path on any timm CNN (see the module docstring).

    ``flow_patience`` ends training once the flows' likelihood of the validation split's normal images
    (``held_out_flow_nll``, logged every epoch) has not improved for that many epochs, as DADF's does
    (``flow_stop="per_flow"``: each flow on its own likelihood, as DADF's ``flow_stop``);
    ``flow_objective`` is DADF's too (``"exact"`` counts the log-determinant of FastFlow's trainable norms).
    ``out_indices`` are the backbone's ``features_only`` maps the flows model, anomalib's 1-3 by default;
    ``map_out_indices`` and ``score_out_indices`` (subsets of them, all by default) draw the anomaly map and give
    the image score, as DADF's ``map_layers`` and ``score_layers`` do; ``score_top_fraction``, ``prior_pooling``,
    ``flow_positions``, ``map_sigma`` and ``score_margin`` are DADF's too.
    """

    def __init__(
        self,
        backbone: str = "tf_efficientnet_lite0",
        pre_trained: bool = True,
        flow_steps: int = 8,
        conv3x3_only: bool = False,
        hidden_ratio: float = 1.0,
        anomaly_map: str = "probability",
        flow_patience: int | None = None,
        flow_stop: str = "joint",
        flow_objective: str = "paper",
        out_indices: Sequence[int] = CNN_OUT_INDICES,
        map_out_indices: Sequence[int] | None = None,
        score_out_indices: Sequence[int] | None = None,
        score_top_fraction: float | None = None,
        prior_pooling: int = 1,
        flow_positions: int = 0,
        map_sigma: float = 0.0,
        score_margin: float = 0.0,
        **kwargs,
    ) -> None:
        if flow_patience is not None:
            held_out_flow_stop(flow_patience)  # refuses a patience that cannot work before any training
        check_flow_stop(flow_stop, flow_patience)
        check_flow_objective(flow_objective, anomaly_map)
        super().__init__(
            backbone="resnet18",
            pre_trained=False,
            flow_steps=flow_steps,
            conv3x3_only=conv3x3_only,
            hidden_ratio=hidden_ratio,
            **kwargs,
        )
        self.backbone, self.pre_trained = backbone, pre_trained
        self.model = TimmCnnFastflowModel(
            input_size=self.input_size,
            backbone=backbone,
            pre_trained=pre_trained,
            flow_steps=flow_steps,
            conv3x3_only=conv3x3_only,
            hidden_ratio=hidden_ratio,
            anomaly_map=anomaly_map,
            out_indices=out_indices,
            map_out_indices=map_out_indices,
            score_out_indices=score_out_indices,
            score_top_fraction=score_top_fraction,
            prior_pooling=prior_pooling,
            flow_positions=flow_positions,
            map_sigma=map_sigma,
            score_margin=score_margin,
        )
        self.init_held_out_flow_nll(len(out_indices))

    def flow_scales(self) -> list[nn.Module]:
        """Each scale's FastFlow block with the norm in front of it, finest first: what the per-flow stop stops."""
        return [nn.ModuleList(pair) for pair in zip(self.model.norms, self.model.fast_flow_blocks, strict=True)]

    def training_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """FastFlow's training step, with the norms' log-determinant in the loss for the exact objective."""
        if self.hparams["flow_objective"] == "paper":
            return super().training_step(batch, *args, **kwargs)
        del args, kwargs
        latents, log_jacobians = self.model(batch.image)
        loss = self.loss(latents, with_norm_log_jacobians(log_jacobians, self.model.norms))
        self.log("train_loss", loss.item(), on_epoch=True, prog_bar=True, logger=True)
        return {"loss": loss}

    def validation_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """Score a validation batch as FastFlow does, and measure the flows' likelihood of its normal images."""
        del args, kwargs
        per_position = self.model.anomaly_map_generator.uses_log_jacobians
        latents, log_jacobians = self.model.flow(batch.image, per_position=per_position)
        self.measure_held_out(latents, log_jacobians, list(self.model.norms), batch.gt_label)
        return batch.update(**self.model.score(latents, log_jacobians)._asdict())
