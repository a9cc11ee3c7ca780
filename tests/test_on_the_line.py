"""What a factory user meets: good images only, diverging runs, unreadable files, wrong roots, crashes mid-save."""

import errno
import logging
import shutil
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from anomalib.data import Folder, ImageBatch
from anomalib.engine import Engine
from anomalib.metrics import AUROC, F1Score
from lightning.pytorch import seed_everything

from anomalib_dadf import Dadf
from anomalib_dadf import checkpoint_io as checkpoint_io_module
from anomalib_dadf.checkpoint_io import AtomicCheckpointIO
from anomalib_dadf.data import MVTec, VisA
from anomalib_dadf.data.synthetic import make_mvtec
from anomalib_dadf.lightning_model import TrainingDivergedError
from anomalib_dadf.metrics import FalsePositiveRateThreshold, FieldAwareEvaluator
from anomalib_dadf.post_processing import FalseAlarmPostProcessor, RankKeepingPostProcessor

from .conftest import TINY_MODEL, small_pre_processor


def tiny_dadf(**overrides: object) -> Dadf:
    return Dadf(**{**TINY_MODEL, "reconstruction_epochs": 1, "flow_epochs": 1, "pre_processor": small_pre_processor(),
                   **overrides})


def scores_batch(scores: list[float], labels: list[int]) -> ImageBatch:
    count = len(scores)
    return ImageBatch(
        image=torch.zeros(count, 3, 4, 4),
        pred_score=torch.tensor(scores),
        anomaly_map=torch.tensor(scores).reshape(count, 1, 1, 1).expand(count, 1, 4, 4).clone(),
        gt_label=torch.tensor(labels),
    )


# Thresholds without defective images ---------------------------------------------------------------------------


@pytest.mark.parametrize(("rate", "expected_above"), [(0.1, 10), (0.01, 1), (0.0, 0)])
def test_threshold_flags_the_asked_share_of_normal_scores(rate: float, expected_above: int) -> None:
    scores = torch.randperm(100).float()
    threshold = FalsePositiveRateThreshold(false_positive_rate=rate, fields=["pred_score", "gt_label"])
    threshold.update(scores_batch(scores.tolist(), [0] * 100))
    threshold.update(scores_batch([1000.0], [1]))  # an anomalous score never moves it
    assert int((scores > threshold.compute()).sum()) == expected_above


def test_threshold_rate_outside_zero_to_one_is_refused() -> None:
    with pytest.raises(ValueError, match=r"false_positive_rate must be in \[0, 1\), got 1.5"):
        FalsePositiveRateThreshold(false_positive_rate=1.5, fields=["pred_score", "gt_label"])


def validate(post_processor: FalseAlarmPostProcessor, batch: ImageBatch) -> None:
    post_processor.on_validation_batch_end(None, None, batch)
    post_processor.on_validation_epoch_end(None, None)


def test_post_processor_uses_the_rate_without_anomalies_and_f1_with_them(caplog: pytest.LogCaptureFixture) -> None:
    normal_only = FalseAlarmPostProcessor(false_positive_rate=0.1)
    with caplog.at_level(logging.INFO, logger="anomalib_dadf.post_processing"):
        validate(normal_only, scores_batch([float(score) for score in range(10)], [0] * 10))
    assert float(normal_only.image_threshold) == pytest.approx(8.0)
    assert float(normal_only.pixel_threshold) == pytest.approx(8.0)
    assert "no anomalous image" in caplog.text

    mixed = FalseAlarmPostProcessor(false_positive_rate=0.1)
    validate(mixed, scores_batch([0.0, 1.0, 2.0, 9.0, 10.0], [0, 0, 0, 1, 1]))
    assert float(mixed.image_threshold) == pytest.approx(9.0), "anomalib's F1-adaptive threshold"

    forced = FalseAlarmPostProcessor(threshold="false_positive_rate", false_positive_rate=0.0)
    validate(forced, scores_batch([0.0, 1.0, 2.0, 9.0, 10.0], [0, 0, 0, 1, 1]))
    assert float(forced.image_threshold) == pytest.approx(2.0), "the highest normal score at a rate of 0"


def test_measuring_keeps_the_order_of_scores_beyond_the_validation_range() -> None:
    # Validation scores span 0 to 1, threshold 0.5; test normals score 2 and 3, anomalies 5 and 9.
    test = ([2.0, 3.0, 5.0, 9.0], [0, 0, 1, 1])
    auroc = AUROC(fields=["pred_score", "gt_label"])
    results = {}
    for post_processor in (FalseAlarmPostProcessor(), RankKeepingPostProcessor()):
        validate(post_processor, scores_batch([0.0, 0.2, 0.8, 1.0], [0, 0, 1, 1]))
        batch = scores_batch(*test)
        post_processor.normalize_batch(batch)
        auroc.reset()
        auroc.update(batch)
        results[type(post_processor).__name__] = (batch.pred_score, float(auroc.compute()))
    clamped, clamped_auroc = results["FalseAlarmPostProcessor"]
    kept, kept_auroc = results["RankKeepingPostProcessor"]
    assert torch.equal(clamped, torch.ones(4)), "anomalib's clamp ties every score above the validation range"
    assert clamped_auroc == 0.5
    assert torch.all(kept.diff() > 0) and torch.all((kept > 0) & (kept < 1)), "in (0, 1), order kept"
    assert kept_auroc == 1.0
    post_processor = RankKeepingPostProcessor()
    validate(post_processor, scores_batch([0.0, 0.2, 0.8, 1.0], [0, 0, 1, 1]))
    assert float(post_processor.normalized_image_threshold) == pytest.approx(0.5), "labels as anomalib's"


def test_unknown_threshold_method_is_refused() -> None:
    with pytest.raises(ValueError, match="Unknown threshold method 'best'"):
        FalseAlarmPostProcessor(threshold="best")


@pytest.fixture(scope="module")
def good_only_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ``Folder`` of good images only: 20 generated normal textures."""
    root = make_mvtec(tmp_path_factory.mktemp("good_only"), n_train=20, n_test_good=0, n_test_bad=0)
    return root / "widget" / "train"


def test_good_images_only_get_a_usable_threshold_and_no_made_up_metrics(
    good_only_folder: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    seed_everything(0)
    datamodule = Folder(
        name="parts", root=good_only_folder, normal_dir="good", train_batch_size=4, eval_batch_size=4, num_workers=0,
    )
    model = tiny_dadf()
    engine = Engine(default_root_dir=tmp_path, accelerator="cpu", devices=1)
    with caplog.at_level(logging.INFO):
        (metrics,) = engine.train(model=model, datamodule=datamodule)

    # No defective image: AUROC and F1 are undefined and left out, with a line saying why (never 0.0).
    assert "image_AUROC" not in metrics
    assert "image_F1Score" not in metrics
    assert "image_AUROC is undefined on this test set (its ground truth (gt_label) holds normal images only)" in caplog.text
    assert "The validation set does not contain any anomalous images" not in caplog.text, "anomalib's fallback unused"

    # The threshold sits at the 1 % false-positive rate of the validation normals: none of them above it.
    model.eval()

    def raw_scores(loader: object) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([model.model(model.pre_processor(batch.image)).pred_score.reshape(-1) for batch in loader])

    validation = raw_scores(datamodule.val_dataloader())
    assert len(validation) < 100, "at a 1 % rate, fewer than 100 held-out normals put the threshold on the highest"
    assert float(model.post_processor.image_threshold) == pytest.approx(float(validation.max()))
    labels = torch.cat([model(batch.image).pred_label.reshape(-1) for batch in datamodule.val_dataloader()])
    assert not labels.any(), "no held-out normal image is flagged (anomalib's fallback flagged every one)"


def test_undefined_pixel_metric_is_left_out() -> None:
    evaluator = FieldAwareEvaluator(test_metrics=[
        AUROC(fields=["pred_score", "gt_label"], prefix="image_"),
        AUROC(fields=["anomaly_map", "gt_mask"], prefix="pixel_"),
        F1Score(fields=["pred_label", "gt_label"], prefix="image_"),
    ])
    batch = scores_batch([0.1, 0.9], [0, 1])
    batch.gt_mask = torch.zeros(2, 4, 4, dtype=torch.bool)
    batch.pred_label = torch.tensor([False, True])
    evaluator.on_test_batch_end(None, None, None, batch, 0)
    reported = []
    evaluator.log = lambda name, metric: reported.append(name)
    evaluator.on_test_epoch_end(SimpleNamespace(barebones=False), None)
    assert reported == ["image_AUROC", "image_F1Score"]


# Diverging training ----------------------------------------------------------------------------------------------


def test_a_diverging_flow_stops_training_at_once_and_leaves_no_broken_checkpoint(
    mvtec_root: Path, tmp_path: Path,
) -> None:
    seed_everything(0)
    model = tiny_dadf(flow_lr=1000.0, flow_epochs=3)
    datamodule = MVTec(root=mvtec_root, category="widget", train_batch_size=4, eval_batch_size=4, num_workers=0)
    engine = Engine(default_root_dir=tmp_path, accelerator="cpu", devices=1)
    with pytest.raises(TrainingDivergedError, match=r"DADF's flow (loss|gradient norm) became (nan|inf) at epoch \d, "
                                                    r"step \d of that epoch.*lower flow_lr \(now 1000\) or flow_clamp"):
        engine.train(model=model, datamodule=datamodule)
    assert all(torch.isfinite(parameter).all() for parameter in model.parameters()), "no step used the bad values"
    for checkpoint in tmp_path.rglob("*.ckpt"):
        state = torch.load(checkpoint, weights_only=False)["state_dict"]
        assert all(torch.isfinite(tensor).all() for tensor in state.values() if tensor.is_floating_point())


def test_a_nan_reconstruction_loss_names_its_stage_and_fix(mvtec_root: Path, tmp_path: Path) -> None:
    model = tiny_dadf()
    model.reconstruction_loss.forward = lambda *_: torch.tensor(float("nan"), requires_grad=True)
    datamodule = MVTec(root=mvtec_root, category="widget", train_batch_size=4, num_workers=0)
    with pytest.raises(TrainingDivergedError, match=r"reconstruction loss became nan at epoch 0, step 0.*"
                                                    r"lower reconstruction_lr \(now 0.0001\)"):
        Engine(default_root_dir=tmp_path, accelerator="cpu", devices=1).fit(model=model, datamodule=datamodule)


# Unreadable images -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_checkpoint(mvtec_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("trained")
    engine = Engine(default_root_dir=work, accelerator="cpu", devices=1)
    datamodule = MVTec(root=mvtec_root, category="widget", train_batch_size=4, num_workers=0)
    engine.fit(model=tiny_dadf(), datamodule=datamodule)
    return Path(engine.trainer.checkpoint_callback.best_model_path)


def test_a_checkpoint_older_than_an_argument_set_on_the_command_line_is_refused_by_name(
    trained_checkpoint: Path, mvtec_root: Path, tmp_path: Path,
) -> None:
    """``anomalib test --ckpt_path OLD --model.map_sigma 2``: OLD was trained before the blur existed."""
    checkpoint = torch.load(trained_checkpoint, weights_only=False)
    for key in ("map_sigma", "prior_pooling"):
        del checkpoint["hyper_parameters"][key]
    older = tmp_path / "before-map-sigma.ckpt"
    torch.save(checkpoint, older)
    engine = Engine(default_root_dir=tmp_path, accelerator="cpu", devices=1)
    datamodule = MVTec(root=mvtec_root, category="widget", eval_batch_size=4, num_workers=0)

    with pytest.raises(ValueError, match=r"saved before prior_pooling, map_sigma existed.*sets prior_pooling=3, map_sigma=2\.0.*"
                                         r"drop --model\.prior_pooling"):
        engine.test(model=tiny_dadf(map_sigma=2.0, prior_pooling=3), datamodule=datamodule, ckpt_path=older)
    (tested,) = engine.test(model=tiny_dadf(), datamodule=datamodule, ckpt_path=older)
    (as_saved,) = engine.test(model=tiny_dadf(), datamodule=datamodule, ckpt_path=trained_checkpoint)
    assert tested == as_saved, "left at their defaults, the arguments change nothing"


def test_predict_skips_an_unreadable_image_and_predicts_the_rest(
    mvtec_root: Path, trained_checkpoint: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    folder = tmp_path / "images"
    shutil.copytree(mvtec_root / "widget" / "test" / "scratch", folder)
    broken = folder / "001_broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    with caplog.at_level(logging.WARNING):
        predictions = Engine(default_root_dir=tmp_path).predict(
            model=tiny_dadf(), data_path=folder, ckpt_path=trained_checkpoint,
        )
    predicted = sorted(Path(path).name for batch in predictions for path in batch.image_path)
    assert predicted == ["000.png", "001.png", "002.png"]
    assert f"Skipping unreadable image {broken}" in caplog.text


def test_training_on_an_unreadable_image_names_the_file(mvtec_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "data"
    shutil.copytree(mvtec_root, root)
    broken = root / "widget" / "train" / "good" / "003.png"
    broken.write_bytes(broken.read_bytes()[:100])  # truncated mid-file
    datamodule = MVTec(root=root, category="widget", train_batch_size=4, num_workers=0)
    with pytest.raises(ValueError, match=rf"1 training image\(s\) cannot be read: {broken} .*Replace or remove"):
        Engine(default_root_dir=tmp_path, accelerator="cpu", devices=1).fit(model=tiny_dadf(), datamodule=datamodule)


# A wrong data root offline ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("datamodule_class", "name"), [(MVTec, "MVTec AD"), (VisA, "VisA")])
def test_a_wrong_root_offline_names_the_missing_folder(datamodule_class, name, tmp_path, monkeypatch) -> None:
    def no_network(*args: object, **kwargs: object) -> None:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    datamodule = datamodule_class(root=tmp_path / "typo", category="bottle")
    with pytest.raises(FileNotFoundError, match=rf"{name} data not found: {tmp_path / 'typo' / 'bottle'} does not "
                                                r"exist.*Expected layout: .*download"):
        datamodule.prepare_data()


# Atomic checkpoints ----------------------------------------------------------------------------------------------


def test_a_checkpoint_write_interrupted_mid_way_leaves_the_previous_file_intact(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "weights" / "model.ckpt"
    writer = AtomicCheckpointIO()
    writer.save_checkpoint({"state_dict": {"w": torch.ones(3)}}, path)
    before = path.read_bytes()

    def disk_full(obj: object, file: object) -> None:
        file.write(b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint_io_module.torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        writer.save_checkpoint({"state_dict": {"w": torch.zeros(3)}}, path)
    assert path.read_bytes() == before
    assert [file.name for file in path.parent.iterdir()] == ["model.ckpt"], "no partial file left behind"
    assert torch.equal(torch.load(path)["state_dict"]["w"], torch.ones(3))


def test_dadf_runs_write_checkpoints_atomically(trained_checkpoint: Path, mvtec_root: Path, tmp_path: Path) -> None:
    engine = Engine(default_root_dir=tmp_path, accelerator="cpu", devices=1)
    datamodule = MVTec(root=mvtec_root, category="widget", num_workers=0)
    engine.test(model=tiny_dadf(), datamodule=datamodule, ckpt_path=trained_checkpoint)
    assert isinstance(engine.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
