"""Images resized the way DADF was trained on them, also in its exported models.

anomalib writes a model's pre-processing into every export with antialiasing turned off in each
``Resize`` (its ONNX route, and OpenVINO's reading of an antialiased ONNX ``Resize``, do not carry it).
Training and ``anomalib test`` downscale with antialiasing, so an export fed large images sees aliased
ones it never learned: on ELPV mono's 300 x 300 cells at 128 x 128 that cost 2.6-3.5 points of image AUROC
(``benchmarks/export_resize.py``). Two ways keep it:

- Export for the size of your images (``input_size`` of the export): for one input size the antialiased
  resize is a fixed linear map, :class:`FixedSizeResize`, two matrix products that every runtime runs;
  DADF's exports put it in place of the first ``Resize``.
- Or resize each image to the model's input size with antialiasing before it reaches a dynamic-size
  export (:func:`read_resized`): the graph's own resize then leaves it unchanged.

Example:
    >>> import torch
    >>> from torchvision.transforms.v2 import Resize
    >>> from anomalib_dadf.resize import FixedSizeResize
    >>> images = torch.rand(2, 3, 300, 240)
    >>> expected = Resize([128, 96], antialias=True)(images)
    >>> torch.allclose(FixedSizeResize((300, 240), (128, 96))(images), expected, atol=1e-5)
    True
    >>> from anomalib.deploy import OpenVINOInferencer
    >>> from anomalib_dadf.resize import read_resized
    >>> inferencer = OpenVINOInferencer("weights/openvino/model.xml", device="CPU")  # doctest: +SKIP
    >>> inferencer.predict(read_resized("cell.png", (128, 128)))  # doctest: +SKIP
"""

from collections.abc import Sequence
from pathlib import Path

import torch
from anomalib.data.utils import read_image
from torch import nn
from torch.nn import functional as F  # noqa: N812
from torchvision.transforms.v2 import Resize


def read_resized(path: str | Path, input_size: Sequence[int]) -> torch.Tensor:
    """Read an image file and resize it to ``input_size`` (height, width) with antialiasing.

    Returns:
        The image as a height x width x channels float tensor in [0, 1], the layout anomalib's
        inferencers take.
    """
    return Resize(list(input_size), antialias=True)(read_image(path, as_tensor=True)).permute(1, 2, 0)


def _resize_weights(source: int, target: int) -> torch.Tensor:
    """``(target, source)`` weights of torch's antialiased bilinear resize along one axis.

    Each column is what the resize makes of a unit impulse at that source position. The impulses are two
    pixels wide: torch's kernel mishandles one-pixel-wide images (its weights then come out wrong).
    """
    impulses = torch.eye(source).reshape(source, 1, source, 1).expand(source, 1, source, 2).contiguous()
    responses = F.interpolate(impulses, size=(target, 2), mode="bilinear", antialias=True, align_corners=False)
    return responses[:, 0, :, 0].T.contiguous()


class FixedSizeResize(nn.Module):
    """torchvision's antialiased bilinear ``Resize`` of images of one size, as two matrix products.

    The antialiased resize filters each axis separately with weights that depend only on the two sizes,
    so for a fixed input size it is ``rows @ image @ columns.T``. Unlike an antialiased ``Resize`` node,
    that survives ONNX and OpenVINO unchanged.

    Args:
        input_size: Height and width of the images it takes.
        output_size: Height and width it resizes them to.
    """

    def __init__(self, input_size: Sequence[int], output_size: Sequence[int]) -> None:
        super().__init__()
        self.register_buffer("rows", _resize_weights(input_size[0], output_size[0]))
        self.register_buffer("columns", _resize_weights(input_size[1], output_size[1]))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Resize ``(..., H, W)`` images of the input size."""
        return self.rows @ images @ self.columns.T
