"""The reference implementation's details: torchvision weights by tag, xavier initialisation, flow batch 16,
per-backbone input statistics, and the feature cache that trains from each image's prior computed once."""

import logging
from pathlib import Path

import pytest
import timm
import torch
from anomalib.data.datasets import MVTecADDataset
from anomalib.data.datasets.base import AnomalibDataset
from anomalib.data.datasets.base import image as anomalib_image_dataset
from anomalib.data.utils import read_image
from anomalib.engine import Engine
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from torch.utils.data import DataLoader
from torchvision.transforms.v2 import ColorJitter, Normalize

from anomalib_dadf import Dadf
from anomalib_dadf.components import (
    FeatureCache,
    delivers_blanks,
    describe_prior,
    input_statistics,
    read_images_again,
    skip_reading_images,
)
from anomalib_dadf.components.transformer import DualAttentionTransformer
from anomalib_dadf.data import MVTec

from .conftest import TINY_MODEL, small_pre_processor

REPO = Path(__file__).resolve().parents[1]


def tiny_dadf(**overrides: object) -> Dadf:
    return Dadf(**{**TINY_MODEL, "reconstruction_epochs": 1, "flow_epochs": 1, "pre_processor": small_pre_processor(),
                   **overrides})


@pytest.mark.parametrize("backbone", ["wide_resnet50_2.tv_in1k", "resnet18.tv_in1k"])
def test_torchvision_weights_are_named_by_a_tag_timm_resolves_without_downloading(backbone: str) -> None:
    config = timm.models.get_pretrained_cfg(backbone)
    assert config.tag == "tv_in1k"
    assert config.hf_hub_id == f"timm/{backbone}"
    untagged = describe_prior(backbone.split(".")[0], ["layer1", "layer2", "layer3"])
    assert describe_prior(backbone, ["layer1", "layer2", "layer3"]) == untagged
    assert Dadf(**{**TINY_MODEL, "backbone": "resnet18.tv_in1k"}).model.input_size == (256, 256)


def test_the_paper_config_and_the_default_name_the_torchvision_weights() -> None:
    assert Dadf.__init__.__defaults__[0] == "wide_resnet50_2.tv_in1k"
    assert "backbone: wide_resnet50_2.tv_in1k" in (REPO / "configs" / "dadf.yaml").read_text()


def test_transformer_starts_xavier_uniform_with_zero_biases() -> None:
    torch.manual_seed(0)
    transformer = DualAttentionTransformer(channels=(64, 128, 256), patch_sizes=(4, 2, 1), grid_size=(8, 8),
                                           embed_dim=96, depth=2, num_heads=4)
    layers = [m for m in transformer.modules() if isinstance(m, torch.nn.Linear | torch.nn.Conv2d)]
    assert len(layers) == 3 + 2 * 4 + 3, "patch embeddings, qkv/proj/fc1/fc2 per block, heads"
    for layer in layers:
        weight = layer.weight.reshape(layer.weight.shape[0], -1)
        bound = (6 / sum(weight.shape)) ** 0.5
        assert weight.abs().max() <= bound
        assert weight.std().item() == pytest.approx(bound / 3**0.5, rel=0.1)
        assert not layer.bias.any()


class FlowSnapshot(Callback):
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        del trainer
        self.flows = {name: value.detach().clone() for name, value in pl_module.model.flows.state_dict().items()}


def flows_after_one_flow_epoch(root: Path, tmp_path: Path, batch_size: int, flow_batch_size: int) -> dict:
    seed_everything(0)
    # Stage 1 leaves the Transformer as it was (learning rate 0), so both runs give the flows the same input.
    model = tiny_dadf(flow_batch_size=flow_batch_size, reconstruction_lr=0.0)
    datamodule = MVTec(root=root, category="widget", num_workers=0)
    datamodule.setup()
    loader = DataLoader(datamodule.train_data, batch_size=batch_size, shuffle=False,
                        collate_fn=datamodule.train_data.collate_fn)
    snapshot = FlowSnapshot()
    Engine(default_root_dir=tmp_path, accelerator="cpu", devices=1, callbacks=[snapshot], logger=False).fit(
        model=model, train_dataloaders=loader,
    )
    return snapshot.flows


def test_accumulating_two_batches_gives_the_flow_update_of_one_batch_twice_as_large(mvtec_root, tmp_path) -> None:
    accumulated = flows_after_one_flow_epoch(mvtec_root, tmp_path / "a", batch_size=4, flow_batch_size=8)
    whole = flows_after_one_flow_epoch(mvtec_root, tmp_path / "b", batch_size=8, flow_batch_size=8)
    stepped = flows_after_one_flow_epoch(mvtec_root, tmp_path / "c", batch_size=4, flow_batch_size=4)
    assert all(torch.allclose(accumulated[name], whole[name], atol=1e-5) for name in whole)
    assert not all(torch.allclose(stepped[name], whole[name], atol=1e-5) for name in whole), "two steps differ"


def test_a_flow_batch_size_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="flow_batch_size must be at least 1, got 0"):
        tiny_dadf(flow_batch_size=0)


def normalisation(model: Dadf) -> Normalize:
    return next(t for t in model.pre_processor.transform.transforms if isinstance(t, Normalize))


def test_default_pre_processor_takes_the_backbones_own_statistics() -> None:
    lite = Dadf(**{**TINY_MODEL, "backbone": "tf_efficientnet_lite0", "layers": ["blocks.1", "blocks.2", "blocks.4"]})
    assert normalisation(lite).mean == [0.5, 0.5, 0.5]
    assert normalisation(lite).std == [0.5, 0.5, 0.5]
    assert normalisation(Dadf(**TINY_MODEL)).mean == [0.485, 0.456, 0.406]
    assert input_statistics("not_a_timm_model") == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


# Feature cache ---------------------------------------------------------------------------------------------------


class Recorder(Callback):
    """Training losses, validation scores and whether each training batch held real images."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.validation_scores: list[torch.Tensor] = []
        self.blank_batches: list[bool] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        del trainer, pl_module, batch_idx
        self.losses.append(float(outputs["loss"]))
        self.blank_batches.append(bool((batch.image.amax(dim=(0, 2, 3)) == batch.image.amin(dim=(0, 2, 3))).all()))

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        del trainer, pl_module, batch, batch_idx, dataloader_idx
        self.validation_scores.append(outputs.pred_score.detach().clone())


def train_counting_calls(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, validate: bool = False, **overrides: object,
) -> tuple[Recorder, dict[str, int], Engine]:
    seed_everything(0)
    model = tiny_dadf(reconstruction_epochs=2, flow_epochs=2, **overrides)
    calls = {"extract_priors": 0, "reconstruct": 0, "read_image": 0}
    for name in ("extract_priors", "reconstruct"):
        original = getattr(model.model, name)

        def counted(*args: object, _original=original, _name=name) -> object:
            calls[_name] += 1
            return _original(*args)

        setattr(model.model, name, counted)
    def counted_read(*args: object, **kwargs: object) -> object:
        calls["read_image"] += 1
        return read_image(*args, **kwargs)

    monkeypatch.setattr(anomalib_image_dataset, "read_image", counted_read)
    recorder = Recorder()
    datamodule = MVTec(root=root, category="widget", train_batch_size=4, num_workers=0)
    engine = Engine(default_root_dir=tmp_path, accelerator="cpu", devices=1, callbacks=[recorder], logger=False,
                    limit_val_batches=1.0 if validate else 0)
    engine.fit(model=model, datamodule=datamodule)
    return recorder, calls, engine


def test_cache_gives_the_same_losses_and_is_used_in_both_stages(mvtec_root, tmp_path, monkeypatch) -> None:
    cached, cached_calls, engine = train_counting_calls(mvtec_root, tmp_path / "cached", monkeypatch)
    plain, plain_calls, _ = train_counting_calls(mvtec_root, tmp_path / "plain", monkeypatch, cache_features=False)
    assert torch.allclose(torch.tensor(cached.losses), torch.tensor(plain.losses), rtol=1e-5)
    batches = len(plain.losses) // 4  # per epoch: 2 + 2 epochs
    images = len(engine.trainer.train_dataloader.dataset)
    assert plain_calls == {"extract_priors": 4 * batches, "reconstruct": 4 * batches, "read_image": 4 * images}
    # Priors once (the first epoch), reconstructions for stage 1's two epochs and once in stage 2; the
    # images are read in the first epoch only.
    assert cached_calls == {"extract_priors": batches, "reconstruct": 3 * batches, "read_image": images}
    assert cached.blank_batches == [False] * batches + [True] * 3 * batches
    assert not any(plain.blank_batches)
    assert isinstance(engine.trainer.train_dataloader.dataset, AnomalibDataset), "the loader reads images again"


def test_validation_priors_are_cached_and_give_the_same_scores(mvtec_root, tmp_path, monkeypatch) -> None:
    cached, cached_calls, engine = train_counting_calls(mvtec_root, tmp_path / "cached", monkeypatch, validate=True)
    plain, plain_calls, _ = train_counting_calls(
        mvtec_root, tmp_path / "plain", monkeypatch, validate=True, cache_features=False,
    )
    assert len(cached.validation_scores) == len(plain.validation_scores) > 0
    for with_cache, without in zip(cached.validation_scores, plain.validation_scores, strict=True):
        assert torch.allclose(with_cache, without, rtol=1e-5)
    training_batches = len(cached.losses) // 4
    validation_batches = len(cached.validation_scores) // 4
    assert validation_batches == len(engine.trainer.val_dataloaders)
    assert cached_calls["extract_priors"] == training_batches + validation_batches
    assert plain_calls["extract_priors"] == 4 * (training_batches + validation_batches)


def test_a_prior_lost_after_the_images_stopped_being_read_stops_the_run(mvtec_root, tmp_path) -> None:
    class LoseThePriors(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            del trainer, batch, batch_idx
            if pl_module.current_epoch == 2:  # the loader has delivered blanks since epoch 1
                pl_module._cache.close()

    seed_everything(0)
    model = tiny_dadf(reconstruction_epochs=2, flow_epochs=2)
    datamodule = MVTec(root=mvtec_root, category="widget", train_batch_size=4, num_workers=0)
    engine = Engine(default_root_dir=tmp_path, accelerator="cpu", devices=1, callbacks=[LoseThePriors()],
                    logger=False, limit_val_batches=0)
    with pytest.raises(RuntimeError, match="lost a training image's prior after the images stopped being read"):
        engine.fit(model=model, datamodule=datamodule)


def test_cache_is_skipped_with_a_log_line_when_training_images_are_augmented(mvtec_root, tmp_path, caplog) -> None:
    seed_everything(0)
    model = tiny_dadf()
    datamodule = MVTec(root=mvtec_root, category="widget", train_batch_size=4, num_workers=0,
                       train_augmentations=ColorJitter(brightness=0.5))
    with caplog.at_level(logging.INFO, logger="anomalib_dadf.lightning_model"):
        Engine(default_root_dir=tmp_path, accelerator="cpu", devices=1, logger=False).fit(
            model=model, datamodule=datamodule,
        )
    assert "feature cache is off: the data module augments training images" in caplog.text


def test_a_loader_delivers_blanks_without_workers_and_gets_its_images_and_workers_back(mvtec_root: Path) -> None:
    dataset = MVTecADDataset(root=mvtec_root, category="widget", split="train")
    loader = DataLoader(dataset, batch_size=2, num_workers=2, collate_fn=dataset.collate_fn)
    assert skip_reading_images(loader, (16, 24))
    assert delivers_blanks(loader)
    assert not skip_reading_images(loader, (16, 24)), "blanks are not wrapped twice"
    assert isinstance(loader.dataset.dataset, MVTecADDataset)
    assert loader.num_workers == 0
    blank = loader.dataset[1]
    assert torch.equal(blank.image, torch.zeros(3, 16, 24))
    assert blank.image_path == dataset.samples.iloc[1].image_path
    assert int(blank.gt_label) == int(dataset.samples.iloc[1].label_index)
    read_images_again(loader)
    assert loader.dataset is dataset
    assert loader.num_workers == 2


def test_a_cache_beyond_its_memory_budget_is_memory_mapped_and_gives_the_same_values(tmp_path: Path) -> None:
    cache = FeatureCache(capacity=3, budget_bytes=10, directory=tmp_path)
    first = cache.get(["a", "b"], lambda: [torch.arange(12.0).reshape(2, 6)])
    assert cache.on_disk
    assert cache.memory_bytes == 0
    assert len(list(tmp_path.glob("dadf-cache-*/*.f32"))) == 1
    assert torch.equal(cache.get(["b", "a"], lambda: pytest.fail("recomputed"))[0], first[0].flip(0))
    cache.close()
    assert not list(tmp_path.glob("dadf-cache-*"))
