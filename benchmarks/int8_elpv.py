"""Accuracy and speed of DADF's OpenVINO exports on the real ELPV test set: FP32, INT8 weights, INT8_PTQ.

Takes a checkpoint trained on ELPV (the quickstart writes one) and exports it as ``anomalib export``
would: FP32 (also with bf16 allowed, ``python -m anomalib_dadf.deploy --allow-bf16``, at the CPU's
default precision), INT8 (weights only), INT8_PTQ (DADF's scheme: calibrated on training cells,
NNCF's Transformer preset where the export holds the Transformer, a fixed-size export's resize kept
in float; also with the Transformer preset whatever the export holds), INT8_ACQ (the same, with
NNCF's accuracy control on the validation split) and, for comparison, INT8_PTQ with anomalib's
default scheme (calibrated on the validation split, 10 % of the
training cells with synthetic anomalies). It scores the validation images and every test cell
through anomalib's ``OpenVINOInferencer`` at f32 and reports the Spearman correlation of each
variant's image scores with FP32's on the validation images (how the PTQ scheme was chosen: it needs
no test data), image AUROC on the test cells, and the median milliseconds per test image (batch 1,
image reading included), the variants interleaved image by image.
With ``--input-size H W`` every variant is exported for images of that size (ELPV's cells: 300 300),
which keeps the trained antialiased resize inside the export; without it the exports take any size
and resize without antialiasing (the README's deployment section).

    anomalib train --config configs/quickstart.yaml
    python benchmarks/int8_elpv.py --ckpt results/Dadf/ELPV/mono/latest/weights/lightning/model.ckpt
    python benchmarks/int8_elpv.py --ckpt ... --input-size 300 300 --output benchmarks/results/int8_elpv_300.md
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import openvino as ov
from anomalib.deploy import CompressionType, OpenVINOInferencer
from anomalib.models.components import AnomalibModule
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from anomalib_dadf import Dadf
from anomalib_dadf.data import ELPV
from anomalib_dadf.deploy import allow_bf16
from anomalib_dadf.parity import F32


class AnomalibDefaultPtq(Dadf):
    """DADF exported with anomalib's own INT8_PTQ scheme, for comparison."""

    _post_training_quantization_ov = staticmethod(AnomalibModule._post_training_quantization_ov)


class TransformerSchemePtq(Dadf):
    """DADF's INT8_PTQ with NNCF's Transformer scheme whatever the export holds, for comparison."""

    def _quantization_setup(self, *args: object) -> dict:
        import nncf

        return {**super()._quantization_setup(*args), "model_type": nncf.ModelType.TRANSFORMER}


# name: (model class, compression, run at the CPU's default precision without DADF's f32 marking)
VARIANTS = {
    "FP32": (Dadf, None, False),
    "FP32, bf16 allowed (CPU default precision)": (Dadf, None, True),
    "INT8 (weights)": (Dadf, CompressionType.INT8, False),
    "INT8_PTQ": (Dadf, CompressionType.INT8_PTQ, False),
    "INT8_PTQ, NNCF's Transformer scheme": (TransformerSchemePtq, CompressionType.INT8_PTQ, False),
    "INT8_ACQ (max_drop 0.01 of image F1 on the validation split)": (Dadf, CompressionType.INT8_ACQ, False),
    "INT8_PTQ, anomalib's default scheme": (AnomalibDefaultPtq, CompressionType.INT8_PTQ, False),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", type=Path, required=True)
    parser.add_argument("--category", default="mono")
    parser.add_argument("--input-size", type=int, nargs=2, metavar=("H", "W"), help="export for images of this size")
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "int8_elpv.md")
    arguments = parser.parse_args()

    datamodule = ELPV(category=arguments.category, train_batch_size=16, eval_batch_size=16, num_workers=0)
    datamodule.setup()
    test = datamodule.test_data.samples
    paths, labels = list(test["image_path"]), np.asarray(test["label_index"], dtype=int)

    with tempfile.TemporaryDirectory() as scratch:
        inferencers = {}
        for index, (name, (model_class, compression, bf16)) in enumerate(VARIANTS.items()):
            model = model_class.load_from_checkpoint(arguments.ckpt)
            exported = model.to_openvino(
                Path(scratch) / str(index),
                input_size=arguments.input_size and tuple(arguments.input_size),
                compression_type=compression,
                datamodule=datamodule,
            )
            if bf16:
                allow_bf16(exported)
            inferencers[name] = OpenVINOInferencer(exported, device="CPU", config=None if bf16 else F32)
        # Calibration sets the data module up anew, which replaces (and deletes) its synthetic validation images.
        validation = list(datamodule.val_data.samples["image_path"])
        agreement = {
            name: [float(np.squeeze(inferencer.predict(path).pred_score)) for path in validation]
            for name, inferencer in inferencers.items()
        }
        scores = {name: [] for name in VARIANTS}
        times = {name: [] for name in VARIANTS}
        for path in paths:
            for name, inferencer in inferencers.items():
                start = time.perf_counter()
                prediction = inferencer.predict(path)
                times[name].append((time.perf_counter() - start) * 1000)
                scores[name].append(float(np.squeeze(prediction.pred_score)))

    fp32 = statistics.median(times["FP32"])
    lines = [
        f"# OpenVINO INT8 on ELPV {arguments.category} (`python benchmarks/int8_elpv.py --ckpt CKPT`)",
        "",
        (
            f"Checkpoint: `{arguments.ckpt}`. Exported for "
            f"{'images of ' + ' x '.join(map(str, arguments.input_size)) if arguments.input_size else 'any image size'}. "
            "Agreement: Spearman correlation with FP32's image scores on the "
            f"{len(validation)} validation images. {len(paths)} test cells, batch 1, f32 inference (but for the bf16 "
            f"row), image reading included. The CPU's default inference precision: "
            f"{ov.Core().get_property('CPU', 'INFERENCE_PRECISION_HINT').get_type_name()} (f32 means this CPU has no bf16, and the "
            "bf16 row runs at f32)."
        ),
        "",
        "| variant | agreement with FP32 (validation) | image AUROC (test) | ms / image (median) | speed-up over FP32 |",
        "|---|---|---|---|---|",
        *(
            f"| {name} | {spearmanr(agreement[name], agreement['FP32']).statistic:.3f} | "
            f"{roc_auc_score(labels, scores[name]):.3f} | {statistics.median(times[name]):.1f} | "
            f"{fp32 / statistics.median(times[name]):.2f} |"
            for name in VARIANTS
        ),
    ]
    arguments.output.parent.mkdir(parents=True, exist_ok=True)
    arguments.output.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
