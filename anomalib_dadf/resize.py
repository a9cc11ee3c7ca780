"""Images resized the way DADF was trained on them, for its exported models.

anomalib writes a model's pre-processing into every export with antialiasing turned off in each
``Resize`` (its ONNX route, and OpenVINO's reading of an antialiased ONNX ``Resize``, do not carry it).
Training and ``anomalib test`` downscale with antialiasing, so an export fed large images sees aliased
ones it never learned: on ELPV mono's 300 x 300 cells at 128 x 128 that costs 3.5 points of image AUROC
(``benchmarks/export_resize.py``). An image resized to the model's input size with antialiasing before
it reaches the export passes the graph's own resize unchanged, and scores as in training.

Example:
    >>> from anomalib.deploy import OpenVINOInferencer
    >>> from anomalib_dadf.resize import read_resized
    >>> inferencer = OpenVINOInferencer("weights/openvino/model.xml", device="CPU")  # doctest: +SKIP
    >>> inferencer.predict(read_resized("cell.png", (128, 128)))  # doctest: +SKIP
"""

from collections.abc import Sequence
from pathlib import Path

import torch
from anomalib.data.utils import read_image
from torchvision.transforms.v2 import Resize


def read_resized(path: str | Path, input_size: Sequence[int]) -> torch.Tensor:
    """Read an image file and resize it to ``input_size`` (height, width) with antialiasing.

    Returns:
        The image as a height x width x channels float tensor in [0, 1], the layout anomalib's
        inferencers take.
    """
    return Resize(list(input_size), antialias=True)(read_image(path, as_tensor=True)).permute(1, 2, 0)
