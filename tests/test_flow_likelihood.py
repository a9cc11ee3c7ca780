"""The flows' likelihood of held-out normal images, the stop of flow training on it, and the exact objective."""

import itertools
import math
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from anomalib.engine import Engine
from anomalib.models.image.fastflow.torch_model import FastflowModel
from lightning.pytorch import Callback, LightningModule, Trainer

from anomalib_dadf.benchmark import TimmFastflow
from anomalib_dadf.components import DiscriminativeFlow
from anomalib_dadf.data import MVTec
from anomalib_dadf.lightning_model import Stage
from anomalib_dadf.loss import FlowLoss
from anomalib_dadf.metrics import (
    HELD_OUT_FLOW_NLL,
    HeldOutFlowNll,
    PerFlowStop,
    held_out_flow_nll_key,
    with_norm_log_jacobians,
)

from .conftest import small_pre_processor
from .test_training import datamodule, tiny_dadf


class LoggedNll(Callback):
    """The stage and the logged held-out NLL (``None`` when not logged) of every training epoch."""

    def __init__(self) -> None:
        self.epochs: list[tuple[Stage | None, float | None]] = []

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        value = trainer.callback_metrics.get(HELD_OUT_FLOW_NLL)
        self.epochs.append((getattr(pl_module, "stage", None), None if value is None else float(value)))
        trainer.callback_metrics.pop(HELD_OUT_FLOW_NLL, None)


def fit(
    model: LightningModule, root: Path, tmp_path: Path, callbacks: Sequence[Callback] = (), **trainer_arguments: object,
) -> LoggedNll:
    spy = LoggedNll()
    engine = Engine(
        default_root_dir=tmp_path,
        callbacks=[spy, *callbacks],
        accelerator="cpu",
        devices=1,
        logger=False,
        **trainer_arguments,
    )
    engine.fit(
        model=model, datamodule=datamodule(root),
    )
    return spy


def test_held_out_nll_counts_normal_images_and_the_norms_log_determinant() -> None:
    torch.manual_seed(0)
    flow = DiscriminativeFlow((4, 3, 3), num_views=1, flow_steps=2)
    features = torch.randn(4, 4, 3, 3)
    latent, log_jacobian = flow(features)
    labels = torch.tensor([0, 1, 0, 1])

    metric = HeldOutFlowNll()
    metric.update([latent], [log_jacobian], [flow.norm], labels)
    normal = labels == 0
    expected = FlowLoss()([latent[normal]], [log_jacobian[normal]]) / latent[0].numel()
    assert metric.compute().item() == pytest.approx(expected.item(), rel=1e-5)

    # The same latents with the norm's affine map doubling every feature: each dimension is log 2 more likely.
    with torch.no_grad():
        flow.norm.weight.fill_(2.0)
    doubled = HeldOutFlowNll()
    doubled.update([latent], [log_jacobian], [flow.norm], labels)
    assert doubled.compute().item() == pytest.approx(expected.item() - math.log(2.0), rel=1e-5)

    nothing = HeldOutFlowNll()
    nothing.update([latent], [log_jacobian], [flow.norm], torch.ones(4))
    nothing.update([latent], [log_jacobian], [flow.norm], None)
    assert not nothing.measured


@pytest.mark.parametrize("objective", ["paper", "exact"])
def test_only_the_paper_objective_shrinks_the_norm_in_front_of_the_flow(objective: str) -> None:
    torch.manual_seed(0)
    flow = DiscriminativeFlow((4, 4, 4), num_views=1, flow_steps=2, subnet="conv")
    features = torch.randn(32, 4, 4, 4)
    optimizer = torch.optim.Adam(flow.parameters(), lr=1e-2)
    for _ in range(150):
        latents, log_jacobians = flow(features)
        if objective == "exact":
            log_jacobians = with_norm_log_jacobians([log_jacobians], [flow.norm])[0]
        loss = FlowLoss()([latents], [log_jacobians])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    mean_log_scale = torch.log(flow.norm.weight.abs()).mean().item()
    if objective == "paper":
        assert mean_log_scale < -0.5, "the paper's loss falls as the norm's weights shrink, so they do"
    else:
        assert abs(mean_log_scale) < 0.2


def test_flow_stage_stops_when_the_held_out_nll_stalls_and_stage_one_is_not_counted(
    mvtec_root: Path, tmp_path: Path,
) -> None:
    # Flows that cannot learn (learning rate 0) never improve their held-out NLL.
    model = tiny_dadf(reconstruction_epochs=2, flow_epochs=10, flow_patience=2, flow_lr=0.0)
    spy = fit(model, mvtec_root, tmp_path)
    stages = [stage for stage, _ in spy.epochs]
    assert stages == [Stage.RECONSTRUCTION] * 2 + [Stage.FLOW] * 3, "best at the first flow epoch, then 2 without"
    assert all(value is None for _, value in spy.epochs[:2]), "untrained flows are not measured"
    assert all(value is not None and math.isfinite(value) for _, value in spy.epochs[2:])
    assert len({value for _, value in spy.epochs[2:]}) == 1


def test_without_patience_the_flows_train_all_their_epochs_and_the_nll_is_still_logged(
    mvtec_root: Path, tmp_path: Path,
) -> None:
    model = tiny_dadf(reconstruction_epochs=1, flow_epochs=3, flow_lr=0.0)
    spy = fit(model, mvtec_root, tmp_path)
    assert [stage for stage, _ in spy.epochs] == [Stage.RECONSTRUCTION] + [Stage.FLOW] * 3
    assert all(value is not None for _, value in spy.epochs[1:])


@pytest.mark.parametrize(("split", "warned"), [("from_test", True), ("same_as_test", True), ("from_train", False)])
def test_a_stop_on_validation_images_from_the_test_set_is_warned_about(
    mvtec_root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, split: str, warned: bool,
) -> None:
    data = MVTec(root=mvtec_root, category="widget", train_batch_size=4, num_workers=0, val_split_mode=split)
    Engine(default_root_dir=tmp_path, accelerator="cpu", devices=1, logger=False).fit(
        model=tiny_dadf(reconstruction_epochs=1, flow_epochs=1, flow_patience=1), datamodule=data,
    )
    assert ("takes them from the test set" in caplog.text) is warned


def test_a_flow_patience_or_objective_that_cannot_work_fails_at_construction() -> None:
    with pytest.raises(ValueError, match="flow_patience must be at least 1"):
        tiny_dadf(flow_patience=0)
    with pytest.raises(ValueError, match="Unknown flow_objective 'likelihood'"):
        tiny_dadf(flow_objective="likelihood")
    with pytest.raises(ValueError, match="flow_patience must be at least 1"):
        TimmFastflow(backbone="resnet18", pre_trained=False, flow_patience=0)


def assert_both_models_warn(caplog: pytest.LogCaptureFixture, warning: str, warned: bool, **arguments: object) -> None:
    """DADF and the benchmark's FastFlow, built with ``arguments``, each log ``warning`` exactly when ``warned``."""
    for build in (tiny_dadf, lambda **given: TimmFastflow(backbone="resnet18", pre_trained=False, **given)):
        caplog.clear()
        build(**arguments)
        assert (warning in caplog.text) is warned


@pytest.mark.parametrize(("objective", "warned"), [("paper", True), ("exact", False)])
def test_the_density_map_on_the_papers_objective_is_warned_about(
    caplog: pytest.LogCaptureFixture, objective: str, warned: bool,
) -> None:
    assert_both_models_warn(
        caplog, "would score a degenerate density", warned, anomaly_map="density", flow_objective=objective,
    )


def tiny_fastflow(**overrides: object) -> TimmFastflow:
    return TimmFastflow(
        backbone="resnet18", pre_trained=False, flow_steps=2, pre_processor=small_pre_processor(), **overrides,
    )


def test_fastflow_validation_scores_as_anomalib_and_measures_the_held_out_nll() -> None:
    torch.manual_seed(0)
    model = tiny_fastflow().eval()
    images = torch.rand(4, 3, 64, 64)
    expected = FastflowModel.forward(model.model, images)
    batch = model.validation_step(_Batch(image=images, gt_label=torch.tensor([0, 0, 1, 1])))
    assert torch.equal(batch.anomaly_map, expected.anomaly_map)
    assert torch.equal(batch.pred_score, expected.pred_score)
    assert not model.model.training
    assert model.held_out_flow_nll.measured
    assert model.held_out_flow_nll.weight == 2


def test_fastflow_exact_objective_adds_the_norms_log_determinant(monkeypatch: pytest.MonkeyPatch) -> None:
    losses = {}
    for objective in ("paper", "exact"):
        torch.manual_seed(0)
        model = tiny_fastflow(flow_objective=objective).train()
        with torch.no_grad():
            for norm in model.model.norms:
                norm.weight.fill_(0.5)
        monkeypatch.setattr(model, "log", lambda *args, **kwargs: None)
        torch.manual_seed(1)
        losses[objective] = model.training_step(_Batch(image=torch.rand(2, 3, 64, 64)))["loss"].item()
    dimensions = sum(norm.weight.numel() for norm in model.model.norms)
    assert losses["exact"] == pytest.approx(losses["paper"] - dimensions * math.log(0.5), rel=1e-5)


def test_fastflow_stops_on_the_held_out_nll(mvtec_root: Path, tmp_path: Path) -> None:
    model = tiny_fastflow(flow_patience=1)
    # Flows that cannot learn (learning rate 0) never improve their held-out NLL.
    model.configure_optimizers = lambda: torch.optim.Adam(model.model.parameters(), lr=0.0)
    spy = fit(model, mvtec_root, tmp_path, max_epochs=5)
    assert len(spy.epochs) == 2, "best at the first epoch, then one without improvement"
    assert all(value is not None for _, value in spy.epochs)


class _Batch:
    """A stand-in for anomalib's batch: the fields a step reads, and ``update`` as anomalib's returns a copy."""

    def __init__(self, **fields: torch.Tensor) -> None:
        self.__dict__.update({"gt_label": None, **fields})

    def update(self, **fields: torch.Tensor) -> "_Batch":
        return _Batch(**{**self.__dict__, **fields})


def test_the_density_map_leaves_training_and_the_held_out_nll_as_they_were(mvtec_root: Path, tmp_path: Path) -> None:
    # Only scoring reads the per-position log-determinants; the stop must see the same likelihood either way.
    logged = {}
    for anomaly_map in ("probability", "density"):
        torch.manual_seed(0)
        model = tiny_dadf(flow_inputs=["prior"], flow_epochs=3, flow_objective="exact", anomaly_map=anomaly_map)
        logged[anomaly_map] = [value for _, value in fit(model, mvtec_root, tmp_path / anomaly_map).epochs]
    assert all(value is not None for value in logged["density"])
    assert logged["density"] == pytest.approx(logged["probability"], rel=1e-5)


def test_fastflow_measures_the_same_held_out_nll_from_per_position_log_determinants() -> None:
    torch.manual_seed(0)
    model = TimmFastflow(backbone="resnet18", pre_trained=False, flow_steps=2, anomaly_map="density").eval()
    images, labels = torch.rand(3, 3, 256, 256), torch.tensor([0, 0, 1])  # its default input size
    nlls = []
    for per_position in (False, True):
        metric = HeldOutFlowNll()
        with torch.no_grad():
            metric.update(*model.model.flow(images, per_position=per_position), list(model.model.norms), labels)
        nlls.append(metric.compute().item())
    assert nlls[1] == pytest.approx(nlls[0], rel=1e-5)
    scores = model.model(images)
    assert scores.anomaly_map.shape == (3, 1, 256, 256)
    assert torch.equal(scores.pred_score, scores.anomaly_map.amax(dim=(-2, -1)))


class _Flows(torch.nn.Module):
    """Two 'flows' for the per-flow stop: each a linear layer and a parameter that never trains."""

    def __init__(self) -> None:
        super().__init__()
        self.scales = torch.nn.ModuleList(torch.nn.Linear(2, 2) for _ in range(2))
        for scale in self.scales:
            scale.register_parameter("fixed", torch.nn.Parameter(torch.ones(1), requires_grad=False))

    def flow_scales(self) -> list[torch.nn.Module]:
        return list(self.scales)


def _validated(stop: PerFlowStop, trainer: SimpleNamespace, module: _Flows, values: list[float] | None) -> None:
    trainer.callback_metrics = {} if values is None else {
        held_out_flow_nll_key(scale): torch.tensor(value) for scale, value in enumerate(values)
    }
    stop.on_validation_end(trainer, module)
    trainer.current_epoch += 1


def test_the_per_flow_stop_stops_each_flow_on_its_own_nll_and_leaves_it_untouched_by_the_optimizer() -> None:
    module, stop = _Flows(), PerFlowStop(patience=2)
    trainer = SimpleNamespace(sanity_checking=False, current_epoch=0, should_stop=False, callback_metrics={})
    _validated(stop, trainer, module, None)  # an epoch without the metrics (DADF's stage 1) is not counted
    for values in ([1.0, 1.0], [0.9, 1.0], [0.8, 1.0005]):  # flow 1 stalls (a gain under 1e-3 is none)
        _validated(stop, trainer, module, values)
    assert stop.stopped == {1: 3}
    assert not trainer.should_stop
    assert [parameter.requires_grad for parameter in module.scales[1].parameters()] == [False, False, False]
    assert all(parameter.requires_grad for name, parameter in module.scales[0].named_parameters() if name != "fixed")

    optimizer = torch.optim.Adam(module.parameters(), lr=0.1, weight_decay=0.1)
    before = [parameter.detach().clone() for parameter in module.parameters()]
    optimizer.zero_grad()
    sum(scale(torch.ones(1, 2)).sum() for scale in module.scales).backward()
    optimizer.step()
    moved = [not torch.equal(old, new) for old, new in zip(before, module.parameters(), strict=True)]
    assert moved == [True, True, False, False, False, False], "only flow 0's weight and bias move"

    for values in ([0.8, 0.5], [0.8, 0.5]):  # flow 1's NLL no longer counts once it stopped
        _validated(stop, trainer, module, values)
    assert stop.stopped == {1: 3, 0: 5}
    assert trainer.should_stop

    resumed = PerFlowStop(patience=2)
    resumed.load_state_dict(stop.state_dict())
    assert (resumed.best, resumed.waited, resumed.stopped) == (stop.best, stop.waited, stop.stopped)

    stop.on_fit_end(trainer, module)
    trainable = [(name, parameter.requires_grad) for name, parameter in module.named_parameters()]
    assert all(flag == (not name.endswith("fixed")) for name, flag in trainable), "as found, fixed ones stay fixed"


def script_flow_nlls(model: LightningModule) -> None:
    """Each flow's held-out NLL as logged: the finest flow improves every epoch, the others stall."""
    for scale, metric in enumerate(model.held_out_flow_nlls):
        metric.compute = lambda scale=scale: torch.tensor(-float(model.current_epoch) if scale == 0 else 0.0)


@pytest.mark.parametrize("model_kind", ["dadf", "fastflow"])
def test_with_the_per_flow_stop_a_stalled_flow_keeps_its_weights_while_the_others_train(
    mvtec_root: Path, tmp_path: Path, model_kind: str,
) -> None:
    torch.manual_seed(0)
    if model_kind == "dadf":
        model = tiny_dadf(flow_inputs=["prior"], flow_epochs=4, flow_patience=1, flow_stop="per_flow", flow_lr=1e-2)
    else:
        model = tiny_fastflow(flow_patience=1, flow_stop="per_flow")
    script_flow_nlls(model)
    snapshots = FlowSnapshots()
    spy = fit(model, mvtec_root, tmp_path, callbacks=[snapshots], max_epochs=4)
    stop = next(callback for callback in model.trainer.callbacks if isinstance(callback, PerFlowStop))
    scales = len(model.flow_scales())
    assert {held_out_flow_nll_key(scale) for scale in range(scales)} <= set(model.trainer.callback_metrics)
    assert stop.stopped == dict.fromkeys(range(1, scales), 1), "best at epoch 0, one epoch without improvement"
    assert len(spy.epochs) == 4, "the finest flow never stalls, so training runs to the cap"
    finest = [state[0] for state in snapshots.epochs]
    assert all(not torch.equal(before, after) for before, after in itertools.pairwise(finest)), "it trains every epoch"
    for scale in range(1, scales):
        assert not torch.equal(snapshots.epochs[1][scale], snapshots.epochs[2][scale]), "trained until it stopped"
        assert all(torch.equal(state[scale], snapshots.epochs[2][scale]) for state in snapshots.epochs[2:])
    assert all(parameter.requires_grad for parameter in snapshots.trainable), "trainable again after the fit"


class FlowSnapshots(Callback):
    """Each flow's parameters (one flat tensor per scale) after every training epoch; the trainable ones."""

    def __init__(self) -> None:
        self.epochs: list[list[torch.Tensor]] = []
        self.trainable: list[torch.nn.Parameter] = []

    def _take(self, pl_module: LightningModule) -> list[torch.Tensor]:
        return [torch.cat([p.detach().flatten() for p in scale.parameters()]) for scale in pl_module.flow_scales()]

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        del trainer
        self.trainable = [p for scale in pl_module.flow_scales() for p in scale.parameters() if p.requires_grad]

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        del trainer
        self.epochs.append(self._take(pl_module))

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        del trainer
        self.epochs.append(self._take(pl_module))


def test_an_unknown_flow_stop_fails_at_construction() -> None:
    with pytest.raises(ValueError, match="Unknown flow_stop 'each'"):
        tiny_dadf(flow_stop="each")
    with pytest.raises(ValueError, match="Unknown flow_stop 'each'"):
        TimmFastflow(backbone="resnet18", pre_trained=False, flow_stop="each")


@pytest.mark.parametrize(("patience", "warned"), [(None, True), (5, False)])
def test_a_stop_per_flow_without_patience_is_warned_about(
    caplog: pytest.LogCaptureFixture, patience: int | None, warned: bool,
) -> None:
    assert_both_models_warn(
        caplog, "no flow will stop before the last epoch", warned, flow_stop="per_flow", flow_patience=patience,
    )
