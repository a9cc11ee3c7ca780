"""Checks a timm CNN backbone and layer choice before any weights are loaded.

DADF needs three feature maps (the paper's; more when the anomaly map and the image score take their own) whose
strides divide the coarsest, so that every scale can be patch-embedded onto the grid of the coarsest one. This
module reads channels and strides from timm's ``feature_info`` (never from a table), so any timm CNN with
``features_only`` support works.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import timm
from huggingface_hub import try_to_load_from_cache
from torch import nn

MIN_SCALES = 3


@dataclass(frozen=True)
class PriorScales:
    """What DADF needs to know about the prior's feature maps.

    Attributes:
        indices: timm ``out_indices`` of the requested layers, in the order given.
        channels: Channels of each feature map.
        strides: Stride (reduction) of each feature map relative to the input.
    """

    indices: tuple[int, ...]
    channels: tuple[int, ...]
    strides: tuple[int, ...]

    @property
    def grid_stride(self) -> int:
        """Stride of the coarsest scale, which sets the token grid."""
        return max(self.strides)

    @property
    def patch_sizes(self) -> tuple[int, ...]:
        """Patch size that maps each scale onto the token grid."""
        return tuple(self.grid_stride // stride for stride in self.strides)

    def grid_size(self, input_size: Sequence[int]) -> tuple[int, int]:
        """Token grid for an input size.

        Raises:
            ValueError: If the input size is not a multiple of the coarsest stride.
        """
        height, width = (int(size) for size in input_size)
        if height % self.grid_stride or width % self.grid_stride or height <= 0 or width <= 0:
            lower_h = max(self.grid_stride, height // self.grid_stride * self.grid_stride)
            lower_w = max(self.grid_stride, width // self.grid_stride * self.grid_stride)
            msg = (
                f"Input size {height}x{width} does not fit the token grid: both sides must be positive "
                f"multiples of the coarsest feature stride ({self.grid_stride}). "
                f"Resize the images to, for example, {lower_h}x{lower_w} with the pre-processor."
            )
            raise ValueError(msg)
        return height // self.grid_stride, width // self.grid_stride

    def feature_shapes(self, input_size: Sequence[int]) -> list[tuple[int, int, int]]:
        """``(channels, height, width)`` of every feature map for an input size."""
        height, width = (int(size) for size in input_size)
        return [
            (channels, height // stride, width // stride)
            for channels, stride in zip(self.channels, self.strides, strict=True)
        ]


def describe_prior(backbone: str, layers: Sequence[str]) -> PriorScales:
    """Validate a backbone and its layers and describe the feature maps they give.

    Builds the backbone without weights, so nothing is downloaded.

    Args:
        backbone: timm model name of a CNN, for example ``"wide_resnet50_2"``.
        layers: Names of the feature layers (three, or more), from finest to coarsest.

    Returns:
        PriorScales: Indices, channels and strides of the requested layers.

    Raises:
        ValueError: Unknown backbone, a backbone without multi-scale features, unknown layers,
            fewer than three layers, or strides that repeat or do not divide the coarsest one.
    """
    if not timm.is_model(backbone):
        close = timm.list_models(f"*{backbone.split('_')[0]}*")[:8]
        hint = f" Similar names: {', '.join(close)}." if close else ""
        msg = f"Unknown backbone '{backbone}': it is not a timm model name.{hint} See timm.list_models()."
        raise ValueError(msg)
    try:
        probe = timm.create_model(backbone, pretrained=False, features_only=True)
    except (RuntimeError, ValueError, TypeError, AttributeError) as error:
        msg = (
            f"Backbone '{backbone}' cannot give multi-scale feature maps (timm features_only failed: {error}). "
            "Use a CNN such as 'wide_resnet50_2', 'resnet18' or 'tf_efficientnet_lite0'."
        )
        raise ValueError(msg) from error

    info = probe.feature_info.info
    available = [entry["module"] for entry in info]
    layers = list(layers)
    if len(layers) < MIN_SCALES:
        msg = (
            f"DADF uses at least {MIN_SCALES} feature layers (fine, middle, coarse), got {len(layers)}: {layers}. "
            f"Layers of '{backbone}': {available}."
        )
        raise ValueError(msg)
    missing = [layer for layer in layers if layer not in available]
    if missing:
        msg = f"Layer(s) {missing} not found in backbone '{backbone}'. Available layers: {available}."
        raise ValueError(msg)

    indices = tuple(available.index(layer) for layer in layers)
    strides = tuple(int(info[index]["reduction"]) for index in indices)
    channels = tuple(int(info[index]["num_chs"]) for index in indices)
    coarsest = max(strides)
    if any(coarsest % stride for stride in strides) or len(set(strides)) != len(strides):
        msg = (
            f"Layers {layers} of '{backbone}' have strides {list(strides)}: DADF needs different strides "
            "that each divide the coarsest one (for example 4, 8, 16)."
        )
        raise ValueError(msg)
    return PriorScales(indices=indices, channels=channels, strides=strides)


def neighbourhood_pooling(size: int) -> nn.Module:
    """Average every feature map over a ``size`` x ``size`` neighbourhood of each position, keeping the grid.

    PatchCore scores such averages ("locally aware patch features", ``size`` 3); a flow on them models a
    position's neighbourhood rather than the position alone. Padding is left out of the average, so a border
    position is the mean of the neighbours it has instead of being shrunk towards zero.

    Args:
        size: Odd neighbourhood width; 1 leaves the maps as they are.

    Raises:
        ValueError: ``size`` is not a positive odd number.

    Example:
        >>> import torch
        >>> pool = neighbourhood_pooling(3)
        >>> pool(torch.ones(1, 2, 4, 4)).shape, bool(pool(torch.ones(1, 2, 4, 4)).eq(1).all())
        (torch.Size([1, 2, 4, 4]), True)
    """
    if size < 1 or size % 2 == 0:
        msg = f"prior_pooling must be a positive odd neighbourhood width (1 for none, 3 as PatchCore's), got {size}."
        raise ValueError(msg)
    return nn.Identity() if size == 1 else nn.AvgPool2d(size, stride=1, padding=size // 2, count_include_pad=False)


IMAGENET_STATISTICS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def input_statistics(backbone: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and standard deviation the backbone's pretrained weights were trained with (timm's ``pretrained_cfg``).

    ImageNet's statistics for most CNNs; ``tf_efficientnet_lite0`` and other TensorFlow ports use 0.5 and 0.5.
    A name timm does not know, or a configuration without statistics, gets ImageNet's.

    Example:
        >>> input_statistics("tf_efficientnet_lite0")
        ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    """
    config = timm.models.get_pretrained_cfg(backbone) if timm.is_model(backbone) else None
    mean, std = getattr(config, "mean", None), getattr(config, "std", None)
    if mean is None or std is None:
        return IMAGENET_STATISTICS
    return tuple(mean), tuple(std)


def cached_weights(backbone: str) -> Path | None:
    """The backbone's timm weights file if it is already in the Hugging Face cache, else ``None``.

    Reading the cache directly means a cached backbone never waits on the network.
    """
    hub_id = timm.models.get_pretrained_cfg(backbone).hf_hub_id if timm.is_model(backbone) else None
    for filename in ("model.safetensors", "pytorch_model.bin"):
        cached = try_to_load_from_cache(hub_id, filename) if hub_id else None
        if isinstance(cached, str):
            return Path(cached)
    return None


def check_checkpoint(backbone: str, path: str | Path) -> None:
    """Check that a local checkpoint holds exactly the tensors of the whole timm ``backbone``.

    timm itself only warns about unexpected keys, so the weights of a deeper sibling (say resnet34
    for resnet18) would load silently; this names every kind of misfit instead.

    Raises:
        FileNotFoundError: ``path`` names no file.
        ValueError: Missing, unexpected or differently shaped tensors (counted, with the first of each).
    """
    if not Path(path).is_file():
        msg = f"Backbone weights file not found: {path}."
        raise FileNotFoundError(msg)
    expected = timm.create_model(backbone, pretrained=False).state_dict()
    found = timm.models.load_state_dict(str(path))
    problems = {
        "missing": [key for key in expected if key not in found],
        "unexpected": [key for key in found if key not in expected],
        "shape mismatch": [
            f"{key} {tuple(found[key].shape)} vs {tuple(tensor.shape)}"
            for key, tensor in expected.items()
            if key in found and found[key].shape != tensor.shape
        ],
    }
    summary = "; ".join(f"{len(keys)} {kind} (first: {keys[0]})" for kind, keys in problems.items() if keys)
    if summary:
        msg = (
            f"The weights in {path} do not fit backbone '{backbone}': {summary}. "
            "Give a checkpoint of the whole model of exactly this timm architecture."
        )
        raise ValueError(msg)


def pretrained_features(backbone: str, indices: Sequence[int], weights: str | Path | None = None) -> nn.Module:
    """timm ``features_only`` model of ``backbone`` with pretrained weights.

    Args:
        backbone: timm model name.
        indices: ``out_indices`` of the feature maps.
        weights: A local checkpoint of the whole timm model (``.safetensors``, ``.pth``); ``None``
            for timm's own weights, from the Hugging Face cache when there, else from the hub.

    Raises:
        FileNotFoundError: ``weights`` names no file.
        ValueError: The checkpoint's keys or shapes do not fit the backbone (see :func:`check_checkpoint`).
        RuntimeError: timm's weights can be had neither from the cache nor from the hub.
    """
    if weights is not None:
        check_checkpoint(backbone, weights)
    source = Path(weights) if weights is not None else cached_weights(backbone)
    try:
        return timm.create_model(
            backbone,
            pretrained=True,
            features_only=True,
            exportable=True,
            out_indices=list(indices),
            pretrained_cfg_overlay={"file": str(source)} if source else None,
        )
    # Network failures surface as errors of several libraries (httpx, huggingface_hub, OS), so all are caught.
    except Exception as error:
        msg = (
            f"Could not load the pretrained weights of backbone '{backbone}' ({type(error).__name__}: {error}). "
            "Online: check the connection to the Hugging Face hub. Offline: put timm's weights in the Hugging Face "
            "cache ($HF_HOME/hub) and set HF_HUB_OFFLINE=1 (for EfficientNet-Lite: "
            "'python -m anomalib_dadf.weights install tf_efficientnet_lite0'), or pass a local checkpoint file "
            "as backbone_weights. "
            "For a smoke test only, train with pre_trained=False (a random prior)."
        )
        raise RuntimeError(msg) from error
