"""Validation sets for tuning, made from training images only: held-out normals and Perlin-noise copies.

anomalib's synthetic validation split blends its Perlin-noise anomalies into the image at 1-20 %
opacity, too faint on our data sets to rank configurations. This writes an MVTec AD-layout category
from a list of *training* images instead, with visible anomalies:

- ``train/good``: the training images that are not held out;
- ``test/good``: the held-out training images;
- ``test/perlin`` and ``ground_truth/perlin``: a copy of each held-out image with anomalib's
  ``PerlinAnomalyGenerator`` anomaly, blended at ``blend`` opacity, and its mask.

Its "test" split is a validation split: no test image of the source data set is read, so selecting a
configuration on it is not tuning on test data. Load it with ``anomalib_dadf.data.MVTec(root=ROOT,
category="validation")``.

Example:
    python -m anomalib_dadf.data.validation datasets/tuning/brick --images datasets/benchmark/textures/brick/train/good
    python -m anomalib_dadf.data.validation datasets/tuning/elpv_mono --elpv mono
"""

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from anomalib.data.utils.generators.perlin import PerlinAnomalyGenerator
from PIL import Image

from .elpv import elpv_root, make_elpv_dataset


def make_validation_set(
    images: Sequence[Path],
    root: Path,
    category: str = "validation",
    holdout: float = 0.2,
    blend: tuple[float, float] = (0.5, 1.0),
    seed: int = 0,
) -> Path:
    """Write a tuning set from training images (see the module docstring).

    Args:
        images: Normal training images of the source data set.
        root: Where to write it; the category folder is ``root / category``.
        category: Name of the category folder.
        holdout: Share of the images held out as validation normals (each also gets an anomalous copy).
        blend: Range of the anomalies' opacity (anomalib's validation split uses 0.01 to 0.2).
        seed: Seed of the hold-out draw and the anomalies.

    Returns:
        Path: ``root``, to pass as the data module's root.

    Raises:
        ValueError: Fewer than two images, or a hold-out share that leaves no image on one side.
    """
    images = sorted(Path(image) for image in images)
    held_out = round(holdout * len(images))
    if not 0 < held_out < len(images):
        msg = f"Cannot hold out {holdout:.0%} of {len(images)} images: give more images or another holdout share."
        raise ValueError(msg)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(images))
    base = root / category
    for folder in ("train/good", "test/good", "test/perlin", "ground_truth/perlin"):
        (base / folder).mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    generator = PerlinAnomalyGenerator(probability=1.0, blend_factor=blend)
    for rank, index in enumerate(order):
        image = Image.open(images[index]).convert("RGB")
        name = f"{rank:04d}.png"
        if rank >= held_out:
            image.save(base / "train/good" / name)
            continue
        image.save(base / "test/good" / name)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)
        anomalous, mask = generator(pixels)
        Image.fromarray((anomalous.clamp(0, 1).permute(1, 2, 0).numpy() * 255).astype(np.uint8)).save(
            base / "test/perlin" / name,
        )
        Image.fromarray((mask[0].numpy() > 0).astype(np.uint8) * 255).save(
            base / "ground_truth/perlin" / name.replace(".png", "_mask.png"),
        )
    return root


def main() -> None:
    """Write a tuning set from the command line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path, help="where to write it")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", type=Path, help="a folder of normal training images")
    source.add_argument("--elpv", choices=["mono", "poly"], help="the training cells of this ELPV category")
    parser.add_argument("--holdout", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    arguments = parser.parse_args()
    if arguments.images is not None:
        images = sorted(arguments.images.glob("*.png"))
    else:
        samples = make_elpv_dataset(elpv_root(), arguments.elpv)
        images = [Path(path) for path in samples.loc[samples["split"] == "train", "image_path"]]
    make_validation_set(images, arguments.root, holdout=arguments.holdout, seed=arguments.seed)
    print(f"Wrote {arguments.root / 'validation'}")


if __name__ == "__main__":
    main()
