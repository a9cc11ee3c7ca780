"""Stage 1's length set by the reconstruction loss of held-out normal training images."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from anomalib.callbacks import ModelCheckpoint
from anomalib.engine import Engine

from anomalib_dadf.components import Plateau, held_out_images
from anomalib_dadf.lightning_model import Stage

from .test_training import EpochSnapshots, datamodule, tiny_dadf


def test_plateau_waits_patience_epochs_without_a_half_percent_improvement() -> None:
    plateau = Plateau(patience=2)
    losses = [1.0, 0.9, 0.8999, 0.85, 0.849, 0.848]
    assert [plateau.stalled(loss) for loss in losses] == [False, False, False, False, False, True]
    assert (plateau.best, plateau.best_epoch) == (0.85, 3)


def test_plateau_refuses_no_patience() -> None:
    with pytest.raises(ValueError, match="reconstruction_patience must be at least 1"):
        Plateau(0)


def test_held_out_images_are_a_fixed_share_never_all() -> None:
    paths = [f"cell_{index:03d}.png" for index in range(50)]
    chosen = held_out_images(paths, 0.1)
    assert len(chosen) == 5
    assert chosen <= set(paths)
    assert chosen == held_out_images(reversed(paths), 0.1), "the choice depends on the set, not its order"
    assert chosen != held_out_images(paths, 0.1, seed=1)
    assert len(held_out_images(paths[:3], 0.01)) == 1
    assert len(held_out_images(paths[:2], 0.9)) == 1


@pytest.mark.parametrize(("paths", "fraction", "message"), [
    (["a.png"], 0.1, "at least two training images"),
    (["a.png", "b.png"], 1.0, "strictly between 0 and 1"),
])
def test_held_out_images_refuse_what_cannot_be_split(paths: list[str], fraction: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        held_out_images(paths, fraction)


def test_a_held_out_share_that_cannot_work_fails_at_construction() -> None:
    with pytest.raises(ValueError, match=r"reconstruction_holdout must lie strictly between 0 and 1, got 1\.5"):
        tiny_dadf(reconstruction_patience=3, reconstruction_holdout=1.5)
    tiny_dadf(reconstruction_holdout=1.5)  # the share is unused without the stop


def test_held_out_images_leave_stage_one_training_and_feed_its_loss() -> None:
    model = tiny_dadf(reconstruction_patience=1)
    model._held_out = frozenset({"b.png"})
    priors = model.model.extract_priors(torch.rand(3, 3, 64, 64))
    kept = model._measure_held_out(SimpleNamespace(image_path=["a.png", "b.png", "c.png"]), priors)
    assert all(torch.equal(kept_prior, prior[[0, 2]]) for kept_prior, prior in zip(kept, priors, strict=True))
    held_out_prior = [prior[[1]] for prior in priors]
    expected = model.reconstruction_loss(held_out_prior, *model.model.reconstruct(held_out_prior))
    assert model.held_out_loss.compute() == pytest.approx(expected.item())
    assert model.held_out_loss.weight == 1


def test_stage_one_ends_when_the_held_out_loss_stalls(mvtec_root: Path, tmp_path: Path) -> None:
    # A Transformer that cannot learn (learning rate 0) never improves its held-out loss.
    model = tiny_dadf(reconstruction_epochs=10, flow_epochs=2, reconstruction_patience=1, reconstruction_lr=0.0)
    spy = EpochSnapshots()
    every_epoch = ModelCheckpoint(dirpath=tmp_path / "every", filename="{epoch}", save_top_k=-1, every_n_epochs=1)
    Engine(default_root_dir=tmp_path, callbacks=[spy, every_epoch], accelerator="cpu", devices=1, logger=False).fit(
        model=model, datamodule=datamodule(mvtec_root),
    )
    assert spy.stages == [Stage.RECONSTRUCTION, Stage.RECONSTRUCTION, Stage.FLOW, Stage.FLOW]
    assert int(model.flow_start_epoch) == 2
    assert int(model.flow_steps_trained) > 0
    last = torch.load(tmp_path / "every" / "epoch=3.ckpt", weights_only=False)
    assert int(last["state_dict"]["flow_start_epoch"]) == 2, "a resumed run continues in stage 2"


def test_a_learning_transformer_trains_stage_one_to_its_cap(mvtec_root: Path, tmp_path: Path) -> None:
    model = tiny_dadf(reconstruction_epochs=3, flow_epochs=1, reconstruction_patience=3, reconstruction_lr=1e-3)
    spy = EpochSnapshots()
    Engine(default_root_dir=tmp_path, callbacks=[spy], accelerator="cpu", devices=1, logger=False).fit(
        model=model, datamodule=datamodule(mvtec_root),
    )
    assert spy.stages == [Stage.RECONSTRUCTION] * 3 + [Stage.FLOW]
    assert model._plateau.best_epoch >= 1, "the held-out loss improved after the first epoch"
