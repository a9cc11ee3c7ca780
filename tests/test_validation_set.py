"""Tuning sets from training images: held-out normals, Perlin-noise copies with masks, nothing from test."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomalib_dadf.data import MVTec
from anomalib_dadf.data.validation import make_validation_set


def test_held_out_training_images_and_their_anomalous_copies(mvtec_root: Path, tmp_path: Path) -> None:
    sources = sorted((mvtec_root / "widget" / "train" / "good").glob("*.png"))
    root = make_validation_set(sources, tmp_path / "tuning", holdout=0.25, seed=1)
    base = root / "validation"
    train, good, perlin = (sorted((base / folder).glob("*.png")) for folder in ("train/good", "test/good", "test/perlin"))
    assert (len(train), len(good), len(perlin)) == (6, 2, 2)

    source_pixels = [np.asarray(Image.open(path).convert("RGB")) for path in sources]

    def source_of(path: Path) -> int:
        pixels = np.asarray(Image.open(path))
        return next(index for index, source in enumerate(source_pixels) if np.array_equal(source, pixels))

    assert {source_of(path) for path in train}.isdisjoint({source_of(path) for path in good}), "held out = not trained on"
    for normal, anomalous in zip(good, perlin, strict=True):
        mask = np.asarray(Image.open(base / "ground_truth/perlin" / anomalous.name.replace(".png", "_mask.png"))) > 0
        difference = np.abs(np.asarray(Image.open(anomalous), dtype=float) - np.asarray(Image.open(normal), dtype=float))
        assert mask.any()
        assert difference[mask].mean() > 10 * difference[~mask].mean() + 1, "the anomaly lies inside its mask"

    datamodule = MVTec(root=root, category="validation", num_workers=0, val_split_mode="none")
    datamodule.setup()
    assert sorted(datamodule.test_data.samples["label_index"]) == [0, 0, 1, 1]


def test_a_holdout_that_leaves_one_side_empty_is_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="Cannot hold out 20% of 2 images"):
        make_validation_set([tmp_path / "a.png", tmp_path / "b.png"], tmp_path / "out")
