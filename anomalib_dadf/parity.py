"""Compare an exported model with the Lightning model it came from, on the same images.

Both run exactly as in deployment: images read by anomalib's ``read_image``, prepared by
``OpenVINOInferencer.pre_process`` and passed one at a time through the whole model (pre-processing,
network, post-processing). The export is loaded as a user loads it, with OpenVINO's default
settings: DADF's exports carry their own f32 marking (:mod:`anomalib_dadf.deploy`), so they score at
f32 also on CPUs where OpenVINO would otherwise compute in bf16. ``F32`` pins the precision of an
export without that marking (another model's, or one after ``python -m anomalib_dadf.deploy --allow-bf16``).

Example:
    >>> from anomalib_dadf import Dadf
    >>> from anomalib_dadf.parity import compare, exported_predictions, lightning_predictions
    >>> model = Dadf.load_from_checkpoint("model.ckpt").eval()  # doctest: +SKIP
    >>> images = sorted(Path("images").glob("*.png"))  # doctest: +SKIP
    >>> compare(lightning_predictions(model, images), exported_predictions("model.xml", images))  # doctest: +SKIP
    {'score_error': 2.1e-06, 'map_pearson': 0.99999, 'label_agreement': 1.0}
"""

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from anomalib.data.utils import read_image
from anomalib.deploy import OpenVINOInferencer
from anomalib.models.components import AnomalibModule

F32 = {"INFERENCE_PRECISION_HINT": "f32"}

Predictions = dict[str, np.ndarray]


def _stack(outputs: Sequence[object]) -> Predictions:
    return {
        "pred_score": np.array([float(np.asarray(output.pred_score).squeeze()) for output in outputs]),
        "pred_label": np.array([bool(np.asarray(output.pred_label).squeeze()) for output in outputs]),
        "anomaly_map": np.stack([np.asarray(output.anomaly_map).squeeze() for output in outputs]),
    }


def lightning_predictions(model: AnomalibModule, images: Sequence[Path]) -> Predictions:
    """Post-processed scores, labels and maps of the Lightning model, one image at a time."""
    model.eval()
    with torch.no_grad():
        return _stack([
            model(torch.from_numpy(OpenVINOInferencer.pre_process(read_image(path, as_tensor=False))))
            for path in images
        ])


def exported_predictions(model_path: Path | str, images: Sequence[Path], config: dict | None = None) -> Predictions:
    """The same through anomalib's ``OpenVINOInferencer`` (OpenVINO IR or ONNX), with its default settings unless ``config``."""
    inferencer = OpenVINOInferencer(model_path, device="CPU", config=config)
    return _stack([inferencer.predict(path) for path in images])


def compare(expected: Predictions, got: Predictions) -> dict[str, float]:
    """Worst score difference relative to the expected score range, map correlation, share of equal labels."""
    score_range = float(np.ptp(expected["pred_score"])) or 1.0
    return {
        "score_error": float(np.max(np.abs(got["pred_score"] - expected["pred_score"]))) / score_range,
        "map_pearson": float(np.corrcoef(got["anomaly_map"].ravel(), expected["anomaly_map"].ravel())[0, 1]),
        "label_agreement": float(np.mean(got["pred_label"] == expected["pred_label"])),
    }
