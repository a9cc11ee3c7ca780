"""sPRO: hand-computed cases, agreement with brute force, the LOCO ground-truth reader and its errors."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from anomalib.data import ImageBatch
from PIL import Image

from anomalib_dadf.metrics import SPRO, Defect, spro_auc
from anomalib_dadf.metrics.spro_curve import truncated_area


def stream(*images: tuple[np.ndarray, list[Defect]]):
    return lambda: images


def box(shape: tuple[int, int], rows: slice, cols: slice) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[rows, cols] = True
    return mask


def update(metric: SPRO, maps: torch.Tensor, paths: list[Path]) -> None:
    """Feed the metric the way anomalib's evaluator does: with a batch."""
    metric.update(ImageBatch(image=torch.zeros(len(paths), 3, 8, 8), anomaly_map=maps, image_path=[str(p) for p in paths]))


def brute_force(images: list[tuple[np.ndarray, list[Defect]]], limit: float) -> float:
    """Every distinct score (and +-inf) as a threshold, counted directly."""
    thresholds = np.concatenate([[np.inf], np.unique(np.concatenate([s.ravel() for s, _ in images]))[::-1], [-np.inf]])
    free = [~np.any([d.mask for d in defects], axis=0) if defects else np.ones(s.shape, bool) for s, defects in images]
    n_free = sum(int(f.sum()) for f in free)
    n_defects = sum(len(defects) for _, defects in images)
    fpr, overlap = [], []
    for threshold in thresholds:
        false_positives, found = 0, 0.0
        for (scores, defects), free_pixels in zip(images, free, strict=True):
            predicted = scores > threshold
            false_positives += int((predicted & free_pixels).sum())
            found += sum(min((predicted & d.mask).sum() / d.saturation, 1.0) for d in defects)
        fpr.append(false_positives / n_free)
        overlap.append(found / n_defects)
    return truncated_area(np.array(fpr), np.array(overlap), limit) / limit


def test_a_region_found_before_any_false_positive_scores_one() -> None:
    scores = np.zeros((10, 10))
    scores[2:4, 2:4] = 1.0
    assert spro_auc(stream((scores, [Defect(box((10, 10), slice(2, 4), slice(2, 4)), 4)]))) == pytest.approx(1.0)


def test_saturation_is_reached_before_full_overlap() -> None:
    shape = (20, 20)
    region = box(shape, slice(0, 4), slice(0, 10))  # 40 pixels
    scores = np.zeros(shape)
    scores[0, :10] = 1.0  # only 10 of the 40 pixels stand out
    absolute = Defect(region, saturation=10)
    relative = Defect(region, saturation=int(0.25 * 40))  # what a relative threshold of 0.25 gives
    assert spro_auc(stream((scores, [absolute]))) == pytest.approx(1.0)
    assert spro_auc(stream((scores, [relative]))) == pytest.approx(1.0)
    # Without saturation it finds a quarter at FPR 0; the ties at 0 then lead straight to (1, 1).
    assert spro_auc(stream((scores, [Defect(region, 40)]))) == pytest.approx(0.25 + 0.5 * 0.75 * 0.05)


def test_two_defects_in_one_image_are_averaged() -> None:
    shape = (20, 20)
    found, missed = box(shape, slice(0, 2), slice(0, 2)), box(shape, slice(10, 12), slice(10, 12))
    scores = np.zeros(shape)
    scores[found] = 1.0
    # Half the defects at FPR 0, then the ties at 0 lead straight to (1, 1).
    assert spro_auc(stream((scores, [Defect(found, 4), Defect(missed, 4)]))) == pytest.approx(0.5 + 0.5 * 0.5 * 0.05)


def test_good_images_add_false_positives() -> None:
    shape = (10, 10)
    region = box(shape, slice(0, 2), slice(0, 2))
    anomalous = np.where(region, 0.5, 0.0)
    good = np.zeros(shape)
    good[0, :10] = 1.0  # 10 false positives scoring above the defect
    # 96 + 100 free pixels: the defect is found only at FPR 10/196 > 0.05, so nothing before the limit.
    assert spro_auc(stream((anomalous, [Defect(region, 4)]), (good, []))) == pytest.approx(0.0)
    # With the limit at 0.3, it is found from FPR 10/196 on.
    limit = 0.3
    assert spro_auc(stream((anomalous, [Defect(region, 4)]), (good, [])), limit) == pytest.approx(
        (limit - 10 / 196) / limit,
    )


def test_ties_form_one_step_and_the_limit_interpolates() -> None:
    shape = (1, 10)
    region = box(shape, slice(0, 1), slice(0, 2))
    scores = np.array([[1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])  # one defect pixel tied with all free
    # Points: (0, 0.5) after the 1.0 pixel, then (1, 1) when every tie at 0 comes in at once.
    # The segment is interpolated at the limit: area = 0.5 * limit + 0.5 * 0.5 * limit^2.
    for limit in (0.05, 0.5, 1.0):
        expected = (0.5 * limit + 0.25 * limit**2) / limit
        assert spro_auc(stream((scores, [Defect(region, 2)])), limit) == pytest.approx(expected)


@pytest.mark.parametrize("seed", range(8))
def test_agrees_with_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    images = []
    for index in range(4):
        shape = (int(rng.integers(6, 12)), int(rng.integers(6, 12)))
        scores = rng.integers(0, 10, shape) / 9 if seed % 2 else rng.random(shape)  # odd seeds: many ties
        defects = []
        for _ in range(index % 3):
            top, left = rng.integers(0, 4, 2)
            mask = box(shape, slice(top, top + int(rng.integers(1, 5))), slice(left, left + int(rng.integers(1, 5))))
            defects.append(Defect(mask, int(rng.integers(1, mask.sum() + 3))))
        images.append((scores, defects))
    for limit in (0.02, 0.05, 0.3, 1.0):
        assert spro_auc(lambda: images, limit) == pytest.approx(brute_force(images, limit), abs=1e-9)


def test_undefined_cases_raise() -> None:
    scores = np.zeros((4, 4))
    with pytest.raises(ValueError, match="undefined without defects"):
        spro_auc(stream((scores, [])))
    with pytest.raises(ValueError, match="integration_limit"):
        spro_auc(stream((scores, [])), 0.0)
    with pytest.raises(ValueError, match="resize the map"):
        spro_auc(stream((scores, [Defect(np.ones((5, 5), bool), 1)])))


def write_loco_image(category: Path, kind: str, name: str, masks: list[np.ndarray], size: int = 8) -> Path:
    image_path = category / "test" / kind / f"{name}.png"
    image_path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((size, size, 3), np.uint8)).save(image_path)
    truth = category / "ground_truth" / kind / name
    truth.mkdir(parents=True, exist_ok=True)
    for index, mask in enumerate(masks):
        Image.fromarray(mask.astype(np.uint8)).save(truth / f"{index:03d}.png")
    return image_path


@pytest.fixture
def loco_category(tmp_path: Path) -> Path:
    category = tmp_path / "box"
    config = [
        {"defect_name": "dent", "pixel_value": 255, "saturation_threshold": 2, "relative_saturation": False},
        {"defect_name": "missing", "pixel_value": 100, "saturation_threshold": 0.5, "relative_saturation": True},
    ]
    category.mkdir()
    (category / "defects_config.json").write_text(json.dumps(config))
    return category


def test_metric_reads_loco_ground_truth_and_resizes_maps(loco_category: Path) -> None:
    dent = np.zeros((8, 8))
    dent[0, :4] = 255  # 4 pixels, absolute saturation 2
    missing = np.zeros((8, 8))
    missing[4:8, 4:8] = 100  # 16 pixels, relative saturation 0.5 -> 8
    good = write_loco_image(loco_category, "good", "000", [])
    structural = write_loco_image(loco_category, "structural_anomalies", "000", [dent])
    logical = write_loco_image(loco_category, "logical_anomalies", "000", [missing])

    # Maps at half resolution are resized bilinearly to the 8x8 masks before counting.
    half = torch.rand(3, 4, 4, generator=torch.Generator().manual_seed(0))
    metric = SPRO(integration_limit=0.3)
    update(metric, half, [good, structural, logical])
    assert metric.name == "pixel_SPRO"
    full = torch.nn.functional.interpolate(half[:, None], size=(8, 8), mode="bilinear", align_corners=False)
    full = full[:, 0].double().numpy()
    expected = brute_force(
        [(full[0], []), (full[1], [Defect(dent > 0, 2)]), (full[2], [Defect(missing > 0, 8)])],
        limit=0.3,
    )
    assert float(metric.compute()) == pytest.approx(expected, abs=1e-9)
    assert set(metric.compute_per_type()) == {"logical_anomalies", "structural_anomalies"}

    sharp = torch.zeros(3, 8, 8)
    sharp[1, 0, :2] = 1.0  # exactly the saturation of the dent
    sharp[2, 4:8, 4:6] = 1.0  # exactly the saturation of the missing region
    metric = SPRO()
    update(metric, sharp, [good, structural, logical])
    assert float(metric.compute()) == pytest.approx(1.0)
    assert {name: float(value) for name, value in metric.compute_per_type().items()} == pytest.approx(
        {"logical_anomalies": 1.0, "structural_anomalies": 1.0},
    )


def test_metric_errors_name_the_problem(loco_category: Path) -> None:
    unknown = np.zeros((8, 8))
    unknown[0, 0] = 7
    path = write_loco_image(loco_category, "structural_anomalies", "001", [unknown])
    metric = SPRO()
    update(metric, torch.zeros(1, 8, 8), [path])
    with pytest.raises(ValueError, match=r"pixel value\(s\) \[7\]"):
        metric.compute()

    wrong_size = write_loco_image(loco_category, "structural_anomalies", "002", [np.full((4, 4), 255)])
    metric.reset()
    update(metric, torch.zeros(1, 8, 8), [wrong_size])
    with pytest.raises(ValueError, match="4x4 but its image is 8x8"):
        metric.compute()

    no_truth = loco_category / "test" / "structural_anomalies" / "003.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(no_truth)
    metric.reset()
    update(metric, torch.zeros(1, 8, 8), [no_truth])
    with pytest.raises(FileNotFoundError, match="No ground-truth masks"):
        metric.compute()


@pytest.mark.parametrize(
    ("content", "error", "message"),
    [(None, FileNotFoundError, "defects_config.json, which is missing"), ('[{"pixel_value": 1}]', ValueError, "Malformed")],
)
def test_bad_defects_config_is_named(tmp_path: Path, content: str | None, error: type, message: str) -> None:
    category = tmp_path / f"case{content is None}"
    category.mkdir()
    if content is not None:
        (category / "defects_config.json").write_text(content)
    mask = np.zeros((8, 8))
    mask[0, 0] = 1
    path = write_loco_image(category, "logical_anomalies", "000", [mask])
    metric = SPRO()
    update(metric, torch.zeros(1, 8, 8), [path])
    with pytest.raises(error, match=message):
        metric.compute()
