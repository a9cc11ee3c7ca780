"""Two-stage training of the Lightning module: stages, optimizers, losses, checkpoints, bad config."""

from pathlib import Path

import pytest
import torch
from anomalib.callbacks import ModelCheckpoint
from anomalib.engine import Engine
from lightning.pytorch import Callback, LightningModule, Trainer

from anomalib_dadf import Dadf, DadfModel
from anomalib_dadf.data import MVTec
from anomalib_dadf.lightning_model import Stage
from anomalib_dadf.loss import FlowLoss, ReconstructionLoss

from .conftest import TINY_MODEL, small_pre_processor


def tiny_dadf(**overrides: object) -> Dadf:
    arguments = {**TINY_MODEL, "reconstruction_epochs": 1, "flow_epochs": 1, **overrides}
    arguments.setdefault("pre_processor", small_pre_processor())
    return Dadf(**arguments)


def datamodule(root: Path) -> MVTec:
    return MVTec(root=root, category="widget", train_batch_size=4, eval_batch_size=4, num_workers=0)


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: parameter.detach().clone() for name, parameter in module.named_parameters()}


def changed(before: dict[str, torch.Tensor], module: torch.nn.Module) -> set[str]:
    return {name for name, parameter in module.named_parameters() if not torch.equal(before[name], parameter)}


class EpochSnapshots(Callback):
    """Parameters of the backbone, Transformer and flows at the start of each epoch and at the end."""

    def __init__(self) -> None:
        self.snapshots: list[dict[str, dict[str, torch.Tensor]]] = []
        self.stages: list[Stage] = []

    def _take(self, module: Dadf) -> None:
        parts = ("feature_extractor", "transformer", "flows")
        self.snapshots.append({part: snapshot(getattr(module.model, part)) for part in parts})

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        del trainer
        self.stages.append(pl_module.stage)
        self._take(pl_module)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        del trainer
        self._take(pl_module)


def test_stages_train_exactly_their_own_parameters(mvtec_root: Path, tmp_path: Path) -> None:
    model = tiny_dadf(reconstruction_epochs=1, flow_epochs=1)
    spy = EpochSnapshots()
    Engine(default_root_dir=tmp_path, callbacks=[spy], accelerator="cpu", devices=1).fit(
        model=model,
        datamodule=datamodule(mvtec_root),
    )
    assert spy.stages == [Stage.RECONSTRUCTION, Stage.FLOW]
    start, after_reconstruction, _ = spy.snapshots
    model_parts = model.model
    # Stage 1: every Transformer parameter moved, nothing else did.
    assert changed(start["transformer"], model_parts.transformer) == set(start["transformer"])
    assert all(torch.equal(start["flows"][name], after_reconstruction["flows"][name]) for name in start["flows"])
    # Stage 2: the flows' trainable parameters moved, the Transformer did not.
    assert not changed(after_reconstruction["transformer"], model_parts.transformer)
    trainable_flow = {name for name, parameter in model_parts.flows.named_parameters() if parameter.requires_grad}
    assert changed(after_reconstruction["flows"], model_parts.flows) == trainable_flow
    # The backbone never moves and never asks for gradients.
    assert not changed(start["feature_extractor"], model_parts.feature_extractor)
    assert not any(parameter.requires_grad for parameter in model_parts.feature_extractor.parameters())


class Unusable(torch.nn.Module):
    """Stands in for a part that must not run."""

    def forward(self, *args: object) -> None:
        del args
        msg = "this part ran"
        raise AssertionError(msg)


def test_a_flow_on_the_prior_alone_neither_trains_nor_runs_the_transformer(mvtec_root: Path, tmp_path: Path) -> None:
    model = tiny_dadf(reconstruction_epochs=3, flow_epochs=1, flow_inputs=["prior"])
    assert model.trainer_arguments["max_epochs"] == 1
    spy = EpochSnapshots()
    Engine(default_root_dir=tmp_path, callbacks=[spy], accelerator="cpu", devices=1).fit(
        model=model,
        datamodule=datamodule(mvtec_root),
    )
    assert spy.stages == [Stage.FLOW]
    start, _ = spy.snapshots
    assert not changed(start["transformer"], model.model.transformer)
    assert changed(start["flows"], model.model.flows)
    model.model.transformer = Unusable()
    output = model.model.eval()(torch.rand(2, 3, 64, 64))
    assert output.anomaly_map.shape == (2, 1, 64, 64)
    assert torch.isfinite(output.anomaly_map).all()


def test_a_seed_makes_the_network_repeat_whatever_ran_before() -> None:
    first = tiny_dadf(seed=3).model.state_dict()
    torch.rand(100)
    again = tiny_dadf(seed=3).model.state_dict()
    unseeded = tiny_dadf().model.state_dict()
    assert all(torch.equal(first[key], again[key]) for key in first)
    assert not all(torch.equal(first[key], unseeded[key]) for key in first)


def test_model_runs_the_sum_of_both_stages() -> None:
    model = tiny_dadf(reconstruction_epochs=3, flow_epochs=2)
    assert model.trainer_arguments["max_epochs"] == 5
    optimizers = model.configure_optimizers()
    assert isinstance(optimizers[0], torch.optim.AdamW)
    assert optimizers[0].defaults["betas"] == (0.9, 0.95)
    assert isinstance(optimizers[1], torch.optim.Adam)
    assert optimizers[1].defaults["weight_decay"] == pytest.approx(1e-5)


@pytest.mark.parametrize("name", ["reconstruction_epochs", "flow_epochs"])
def test_a_stage_without_epochs_is_refused(name: str) -> None:
    with pytest.raises(ValueError, match=f"{name} must be at least 1"):
        tiny_dadf(**{name: 0})


def test_input_size_the_grid_cannot_take_is_refused_at_construction() -> None:
    with pytest.raises(ValueError, match=r"Input size 72x72 does not fit the token grid"):
        tiny_dadf(pre_processor=small_pre_processor(72))


def test_unknown_backbone_is_refused_at_construction() -> None:
    with pytest.raises(ValueError, match="Unknown backbone 'resnet1800'"):
        tiny_dadf(backbone="resnet1800")


def test_losses_go_down_on_tiny_data() -> None:
    torch.manual_seed(0)
    model = DadfModel((64, 64), **TINY_MODEL)
    images = torch.randn(4, 3, 64, 64)
    priors = model.extract_priors(images)

    reconstruction = ReconstructionLoss()
    optimizer = torch.optim.AdamW(model.transformer.parameters(), lr=1e-3)
    losses = []
    for _ in range(15):
        loss = reconstruction(priors, *model.reconstruct(priors))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]

    with torch.no_grad():
        local, global_ = model.reconstruct(priors)
    flow_loss = FlowLoss()
    optimizer = torch.optim.Adam(model.flows.parameters(), lr=1e-3)
    losses = []
    for _ in range(15):
        loss = flow_loss(*model.discriminate(priors, local, global_))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


def test_checkpoint_restores_its_own_input_size(mvtec_root: Path, tmp_path: Path) -> None:
    engine = Engine(default_root_dir=tmp_path, accelerator="cpu", devices=1)
    model = tiny_dadf(pre_processor=small_pre_processor(48))
    engine.fit(model=model, datamodule=datamodule(mvtec_root))
    checkpoint = engine.trainer.checkpoint_callback.best_model_path

    restored = Dadf.load_from_checkpoint(checkpoint)  # built at the default 256x256, then rebuilt at 48x48
    assert restored.model.input_size == (48, 48)
    model.eval()
    restored.eval()
    images = torch.rand(2, 3, 90, 70)
    assert torch.allclose(model(images).anomaly_map, restored(images).anomaly_map, atol=1e-5)


def test_testing_a_checkpoint_with_other_model_arguments_uses_the_checkpoints(mvtec_root: Path, tmp_path: Path) -> None:
    """``anomalib test --model anomalib_dadf.Dadf --ckpt_path CKPT`` without repeating the training arguments."""
    engine = Engine(default_root_dir=tmp_path, accelerator="cpu", devices=1)
    engine.fit(model=tiny_dadf(), datamodule=datamodule(mvtec_root))
    checkpoint = engine.trainer.checkpoint_callback.best_model_path
    (trained,) = engine.test(model=tiny_dadf(), datamodule=datamodule(mvtec_root), ckpt_path=checkpoint)

    other = tiny_dadf(embed_dim=32, depth=2, flow_steps=4, flow_subnet="conv", anomaly_map="log_likelihood",
                      score_layers=["layer3"], score_top_fraction=0.5, prior_pooling=3)
    (tested,) = Engine(default_root_dir=tmp_path / "other", accelerator="cpu", devices=1).test(
        model=other, datamodule=datamodule(mvtec_root), ckpt_path=checkpoint,
    )
    assert (other.hparams["embed_dim"], other.hparams["depth"], other.hparams["flow_subnet"]) == (16, 1, "depthwise")
    assert other.model.anomaly_map_generator.kind == "probability", "thresholds were set on the checkpoint's map"
    assert other.model.anomaly_map_generator.score_scales is None, "and on the checkpoint's scores"
    assert other.model.anomaly_map_generator.score_positions is None
    assert isinstance(other.model.prior_pooling, torch.nn.Identity), "and on the checkpoint's (unpooled) prior"
    assert tested["image_AUROC"] == pytest.approx(trained["image_AUROC"])


def test_a_checkpoint_of_another_model_is_named(tmp_path: Path) -> None:
    foreign = tmp_path / "patchcore.ckpt"
    state = {"state_dict": {"model.memory_bank": torch.zeros(4, 8)}, "hyper_parameters": {}}
    torch.save({**state, "pytorch-lightning_version": "2.6.6"}, foreign)
    with pytest.raises(ValueError, match=r"not a DADF checkpoint \(its model holds \['memory_bank'\]"):
        Dadf.load_from_checkpoint(foreign)


def test_resuming_in_the_flow_stage_keeps_the_transformer(mvtec_root: Path, tmp_path: Path) -> None:
    every_epoch = ModelCheckpoint(dirpath=tmp_path / "every", filename="{epoch}", save_top_k=-1, every_n_epochs=1)
    first = Engine(default_root_dir=tmp_path / "first", callbacks=[every_epoch], accelerator="cpu", devices=1)
    first.fit(model=tiny_dadf(reconstruction_epochs=2, flow_epochs=2), datamodule=datamodule(mvtec_root))
    end_of_stage_1 = tmp_path / "every" / "epoch=1.ckpt"
    saved = torch.load(end_of_stage_1, weights_only=False)
    assert all(state["state"] for state in saved["optimizer_states"][:1])
    assert not saved["optimizer_states"][1]["state"]

    spy = EpochSnapshots()
    resumed_model = tiny_dadf(reconstruction_epochs=2, flow_epochs=2)
    second = Engine(default_root_dir=tmp_path / "second", callbacks=[spy], accelerator="cpu", devices=1)
    second.fit(model=resumed_model, datamodule=datamodule(mvtec_root), ckpt_path=end_of_stage_1)

    assert spy.stages == [Stage.FLOW, Stage.FLOW]
    transformer_at_resume = {
        name.removeprefix("model.transformer."): tensor
        for name, tensor in saved["state_dict"].items()
        if name.startswith("model.transformer.")
    }
    assert not changed(transformer_at_resume, resumed_model.model.transformer)
    final = torch.load(second.trainer.checkpoint_callback.best_model_path, weights_only=False)
    assert final["epoch"] == 3
    assert all(state["state"] for state in final["optimizer_states"])

