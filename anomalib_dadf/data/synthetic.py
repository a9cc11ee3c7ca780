"""Toy MVTec AD-format data sets, generated offline: striped textures with square defects and masks.

Used by the tests and the quickstart; run ``python -m anomalib_dadf.data.synthetic --help``.
"""

import argparse
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


def make_mvtec_loco(root: Path, category: str = "box", n_train: int = 8, size: int = 64, seed: int = 0) -> Path:
    """Write an MVTec LOCO AD-style category: ``train``, ``validation`` and ``test`` folders with
    ``logical_anomalies`` and ``structural_anomalies``, one ground-truth folder of PNGs per anomalous image.

    Returns:
        Path: The data set root (the folder holding the category).
    """
    rng = np.random.default_rng(seed)
    base = root / category
    for folder, count in (("train/good", n_train), ("validation/good", 2), ("test/good", 3)):
        (base / folder).mkdir(parents=True, exist_ok=True)
        for index in range(count):
            Image.fromarray(_texture(rng, size)).save(base / folder / f"{index:03d}.png")
    for kind in ("logical_anomalies", "structural_anomalies"):
        (base / "test" / kind).mkdir(parents=True, exist_ok=True)
        for index in range(2):
            image, mask = _defective(rng, size)
            Image.fromarray(image).save(base / "test" / kind / f"{index:03d}.png")
            truth = base / "ground_truth" / kind / f"{index:03d}"
            truth.mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask).save(truth / "000.png")
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
    arguments = parser.parse_args()
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
