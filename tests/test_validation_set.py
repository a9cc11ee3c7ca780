"""Tuning sets from training images: held-out normals, Perlin-noise copies with masks, nothing from test."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomalib_dadf.data import MVTec, make_elpv_dataset
from anomalib_dadf.data import validation as validation_module
from anomalib_dadf.data.validation import darken_cut_off_region, make_validation_set, write_uncertain_cells


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


def test_crack_copies_are_thin_dark_lines_and_leave_the_perlin_copies_as_they_were(mvtec_root: Path, tmp_path: Path) -> None:
    sources = sorted((mvtec_root / "widget" / "train" / "good").glob("*.png"))
    perlin_only = make_validation_set(sources, tmp_path / "perlin", holdout=0.25, seed=1) / "validation"
    both = make_validation_set(sources, tmp_path / "both", holdout=0.25, seed=1, anomalies=("perlin", "crack")) / "validation"

    def pixels(path: Path) -> np.ndarray:
        return np.asarray(Image.open(path), dtype=float)

    perlin = sorted((perlin_only / "test/perlin").glob("*.png"))
    assert all(np.array_equal(pixels(path), pixels(both / "test/perlin" / path.name)) for path in perlin)
    cracks = sorted((both / "test/crack").glob("*.png"))
    assert [path.name for path in cracks] == [path.name for path in perlin]
    for crack in cracks:
        normal = pixels(both / "test/good" / crack.name)
        mask = pixels(both / "ground_truth/crack" / crack.name.replace(".png", "_mask.png")) > 0
        assert 0 < mask.mean() < 0.05, "a thin line, not a blob"
        darkening = normal - pixels(crack)
        assert darkening[mask].mean() > 10 * np.abs(darkening[~mask]).mean() + 1, "darker inside its mask only"
    datamodule = MVTec(root=tmp_path / "both", category="validation", num_workers=0, val_split_mode="none")
    datamodule.setup()
    assert sorted(datamodule.test_data.samples["label_index"]) == [0, 0, 1, 1, 1, 1]


def test_an_unknown_anomaly_kind_is_named(mvtec_root: Path, tmp_path: Path) -> None:
    sources = sorted((mvtec_root / "widget" / "train" / "good").glob("*.png"))
    with pytest.raises(ValueError, match=r"anomalies must be some of \['perlin', 'crack', 'cutpaste', 'inactive'\]"):
        make_validation_set(sources, tmp_path / "out", anomalies=("scratch",))


def test_fainter_cracks_have_the_same_shapes_and_darken_less(mvtec_root: Path, tmp_path: Path) -> None:
    sources = sorted((mvtec_root / "widget" / "train" / "good").glob("*.png"))
    sets = {
        name: make_validation_set(sources, tmp_path / name, holdout=0.25, seed=1, anomalies=("crack",), crack_darkening=darkening)
        / "validation"
        for name, darkening in (("plain", (0.4, 0.9)), ("faint", (0.1, 0.4)))
    }
    for crack in sorted((sets["plain"] / "test/crack").glob("*.png")):
        mask_name = crack.name.replace(".png", "_mask.png")
        masks = [np.asarray(Image.open(base / "ground_truth/crack" / mask_name)) for base in sets.values()]
        assert np.array_equal(*masks)
        normal = np.asarray(Image.open(sets["plain"] / "test/good" / crack.name), dtype=float)
        plain, faint = (normal - np.asarray(Image.open(base / "test/crack" / crack.name), dtype=float) for base in sets.values())
        assert 0 < faint[masks[0] > 0].mean() < plain[masks[0] > 0].mean()


@pytest.mark.parametrize("seed", range(8))
def test_an_inactive_copy_darkens_the_part_a_crack_cuts_off_an_edge_and_nothing_else(seed: int) -> None:
    gray = Image.new("RGB", (96, 64), (200, 200, 200))
    copies = [darken_cut_off_region(gray, np.random.default_rng(seed), darkening) for darkening in ((0.1, 0.2), (0.3, 0.4))]
    (faint, mask), (plain, same_mask) = ((np.asarray(image, dtype=float)[..., 0], mask) for image, mask in copies)
    assert np.array_equal(mask, same_mask), "the shape does not depend on the darkening"
    assert 0.05 <= mask.mean() <= 0.4
    assert mask[[0, -1]].any() or mask[:, [0, -1]].any(), "the part reaches the image's border"
    assert (faint[~mask] == 200).all() and (plain[~mask] == 200).all(), "nothing outside the mask changes"
    region = np.median(faint[mask])
    assert 200 * (1 - 0.2) - 1 <= region <= 200 * (1 - 0.1) + 1
    assert faint[mask].min() < region - 10, "the crack is darker than the part it cuts off"
    assert (plain[mask] < faint[mask]).all()


def test_an_area_the_smaller_part_cannot_cover_is_named() -> None:
    with pytest.raises(ValueError, match=r"area must be a range within \[0, 0\.5\]"):
        darken_cut_off_region(Image.new("RGB", (32, 32)), np.random.default_rng(0), area=(0.6, 0.9))


def test_inactive_copies_are_written_with_their_masks(mvtec_root: Path, tmp_path: Path) -> None:
    sources = sorted((mvtec_root / "widget" / "train" / "good").glob("*.png"))
    base = make_validation_set(sources, tmp_path / "inactive", holdout=0.25, seed=1, anomalies=("inactive",)) / "validation"
    copies = sorted(path.name for path in (base / "test/inactive").glob("*.png"))
    assert copies == sorted(path.name for path in (base / "test/good").glob("*.png"))
    masks = [np.asarray(Image.open(base / "ground_truth/inactive" / name.replace(".png", "_mask.png"))) > 0 for name in copies]
    assert all(0.05 <= mask.mean() <= 0.4 for mask in masks)


def test_cutpaste_copies_carry_a_rectangle_of_another_held_out_image(mvtec_root: Path, tmp_path: Path) -> None:
    sources = sorted((mvtec_root / "widget" / "train" / "good").glob("*.png"))
    base = make_validation_set(sources, tmp_path / "paste", holdout=0.25, seed=1, anomalies=("cutpaste",)) / "validation"
    good = {path.name: np.asarray(Image.open(path)) for path in sorted((base / "test/good").glob("*.png"))}
    pasted = sorted((base / "test/cutpaste").glob("*.png"))
    assert sorted(path.name for path in pasted) == sorted(good)
    for path in pasted:
        image = np.asarray(Image.open(path))
        mask = np.asarray(Image.open(base / "ground_truth/cutpaste" / path.name.replace(".png", "_mask.png"))) > 0
        rows, columns = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        assert mask.sum() == rows.size * columns.size, "the mask is one rectangle"
        assert 0.1 * 0.1 <= mask.mean() <= 0.3 * 0.3 + 0.02
        assert np.array_equal(image[~mask], good[path.name][~mask]), "nothing outside the rectangle changes"
        patch = image[rows[0] : rows[-1] + 1, columns[0] : columns[-1] + 1]
        donors = [name for name, normal in good.items() if name != path.name and _contains(normal, patch)]
        assert donors, "the patch is cut from another held-out image"


def _contains(image: np.ndarray, patch: np.ndarray) -> bool:
    windows = np.lib.stride_tricks.sliding_window_view(image, patch.shape)
    return bool((windows == patch).all(axis=tuple(range(-patch.ndim, 0))).any())


def test_uncertain_elpv_cells_are_copied_and_lie_in_no_split_of_the_default_protocol(tmp_path: Path) -> None:
    cells = {"a": (0.0, "mono"), "b": (1 / 3, "mono"), "c": (2 / 3, "mono"), "d": (1.0, "mono"), "e": (1 / 3, "poly")}
    root = tmp_path / "elpv"
    (root / "images").mkdir(parents=True)
    for name in cells:
        Image.fromarray(np.full((8, 8), 100, np.uint8)).save(root / "images" / f"{name}.png")
    rows = (f"images/{name}.png {probability} {kind}" for name, (probability, kind) in cells.items())
    (root / "labels.csv").write_text("\n".join(rows) + "\n")

    assert write_uncertain_cells(tmp_path / "uncertain", "mono", root) == 2
    copied = sorted((tmp_path / "uncertain").glob("*.png"))
    assert [path.stem for path in copied] == ["b", "c"], "mono's 1/3 and 2/3 cells, not poly's"
    assert Image.open(copied[0]).mode == "RGB"
    assert {"b", "c"}.isdisjoint(Path(path).stem for path in make_elpv_dataset(root, "mono")["image_path"])


def test_uncertain_cells_without_elpv_are_refused_by_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
) -> None:
    monkeypatch.setattr("sys.argv", ["validation", str(tmp_path / "out"), "--images", str(tmp_path), "--uncertain-cells"])
    with pytest.raises(SystemExit):
        validation_module.main()
    assert "--uncertain-cells needs --elpv" in capsys.readouterr().err
    assert not (tmp_path / "out").exists(), "refused before anything is written"
