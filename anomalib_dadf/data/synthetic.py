"""Toy MVTec AD and MVTec LOCO-format data sets, generated offline: striped textures with defects and masks.

Used by the tests and the quickstart; run ``python -m anomalib_dadf.data.synthetic --help``.
"""

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """A smooth striped texture with mild noise, the 'normal' look."""
    grid = np.linspace(0, 4 * np.pi, size)
    stripes = 0.5 + 0.25 * np.sin(grid[None, :] + rng.uniform(0, 0.3)) * np.cos(grid[:, None] / 2)
    image = stripes[..., None] + rng.normal(0, 0.03, (size, size, 3))
    return (np.clip(image, 0, 1) * 255).astype(np.uint8)


def _defective(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A texture with one solid-colour square defect, and the defect's mask."""
    image = _texture(rng, size)
    side = size // 4
    top, left = rng.integers(0, size - side, 2)
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[top : top + side, left : left + side] = 255
    image[mask > 0] = rng.integers(0, 255, 3, dtype=np.uint8)
    return image, mask


def make_mvtec(
    root: Path,
    category: str = "widget",
    n_train: int = 8,
    n_test_good: int = 3,
    n_test_bad: int = 3,
    size: int = 64,
    seed: int = 0,
) -> Path:
    """Write an MVTec AD-style category: ``train/good``, ``test/{good,scratch}``, ``ground_truth/scratch``.

    Returns:
        Path: The data set root (the folder holding the category).
    """
    rng = np.random.default_rng(seed)
    base = root / category
    for folder in ("train/good", "test/good", "test/scratch", "ground_truth/scratch"):
        (base / folder).mkdir(parents=True, exist_ok=True)
    for index in range(n_train):
        Image.fromarray(_texture(rng, size)).save(base / "train/good" / f"{index:03d}.png")
    for index in range(n_test_good):
        Image.fromarray(_texture(rng, size)).save(base / "test/good" / f"{index:03d}.png")
    for index in range(n_test_bad):
        image, mask = _defective(rng, size)
        Image.fromarray(image).save(base / "test/scratch" / f"{index:03d}.png")
        Image.fromarray(mask).save(base / "ground_truth/scratch" / f"{index:03d}_mask.png")
    return root


LOCO_DEFECTS = [
    # A structural defect counts as found once a quarter of a 16x16 square at 64 px is covered.
    {"defect_name": "square", "pixel_value": 255, "saturation_threshold": 64, "relative_saturation": False},
    {"defect_name": "swapped_patch", "pixel_value": 128, "saturation_threshold": 0.5, "relative_saturation": True},
]


def _swapped(rng: np.random.Generator, size: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """A logical anomaly: two patches of a normal texture trade places; one mask per patch."""
    image = _texture(rng, size)
    side = size // 4
    first, second = (0, 0), (size - side, size - side)
    if rng.random() < 0.5:
        first, second = (0, size - side), (size - side, 0)
    masks = []
    patches = [image[top : top + side, left : left + side].copy() for top, left in (first, second)]
    for (top, left), patch in zip((first, second), reversed(patches), strict=True):
        image[top : top + side, left : left + side] = np.rot90(patch, 2)
        mask = np.zeros((size, size), dtype=np.uint8)
        mask[top : top + side, left : left + side] = 128
        masks.append(mask)
    return image, masks


def make_mvtec_loco(
    root: Path,
    category: str = "box",
    n_train: int = 8,
    size: int = 64,
    seed: int = 0,
    n_test_good: int = 3,
    n_test_bad: int = 2,
) -> Path:
    """Write an MVTec LOCO AD-style category with ``defects_config.json``.

    ``train``, ``validation`` and ``test`` folders; ``structural_anomalies`` carry one square defect
    (one ground-truth PNG), ``logical_anomalies`` two swapped patches (two PNGs, one per patch);
    ``n_test_bad`` images of each.

    Returns:
        Path: The data set root (the folder holding the category).
    """
    rng = np.random.default_rng(seed)
    base = root / category
    base.mkdir(parents=True, exist_ok=True)
    (base / "defects_config.json").write_text(json.dumps(LOCO_DEFECTS, indent=2))
    for folder, count in (("train/good", n_train), ("validation/good", 2), ("test/good", n_test_good)):
        (base / folder).mkdir(parents=True, exist_ok=True)
        for index in range(count):
            Image.fromarray(_texture(rng, size)).save(base / folder / f"{index:03d}.png")
    for kind in ("logical_anomalies", "structural_anomalies"):
        (base / "test" / kind).mkdir(parents=True, exist_ok=True)
        for index in range(n_test_bad):
            if kind == "structural_anomalies":
                image, mask = _defective(rng, size)
                masks = [mask]
            else:
                image, masks = _swapped(rng, size)
            Image.fromarray(image).save(base / "test" / kind / f"{index:03d}.png")
            truth = base / "ground_truth" / kind / f"{index:03d}"
            truth.mkdir(parents=True, exist_ok=True)
            for number, mask in enumerate(masks):
                Image.fromarray(mask).save(truth / f"{number:03d}.png")
    return root


TEXTURES = ("brick", "grass", "gravel")


def _texture_photo(name: str) -> np.ndarray:
    from skimage import data

    return getattr(data, name)()


def _crop(rng: np.random.Generator, photo: np.ndarray, size: int) -> np.ndarray:
    top, left = rng.integers(0, photo.shape[0] - size + 1), rng.integers(0, photo.shape[1] - size + 1)
    return photo[top : top + size, left : left + size].astype(np.float64)


def make_texture_defects(
    root: Path,
    category: str = "brick",
    n_train: int = 60,
    n_test_good: int = 20,
    n_test_bad: int = 20,
    size: int = 128,
    seed: int = 0,
) -> Path:
    """Write an MVTec AD-style category from a real texture photo of scikit-image, with drawn defects and masks.

    Normal images are random crops of the photo (``brick``, ``grass`` or ``gravel``). Half of the
    anomalous crops get an elliptic patch of another of the photos (``foreign``), half a thin dark or
    bright stroke (``scratch``); each has its pixel mask.

    Returns:
        Path: The data set root (the folder holding the category).
    """
    if category not in TEXTURES:
        msg = f"Unknown texture '{category}': choose one of {list(TEXTURES)}."
        raise ValueError(msg)
    rng = np.random.default_rng(seed)
    photo = _texture_photo(category)
    others = [_texture_photo(name) for name in TEXTURES if name != category]
    base = root / category
    for folder in ("train/good", "test/good", "test/foreign", "test/scratch", "ground_truth/foreign", "ground_truth/scratch"):
        (base / folder).mkdir(parents=True, exist_ok=True)

    def save(image: np.ndarray, path: Path) -> None:
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).convert("RGB").save(path)

    for index in range(n_train):
        save(_crop(rng, photo, size), base / "train/good" / f"{index:03d}.png")
    for index in range(n_test_good):
        save(_crop(rng, photo, size), base / "test/good" / f"{index:03d}.png")
    rows, cols = np.mgrid[0:size, 0:size]
    for index in range(n_test_bad):
        image = _crop(rng, photo, size)
        center = rng.uniform(0.25, 0.75, 2) * size
        if index % 2 == 0:
            kind = "foreign"
            radii = rng.uniform(0.08, 0.18, 2) * size
            mask = ((rows - center[0]) / radii[0]) ** 2 + ((cols - center[1]) / radii[1]) ** 2 <= 1
            image[mask] = _crop(rng, others[index // 2 % len(others)], size)[mask]
        else:
            kind = "scratch"
            angle, length = rng.uniform(0, np.pi), rng.uniform(0.3, 0.5) * size
            along = (rows - center[0]) * np.sin(angle) + (cols - center[1]) * np.cos(angle)
            across = (rows - center[0]) * np.cos(angle) - (cols - center[1]) * np.sin(angle)
            mask = (np.abs(across) <= 1.5) & (np.abs(along) <= length / 2)
            image[mask] = 255.0 if rng.random() < 0.5 else 0.0
        save(image, base / "test" / kind / f"{index:03d}.png")
        Image.fromarray((mask * 255).astype(np.uint8)).save(base / "ground_truth" / kind / f"{index:03d}_mask.png")
    return root


def main() -> None:
    """Write a toy data set from the command line."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("root", nargs="?", type=Path, default=Path("datasets/toy"), help="where to write it")
    parser.add_argument("--category", default="widget")
    parser.add_argument("--n-train", type=int, default=200)
    parser.add_argument("--n-test-good", type=int, default=20)
    parser.add_argument("--n-test-bad", type=int, default=20)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--loco", action="store_true", help="write an MVTec LOCO-style category instead")
    parser.add_argument("--texture", choices=TEXTURES, help="write defects on this real texture photo instead")
    arguments = parser.parse_args()
    if arguments.loco:
        root = make_mvtec_loco(
            arguments.root, arguments.category, arguments.n_train, arguments.size, arguments.seed,
            arguments.n_test_good, arguments.n_test_bad,
        )
    elif arguments.texture:
        arguments.category = arguments.texture
        root = make_texture_defects(
            arguments.root, arguments.texture, arguments.n_train, arguments.n_test_good, arguments.n_test_bad,
            arguments.size, arguments.seed,
        )
    else:
        root = make_mvtec(
            arguments.root,
            category=arguments.category,
            n_train=arguments.n_train,
            n_test_good=arguments.n_test_good,
            n_test_bad=arguments.n_test_bad,
            size=arguments.size,
            seed=arguments.seed,
        )
    print(f"Wrote {root / arguments.category}")


if __name__ == "__main__":
    main()
