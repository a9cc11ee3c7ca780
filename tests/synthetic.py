"""Tiny MVTec-format data sets generated on the fly for tests."""

from pathlib import Path

import numpy as np
from PIL import Image


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """A smooth striped texture with mild noise, the 'normal' look."""
    grid = np.linspace(0, 4 * np.pi, size)
    stripes = 0.5 + 0.25 * np.sin(grid[None, :] + rng.uniform(0, 0.3)) * np.cos(grid[:, None] / 2)
    image = stripes[..., None] + rng.normal(0, 0.03, (size, size, 3))
    return (np.clip(image, 0, 1) * 255).astype(np.uint8)


def _defect_mask(rng: np.random.Generator, size: int) -> np.ndarray:
    side = size // 4
    top, left = rng.integers(0, size - side, 2)
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[top : top + side, left : left + side] = 255
    return mask


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
        image = _texture(rng, size)
        mask = _defect_mask(rng, size)
        image[mask > 0] = rng.integers(0, 255, 3, dtype=np.uint8)
        Image.fromarray(image).save(base / "test/scratch" / f"{index:03d}.png")
        Image.fromarray(mask).save(base / "ground_truth/scratch" / f"{index:03d}_mask.png")
    return root
