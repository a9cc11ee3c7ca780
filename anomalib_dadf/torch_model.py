"""PyTorch model of DADF: frozen prior, dual-attention Transformer, discriminative flows.

Example:
    >>> import torch
    >>> from anomalib_dadf.torch_model import DadfModel
    >>> model = DadfModel(input_size=(64, 64), backbone="resnet18", pre_trained=False,
    ...                   embed_dim=32, depth=1, num_heads=2, flow_steps=2).eval()
    >>> output = model(torch.rand(2, 3, 64, 64))
    >>> output.anomaly_map.shape, output.pred_score.shape
    (torch.Size([2, 1, 64, 64]), torch.Size([2, 1]))
"""

from collections.abc import Sequence

import torch
from anomalib.data import InferenceBatch
from anomalib.models.components import TimmFeatureExtractor
from torch import nn

from .anomaly_map import AnomalyMapGenerator, scale_indices
from .components import DiscriminativeFlow, DualAttentionTransformer, describe_prior, neighbourhood_pooling

FLOW_VIEWS = ("prior", "local", "global")


class DadfModel(nn.Module):
    """DADF: Dual-Attention Transformer and Discriminative Flow.

    Args:
        input_size: Height and width of the (pre-processed) input images.
        backbone: timm CNN that gives the frozen prior.
        layers: Backbone layers, finest first: the paper's three, or more when ``map_layers`` and ``score_layers``
            share them out.
        pre_trained: Load the backbone's pretrained weights.
        embed_dim: Patch-embedding width per scale (tokens are ``embed_dim`` times the number of layers wide).
        depth: Number of dual-attention blocks.
        num_heads: Attention heads.
        mlp_ratio: MLP width of the blocks relative to the token width.
        flow_steps: Coupling steps per scale.
        flow_clamp: Affine clamping of the couplings.
        flow_hidden_ratio: Channel multiplier of the coupling subnets' hidden layer.
        flow_subnet: Coupling subnets: ``"depthwise"`` (DADF's) or ``"conv"`` (FastFlow's full convolutions).
        flow_positions: Width of a fixed sin-cos encoding of each position that the couplings also see
            (:class:`~anomalib_dadf.components.PositionalFlow`); 0 (the paper's): none.
        flow_inputs: Views the flows see, a subset of ``("prior", "local", "global")`` in that order;
            DADF uses all three, fewer are ablations; with the prior alone the Transformer is never run.
        anomaly_map: ``"probability"`` (the paper's negative-probability map), ``"log_likelihood"`` or
            ``"density"`` (the paper's map with the flows' Jacobian counted; see :mod:`anomalib_dadf.anomaly_map`).
        map_layers: The ``layers`` whose flows draw the anomaly map; ``None`` (the paper's): all.
        score_layers: The ``layers`` whose flows' map gives the image score; ``None`` (the paper's): all.
        score_top_fraction: The image score is the mean of this share of the score map's highest positions;
            ``None`` (the paper's): its maximum.
        prior_pooling: Width of the neighbourhood each prior map is averaged over before anything reads it
            (:func:`~anomalib_dadf.components.neighbourhood_pooling`); 1 (the paper's): none.
        map_sigma: Standard deviation in pixels of a Gaussian blur of the anomaly map before the image score is
            read (PatchCore's is 4); 0 (the paper's): none.
        score_margin: Share of each side of the anomaly map left out of the image score (its border band); 0 (the
            paper's): none.

    Raises:
        ValueError: Unknown, repeated or no flow inputs, an unknown anomaly map, or map or score layers that are
            not among ``layers``, a top fraction outside (0, 1], a negative or too wide blur, a score margin
            outside [0, 0.5) or one that leaves no position inside, a pooling width that is
            not a positive odd number, or a positional width that is not 0 or a positive multiple of 4 (besides the
            prior's and the grid's errors).
    """

    def __init__(
        self,
        input_size: Sequence[int],
        backbone: str = "wide_resnet50_2.tv_in1k",
        layers: Sequence[str] = ("layer1", "layer2", "layer3"),
        pre_trained: bool = True,
        embed_dim: int = 480,
        depth: int = 8,
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
        flow_steps: int = 8,
        flow_clamp: float = 2.0,
        flow_hidden_ratio: int = 1,
        flow_subnet: str = "depthwise",
        flow_positions: int = 0,
        flow_inputs: Sequence[str] = FLOW_VIEWS,
        anomaly_map: str = "probability",
        map_layers: Sequence[str] | None = None,
        score_layers: Sequence[str] | None = None,
        score_top_fraction: float | None = None,
        prior_pooling: int = 1,
        map_sigma: float = 0.0,
        score_margin: float = 0.0,
    ) -> None:
        super().__init__()
        self.flow_inputs = tuple(flow_inputs)
        if not self.flow_inputs or self.flow_inputs != tuple(view for view in FLOW_VIEWS if view in self.flow_inputs):
            msg = f"flow_inputs must be a non-empty subset of {list(FLOW_VIEWS)} in that order, got {list(flow_inputs)}."
            raise ValueError(msg)
        scales = describe_prior(backbone, layers)
        self.input_size = (int(input_size[0]), int(input_size[1]))
        grid_size = scales.grid_size(self.input_size)
        self.feature_extractor = TimmFeatureExtractor(
            backbone=backbone,
            layers=list(scales.indices),
            pre_trained=pre_trained,
        )
        self.feature_extractor.requires_grad_(False)
        self.prior_pooling = neighbourhood_pooling(prior_pooling)
        self.transformer = DualAttentionTransformer(
            channels=scales.channels,
            patch_sizes=scales.patch_sizes,
            grid_size=grid_size,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
        )
        self.flows = nn.ModuleList(
            DiscriminativeFlow(
                shape,
                num_views=len(self.flow_inputs),
                flow_steps=flow_steps,
                clamp=flow_clamp,
                hidden_ratio=flow_hidden_ratio,
                subnet=flow_subnet,
                position_channels=flow_positions,
            )
            for shape in scales.feature_shapes(self.input_size)
        )
        self.anomaly_map_generator = AnomalyMapGenerator(
            input_size=self.input_size,
            kind=anomaly_map,
            map_scales=scale_indices(map_layers, layers, "map_layers"),
            score_scales=scale_indices(score_layers, layers, "score_layers"),
            score_top_fraction=score_top_fraction,
            sigma=map_sigma,
            score_margin=score_margin,
        )

    def extract_priors(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Frozen multi-scale features of normalised images, finest first.

        Raises:
            ValueError: If the images are not ``(B, 3, H, W)`` with the model's input size.
        """
        if images.dim() != 4 or images.shape[1] != 3 or tuple(images.shape[-2:]) != self.input_size:
            height, width = self.input_size
            msg = (
                f"DADF expects images of shape (batch, 3, {height}, {width}), got {tuple(images.shape)}. "
                "Resize them with the model's pre-processor (anomalib's default does this), convert grayscale "
                "images to 3 channels, or build the model for this input size."
            )
            raise ValueError(msg)
        return [self.prior_pooling(prior) for prior in self.feature_extractor(images).values()]

    @property
    def uses_reconstructions(self) -> bool:
        """Whether the flows see a reconstruction; a flow on the prior alone never runs the Transformer."""
        return self.flow_inputs != ("prior",)

    def reconstruct(self, priors: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Local and global reconstructions of the priors."""
        return self.transformer(priors)

    def discriminate(
        self,
        priors: Sequence[torch.Tensor],
        local: Sequence[torch.Tensor],
        global_: Sequence[torch.Tensor],
        per_position: bool = False,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Latents and log-Jacobian determinants of the flows (on the ``flow_inputs`` views), one per scale.

        The determinants are per image, ``(B,)``, or with ``per_position`` per position, ``(B, H, W)``.
        """
        views = dict(zip(FLOW_VIEWS, (priors, local, global_), strict=True))
        per_scale = zip(*(views[name] for name in self.flow_inputs), strict=True)
        outputs = [
            flow(*scale_views, per_position=per_position)
            for flow, scale_views in zip(self.flows, per_scale, strict=True)
        ]
        return [latent for latent, _ in outputs], [log_jacobian for _, log_jacobian in outputs]

    def forward(self, images: torch.Tensor) -> InferenceBatch:
        """Score images.

        Args:
            images: Normalised images, ``(B, 3, H, W)``.

        Returns:
            InferenceBatch: ``anomaly_map`` ``(B, 1, H, W)`` and ``pred_score`` (the score layers' map's maximum or top share).
        """
        return self.score(self.extract_priors(images))

    def score(self, priors: Sequence[torch.Tensor]) -> InferenceBatch:
        """Score images from their priors (as :meth:`extract_priors` gives them), as :meth:`forward` does."""
        return self.score_latents(*self.flow(priors, per_position=self.anomaly_map_generator.uses_log_jacobians))

    @property
    def flow_norms(self) -> list[nn.LayerNorm]:
        """The LayerNorm in front of each scale's flow, finest first."""
        return [flow.norm for flow in self.flows]

    def flow(
        self,
        priors: Sequence[torch.Tensor],
        per_position: bool = False,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Latents and log-Jacobian determinants of the flows from the priors, reconstructing them when the flows need it.

        The determinants are per image, or with ``per_position`` per position (see :meth:`discriminate`).
        """
        reconstructions = self.reconstruct(priors) if self.uses_reconstructions else ([], [])
        return self.discriminate(priors, *reconstructions, per_position=per_position)

    def score_latents(
        self,
        latents: Sequence[torch.Tensor],
        log_jacobians: Sequence[torch.Tensor] | None = None,
    ) -> InferenceBatch:
        """Anomaly map and image score (from the score layers' map) of the flows' latents.

        Args:
            latents: The flows' latents, one per scale.
            log_jacobians: The flows' log-determinants per position (:meth:`flow` with ``per_position``),
                which the ``"density"`` map needs and the others ignore.
        """
        return self.anomaly_map_generator.score(latents, log_jacobians, self.flow_norms)
