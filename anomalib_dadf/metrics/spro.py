"""sPRO, the saturated per-region overlap of MVTec LOCO AD, as an anomalib metric.

anomalib's ``MVTecLOCO`` batches carry a merged binary mask and at most one mask path, while sPRO
needs every defect separately and its saturation threshold. So this metric reads the ground truth
itself, from the image paths in the batch and the data set's MVTec LOCO layout::

    <category>/defects_config.json
    <category>/test/<defect type>/<name>.png
    <category>/ground_truth/<defect type>/<name>/<one PNG per defect>.png

Each ground-truth PNG holds one defect with a single positive pixel value; ``defects_config.json``
maps that value to the defect's saturation threshold, absolute (pixels, capped at the defect's area)
or relative (``int(fraction * area)``). Anomaly maps are kept at model resolution and resized
(bilinearly, like anomalib's own metrics) to each image's original size one image at a time.

Example:
    >>> from anomalib.metrics import AUROC, Evaluator
    >>> from anomalib.models import Patchcore
    >>> from anomalib_dadf.metrics import SPRO
    >>> evaluator = Evaluator(test_metrics=[AUROC(fields=["pred_score", "gt_label"], prefix="image_"), SPRO()])
    >>> model = Patchcore(evaluator=evaluator)  # doctest: +SKIP
"""

import json
from collections.abc import Iterator, Sequence
from functools import cache
from pathlib import Path

import numpy as np
import torch
from anomalib.metrics import AnomalibMetric
from PIL import Image
from torch.nn import functional as F  # noqa: N812
from torchmetrics import Metric

from .spro_curve import Defect, spro_auc

GOOD = "good"


@cache
def load_defects_config(path: Path) -> dict[int, tuple[float, bool]]:
    """Map each mask pixel value to ``(saturation_threshold, relative)`` from a ``defects_config.json``.

    Raises:
        FileNotFoundError: The file does not exist.
        ValueError: The file is not a JSON list of defects with the MVTec LOCO keys.
    """
    if not path.is_file():
        msg = (
            f"sPRO needs the data set's defects_config.json, which is missing: {path}. It comes with MVTec LOCO AD; "
            "for another data set, write one (a list of {defect_name, pixel_value, saturation_threshold, "
            "relative_saturation})."
        )
        raise FileNotFoundError(msg)
    try:
        entries = json.loads(path.read_text())
        return {
            int(entry["pixel_value"]): (float(entry["saturation_threshold"]), bool(entry["relative_saturation"]))
            for entry in entries
        }
    except (json.JSONDecodeError, TypeError, KeyError, ValueError) as error:
        msg = (
            f"Malformed {path} ({type(error).__name__}: {error}): expected a JSON list of objects with "
            "'pixel_value', 'saturation_threshold' and 'relative_saturation'."
        )
        raise ValueError(msg) from error


def image_defects(image_path: Path) -> tuple[tuple[int, int], list[Defect]]:
    """Original ``(height, width)`` of a test image and its ground-truth defects, from the LOCO layout.

    Raises:
        FileNotFoundError: An anomalous image without a ground-truth folder, or a missing config.
        ValueError: A mask value that the config does not list, or a mask of another size than the image.
    """
    with Image.open(image_path) as image:
        size = (image.height, image.width)
    defect_type, category = image_path.parent.name, image_path.parents[2]
    if defect_type == GOOD:
        return size, []
    truth = category / "ground_truth" / defect_type / image_path.stem
    mask_files = sorted(truth.glob("*.png"))
    if not mask_files:
        msg = f"No ground-truth masks for anomalous image {image_path}: expected PNGs in {truth}."
        raise FileNotFoundError(msg)
    config = load_defects_config(category / "defects_config.json")
    defects = []
    for mask_file in mask_files:
        mask = np.asarray(Image.open(mask_file))
        mask = mask[..., 0] if mask.ndim == 3 else mask
        if mask.shape != size:
            msg = f"Mask {mask_file} is {mask.shape[1]}x{mask.shape[0]} but its image is {size[1]}x{size[0]}."
            raise ValueError(msg)
        values = np.unique(mask[mask > 0])
        unknown = [int(value) for value in values if int(value) not in config]
        if unknown:
            msg = f"Mask {mask_file} has pixel value(s) {unknown} that {category / 'defects_config.json'} does not list."
            raise ValueError(msg)
        for value in values:
            region = mask == value
            threshold, relative = config[int(value)]
            area = int(region.sum())
            saturation = int(threshold * area) if relative else min(int(threshold), area)
            defects.append(Defect(region, max(saturation, 1)))
    return size, defects


class _SPRO(Metric):
    """Area under the sPRO curve up to an FPR of ``integration_limit``, normalised to [0, 1].

    Args:
        integration_limit: Upper FPR limit of the integration. Defaults to ``0.05`` (MVTec's).
        kwargs: Passed to :class:`torchmetrics.Metric`.

    Note:
        The metric reads ground truth from files named by the batch, which cannot be synchronised
        between processes: under DDP each process reports sPRO of its own share of the test set.
        A test set with only good images raises ``ValueError`` (sPRO is undefined without defects).
    """

    full_state_update = False

    def __init__(self, integration_limit: float = 0.05, **kwargs) -> None:
        super().__init__(**kwargs)
        if not 0.0 < integration_limit <= 1.0:
            msg = f"integration_limit must lie in (0, 1], got {integration_limit}."
            raise ValueError(msg)
        self.integration_limit = integration_limit
        self.anomaly_maps: list[torch.Tensor] = []
        self.image_paths: list[Path] = []

    def update(self, anomaly_map: torch.Tensor, image_path: Sequence[str]) -> None:  # type: ignore[override]
        """Keep a batch's maps (at model resolution, on the CPU) and the paths of their images."""
        maps = anomaly_map.detach().float().cpu()
        maps = maps.reshape(maps.shape[0], *maps.shape[-2:])
        if len(image_path) != maps.shape[0]:
            msg = f"{maps.shape[0]} anomaly maps but {len(image_path)} image paths in the batch."
            raise ValueError(msg)
        self.anomaly_maps.extend(maps)
        self.image_paths.extend(Path(path) for path in image_path)

    def reset(self) -> None:
        """Forget every stored map and path."""
        super().reset()
        self.anomaly_maps, self.image_paths = [], []

    def _stream(self, indices: Sequence[int]) -> Iterator[tuple[np.ndarray, list[Defect]]]:
        for index in indices:
            size, defects = image_defects(self.image_paths[index])
            scores = F.interpolate(self.anomaly_maps[index][None, None], size=size, mode="bilinear", align_corners=False)
            yield scores[0, 0].double().numpy(), defects

    def _spro(self, indices: Sequence[int]) -> torch.Tensor:
        return torch.tensor(spro_auc(lambda: self._stream(indices), self.integration_limit))

    def compute(self) -> torch.Tensor:
        """sPRO over every stored image."""
        return self._spro(range(len(self.image_paths)))

    def compute_per_type(self) -> dict[str, torch.Tensor]:
        """sPRO of each defect type (for example structural and logical), each on good images plus that type."""
        types = sorted({path.parent.name for path in self.image_paths} - {GOOD})
        good = [index for index, path in enumerate(self.image_paths) if path.parent.name == GOOD]
        return {
            defect_type: self._spro(
                good + [index for index, path in enumerate(self.image_paths) if path.parent.name == defect_type],
            )
            for defect_type in types
        }


class SPRO(AnomalibMetric, _SPRO):  # type: ignore[misc]
    """sPRO for anomalib's :class:`~anomalib.metrics.Evaluator`: reads ``anomaly_map`` and ``image_path``.

    Logged as ``pixel_SPRO`` by default.
    """

    default_fields = ("anomaly_map", "image_path")

    def __init__(self, integration_limit: float = 0.05, prefix: str = "pixel_", **kwargs) -> None:
        super().__init__(prefix=prefix, integration_limit=integration_limit, **kwargs)
