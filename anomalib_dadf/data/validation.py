"""Validation sets for tuning, made from training images only: held-out normals and anomalous copies.

anomalib's synthetic validation split blends its Perlin-noise anomalies into the image at 1-20 %
opacity, too faint on our data sets to rank configurations. This writes an MVTec AD-layout category
from a list of *training* images instead, with visible anomalies:

- ``train/good``: the training images that are not held out;
- ``test/good``: the held-out training images;
- ``test/perlin`` and ``ground_truth/perlin``: a copy of each held-out image with anomalib's
  ``PerlinAnomalyGenerator`` anomaly, blended at ``blend`` opacity, and its mask;
- ``test/crack`` and ``ground_truth/crack`` (when asked for): a copy of each held-out image with a
  thin, dark, branching crack, the defect that electroluminescence images of solar cells show most.
  Perlin blobs are large and soft; a model can rank them well and still miss hairline cracks.
- ``test/cutpaste`` and ``ground_truth/cutpaste`` (when asked for): a copy of each held-out image with a
  rectangle cut from another held-out image, at another place, pasted in (after CutPaste, Li et al.,
  CVPR 2021). The patch is real normal content, so nothing about it is foreign but its brightness
  and where its structure (busbars, fingers, texture) lies: closer to ELPV's dark inactive regions
  and misplaced parts than colourful noise or a drawn line.
- ``test/inactive`` and ``ground_truth/inactive`` (when asked for): a copy of each held-out image with a
  crack that runs from edge to edge and cuts off 5-35 % of the image, darkened. In electroluminescence
  images, a crack that isolates part of a cell leaves that part electrically disconnected, so it glows
  less than the rest: a large, faint region with a sharp, crack-shaped border, where the other kinds are
  lines, blobs or rectangles.

Its "test" split is a validation split: no test image of the source data set is read, so selecting a
configuration on it is not tuning on test data. Load it with ``anomalib_dadf.data.MVTec(root=ROOT,
category="validation")``.

For ELPV, ``--uncertain-cells`` also copies the category's cells with defect probability 1/3 or 2/3 to
``test/uncertain`` (no masks). They are real, possibly defective cells that no ELPV test set holds
unless ``include_uncertain`` is set, but they are not training images: choosing a setting on them is a
change of protocol, to be declared as such. Load that folder with anomalib's ``Folder`` (``normal_dir``
``train/good``, ``normal_test_dir`` ``test/good``, ``abnormal_dir`` ``test/uncertain``).

Example:
    python -m anomalib_dadf.data.validation datasets/tuning/brick --images datasets/benchmark/textures/brick/train/good
    python -m anomalib_dadf.data.validation datasets/tuning/elpv_mono --elpv mono
    python -m anomalib_dadf.data.validation datasets/tuning/elpv_mono_cracks --elpv mono --anomalies perlin crack
    python -m anomalib_dadf.data.validation datasets/tuning/elpv_mono_faint_cracks --elpv mono --anomalies perlin crack \
        --crack-darkening 0.1 0.4
    python -m anomalib_dadf.data.validation datasets/tuning/elpv_mono_cutpaste --elpv mono --anomalies cutpaste
    python -m anomalib_dadf.data.validation datasets/tuning/elpv_mono_inactive --elpv mono --anomalies inactive
    python -m anomalib_dadf.data.validation datasets/tuning/elpv_mono_uncertain --elpv mono --uncertain-cells
"""

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from anomalib.data.utils.generators.perlin import PerlinAnomalyGenerator
from PIL import Image, ImageDraw, ImageFilter

from .elpv import elpv_root, make_elpv_dataset

ANOMALIES = ("perlin", "crack", "cutpaste", "inactive")
CRACK_DARKENING = (0.4, 0.9)
# Calibrated on validation sets made from ELPV mono's training cells at 128 x 128 (the chosen DADF scores 0.89;
# 5-10 % saturates, 1-2 % is near chance); no test cell was read.
INACTIVE_DARKENING = (0.02, 0.05)


def _walk(rng: np.random.Generator, point: np.ndarray, heading: float, length: float, side: int) -> list[tuple]:
    """Points of a random walk of ``length`` pixels in steps of 2-5 % of ``side``, bending up to 25 degrees a step."""
    points = [tuple(point)]
    while length > 0:
        step = rng.uniform(0.02, 0.05) * side
        heading += rng.uniform(-1, 1) * np.radians(25)
        point = point + step * np.array([np.cos(heading), np.sin(heading)])
        points.append(tuple(point))
        length -= step
    return points


def draw_crack(
    image: Image.Image,
    rng: np.random.Generator,
    darkening: tuple[float, float] = CRACK_DARKENING,
) -> tuple[Image.Image, np.ndarray]:
    """A thin dark crack drawn into ``image``: a bent walk over 15-50 % of its side, with up to two branches.

    Lines are 1-3 pixels wide at the image's own resolution and darken what they cross by a share drawn
    from ``darkening``. The shape does not depend on ``darkening``: the same generator state gives the
    same crack, fainter or plainer.

    Returns:
        tuple[Image.Image, np.ndarray]: The cracked copy and its boolean mask.
    """
    side = min(image.size)
    heading = rng.uniform(0, 2 * np.pi)
    trunk = _walk(rng, rng.uniform(0.2, 0.8, 2) * image.size, heading, rng.uniform(0.15, 0.5) * side, side)
    branches = [
        _walk(
            rng,
            np.array(trunk[int(rng.integers(len(trunk)))]),
            heading + rng.choice([-1, 1]) * rng.uniform(np.pi / 6, np.pi / 2),
            rng.uniform(0.08, 0.25) * side,
            side,
        )
        for _ in range(int(rng.integers(0, 3)))
    ]
    lines = Image.new("L", image.size)
    draw, width = ImageDraw.Draw(lines), int(rng.integers(1, 4))
    for walk in (trunk, *branches):
        draw.line(walk, fill=255, width=width, joint="curve")
    shade = np.asarray(lines.filter(ImageFilter.GaussianBlur(0.5)), dtype=np.float32)[..., None] / 255
    pixels = np.asarray(image, dtype=np.float32) * (1 - rng.uniform(*darkening) * shade)
    return Image.fromarray(pixels.round().astype(np.uint8)), np.asarray(lines) > 0


def _on_border(t: float, width: int, height: int) -> tuple[float, float]:
    """The point at ``t`` (0 to 4, one unit a side, clockwise from the top-left corner) on an image's border."""
    side, share = divmod(t % 4, 1)
    corners = [(0, 0), (width, 0), (width, height), (0, height), (0, 0)]
    (x0, y0), (x1, y1) = corners[int(side)], corners[int(side) + 1]
    return x0 + share * (x1 - x0), y0 + share * (y1 - y0)


def darken_cut_off_region(
    image: Image.Image,
    rng: np.random.Generator,
    darkening: tuple[float, float] = INACTIVE_DARKENING,
    area: tuple[float, float] = (0.05, 0.35),
) -> tuple[Image.Image, np.ndarray]:
    """A crack from one edge of ``image`` to another, and the smaller part it cuts off darkened.

    The crack joins points on two different edges through eight segments, each bent off the straight
    line by up to 4 % of the image's side. Of the two parts it leaves, the smaller is darkened by a share
    drawn from ``darkening``, the crack itself (1-2 pixels wide) twice as much. Shapes are redrawn until
    the part covers a share of the image within ``area``. The shape does not depend on ``darkening``.

    Returns:
        tuple[Image.Image, np.ndarray]: The darkened copy and its boolean mask (the part and the crack).

    Raises:
        ValueError: An ``area`` range that the smaller part cannot cover (it is at most half the image).
    """
    if not 0 <= area[0] < area[1] <= 0.5:
        msg = f"area must be a range within [0, 0.5] (the smaller part is at most half the image), got {area}."
        raise ValueError(msg)
    width, height = image.size
    along = np.linspace(0, 1, 9)[:, None]
    while True:
        start = rng.uniform(0, 4)
        end = np.floor(start) + rng.integers(1, 4) + rng.uniform(0, 1)
        ends = np.array([_on_border(start, width, height), _on_border(end, width, height)])
        crack = ends[0] + along * (ends[1] - ends[0])
        crack[1:-1] += rng.uniform(-0.04, 0.04, (7, 2)) * min(width, height)
        crack = [tuple(point) for point in crack]
        first, last = int(np.floor(start)), int(np.floor(end))
        parts = []
        for corners in (range(last, first, -1), range(last + 1, first + 5)):
            part = Image.new("L", image.size)
            ImageDraw.Draw(part).polygon(crack + [_on_border(corner, width, height) for corner in corners], fill=255)
            parts.append(np.asarray(part) > 0)
        region = min(parts, key=np.count_nonzero)
        if area[0] <= region.mean() <= area[1]:
            break
    line = Image.new("L", image.size)
    ImageDraw.Draw(line).line(crack, fill=255, width=int(rng.integers(1, 3)))
    line = np.asarray(line) > 0
    share = rng.uniform(*darkening)
    shade = np.where(line, min(2 * share, 0.95), np.where(region, share, 0.0)).astype(np.float32)[..., None]
    pixels = np.asarray(image, dtype=np.float32) * (1 - shade)
    return Image.fromarray(pixels.round().astype(np.uint8)), region | line


def paste_patch(image: Image.Image, donor: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, np.ndarray]:
    """A rectangle of ``donor``, 10-30 % of the side each way, pasted into ``image`` at another random place.

    Returns:
        tuple[Image.Image, np.ndarray]: The pasted copy and its boolean mask (the rectangle).
    """
    width, height = (max(1, round(rng.uniform(0.1, 0.3) * min(image.size))) for _ in range(2))
    source, target = (
        (int(rng.integers(0, picture.width - width + 1)), int(rng.integers(0, picture.height - height + 1)))
        for picture in (donor, image)
    )
    pasted = image.copy()
    pasted.paste(donor.crop((*source, source[0] + width, source[1] + height)), target)
    mask = np.zeros((image.height, image.width), dtype=bool)
    mask[target[1] : target[1] + height, target[0] : target[0] + width] = True
    return pasted, mask


def make_validation_set(
    images: Sequence[Path],
    root: Path,
    category: str = "validation",
    holdout: float = 0.2,
    blend: tuple[float, float] = (0.5, 1.0),
    seed: int = 0,
    anomalies: Sequence[str] = ("perlin",),
    crack_darkening: tuple[float, float] = CRACK_DARKENING,
    inactive_darkening: tuple[float, float] = INACTIVE_DARKENING,
) -> Path:
    """Write a tuning set from training images (see the module docstring).

    Args:
        images: Normal training images of the source data set.
        root: Where to write it; the category folder is ``root / category``.
        category: Name of the category folder.
        holdout: Share of the images held out as validation normals (each also gets an anomalous copy).
        blend: Range of the anomalies' opacity (anomalib's validation split uses 0.01 to 0.2).
        seed: Seed of the hold-out draw and the anomalies.
        anomalies: Kinds of anomalous copies, each its own defect folder: ``"perlin"``, ``"crack"``,
            ``"cutpaste"`` (its patch comes from the next held-out image, or the same one when only one is),
            ``"inactive"``.
            Each kind draws from its own random stream, so adding one leaves the others as they were.
        crack_darkening: Range of the share by which a crack darkens what it crosses.
        inactive_darkening: Range of the share by which an ``"inactive"`` copy's cut-off part is darkened. The
            default, 2-5 %, is the band calibrated on ELPV mono at 128 x 128 (the chosen DADF's image AUROC
            0.89; 5-10 % saturates at 0.996, 1-2 % is near chance).

    Returns:
        Path: ``root``, to pass as the data module's root.

    Raises:
        ValueError: Fewer than two images, a hold-out share that leaves no image on one side, or an
            unknown or missing anomaly kind.
    """
    if not anomalies or not set(anomalies) <= set(ANOMALIES):
        msg = f"anomalies must be some of {list(ANOMALIES)}, got {list(anomalies)}."
        raise ValueError(msg)
    images = sorted(Path(image) for image in images)
    held_out = round(holdout * len(images))
    if not 0 < held_out < len(images):
        msg = f"Cannot hold out {holdout:.0%} of {len(images)} images: give more images or another holdout share."
        raise ValueError(msg)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(images))
    base = root / category
    for folder in ("train/good", "test/good", *(f"{split}/{kind}" for kind in anomalies for split in ("test", "ground_truth"))):
        (base / folder).mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    generator = PerlinAnomalyGenerator(probability=1.0, blend_factor=blend)
    crack_rng, paste_rng, inactive_rng = (np.random.default_rng([seed, stream]) for stream in (1, 2, 3))
    for rank, index in enumerate(order):
        image = Image.open(images[index]).convert("RGB")
        name = f"{rank:04d}.png"
        if rank >= held_out:
            image.save(base / "train/good" / name)
            continue
        image.save(base / "test/good" / name)
        for kind in anomalies:
            if kind == "perlin":
                pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)
                anomalous, mask = generator(pixels)
                anomalous = Image.fromarray((anomalous.clamp(0, 1).permute(1, 2, 0).numpy() * 255).astype(np.uint8))
                mask = mask[0].numpy() > 0
            elif kind == "crack":
                anomalous, mask = draw_crack(image, crack_rng, crack_darkening)
            elif kind == "inactive":
                anomalous, mask = darken_cut_off_region(image, inactive_rng, inactive_darkening)
            else:
                donor = Image.open(images[order[(rank + 1) % held_out]]).convert("RGB")
                anomalous, mask = paste_patch(image, donor, paste_rng)
            anomalous.save(base / "test" / kind / name)
            Image.fromarray(mask.astype(np.uint8) * 255).save(base / "ground_truth" / kind / name.replace(".png", "_mask.png"))
    return root


def write_uncertain_cells(folder: Path, category: str, root: Path | None = None) -> int:
    """Copy one ELPV category's cells with defect probability 1/3 or 2/3 into ``folder``, as RGB PNGs.

    Args:
        folder: Where to write them (made if missing).
        category: ``"mono"`` or ``"poly"``.
        root: ELPV folder with ``labels.csv`` and ``images/``; ``None`` for the installed package.

    Returns:
        int: How many cells were written.
    """
    samples = make_elpv_dataset(root, category, include_uncertain=True)
    uncertain = samples.loc[samples["defect_probability"].between(0, 1, inclusive="neither"), "image_path"]
    folder.mkdir(parents=True, exist_ok=True)
    for path in uncertain:
        Image.open(path).convert("RGB").save(folder / f"{Path(path).stem}.png")
    return len(uncertain)


def main() -> None:
    """Write a tuning set from the command line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path, help="where to write it")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", type=Path, help="a folder of normal training images")
    source.add_argument("--elpv", choices=["mono", "poly"], help="the training cells of this ELPV category")
    parser.add_argument("--holdout", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--anomalies", nargs="+", choices=ANOMALIES, default=["perlin"], help="kinds of anomalous copies")
    parser.add_argument(
        "--crack-darkening", nargs=2, type=float, default=list(CRACK_DARKENING), metavar=("LOW", "HIGH"),
        help="range of the share by which cracks darken the cell",
    )
    parser.add_argument(
        "--inactive-darkening", nargs=2, type=float, default=list(INACTIVE_DARKENING), metavar=("LOW", "HIGH"),
        help="range of the share by which an inactive copy's cut-off part is darkened",
    )
    parser.add_argument(
        "--uncertain-cells", action="store_true",
        help="with --elpv: also copy the cells of defect probability 1/3 or 2/3 to test/uncertain (real, not training, cells)",
    )
    arguments = parser.parse_args()
    if arguments.uncertain_cells and arguments.elpv is None:
        parser.error("--uncertain-cells needs --elpv: only ELPV has cells of uncertain defect probability.")
    if arguments.images is not None:
        images = sorted(arguments.images.glob("*.png"))
    else:
        samples = make_elpv_dataset(elpv_root(), arguments.elpv)
        images = [Path(path) for path in samples.loc[samples["split"] == "train", "image_path"]]
    make_validation_set(
        images,
        arguments.root,
        holdout=arguments.holdout,
        seed=arguments.seed,
        anomalies=arguments.anomalies,
        crack_darkening=tuple(arguments.crack_darkening),
        inactive_darkening=tuple(arguments.inactive_darkening),
    )
    if arguments.uncertain_cells:
        written = write_uncertain_cells(arguments.root / "validation" / "test" / "uncertain", arguments.elpv)
        print(f"Copied {written} cells of uncertain defect probability")
    print(f"Wrote {arguments.root / 'validation'}")


if __name__ == "__main__":
    main()
