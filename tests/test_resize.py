"""Images resized for an export see what training saw; the export's own resize does not."""

from pathlib import Path

import numpy as np
import torch
from anomalib.data.utils import read_image
from anomalib.pre_processing.utils.transform import get_exportable_transform
from PIL import Image

from anomalib_dadf.resize import read_resized

from .conftest import small_pre_processor


def test_read_resized_gives_the_export_what_training_saw(tmp_path: Path) -> None:
    path = tmp_path / "fine_texture.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (150, 150, 3), dtype=np.uint8)).save(path)
    transform = small_pre_processor(64).transform
    export_transform = get_exportable_transform(transform)
    trained_view = transform(read_image(path, as_tensor=True))

    resized = read_resized(path, (64, 64))

    assert resized.shape == (64, 64, 3)
    assert torch.allclose(export_transform(resized.permute(2, 0, 1)), trained_view, atol=1e-5)
    as_read = export_transform(read_image(path, as_tensor=True))
    assert (as_read - trained_view).abs().max() > 0.5, "the export's resize aliases a fine texture"
