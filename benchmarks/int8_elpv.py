"""Accuracy and speed of DADF's OpenVINO exports on the real ELPV test set: FP32, INT8 weights, INT8_PTQ.

Takes a checkpoint trained on ELPV (the quickstart writes one), exports it three ways as
``anomalib export`` would (INT8_PTQ calibrates on the data module's validation images, which come
from training cells, never test cells), scores every test cell through anomalib's
``OpenVINOInferencer`` at f32 and reports image AUROC and the median milliseconds per image
(batch 1, image reading included), the variants interleaved image by image.

    anomalib train --config configs/quickstart.yaml
    python benchmarks/int8_elpv.py --ckpt results/Dadf/ELPV/mono/latest/weights/lightning/model.ckpt
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from anomalib.deploy import CompressionType, OpenVINOInferencer
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from anomalib_dadf import Dadf  # noqa: E402
from anomalib_dadf.data import ELPV  # noqa: E402
from anomalib_dadf.parity import F32  # noqa: E402

VARIANTS = {"FP32": None, "INT8 (weights)": CompressionType.INT8, "INT8_PTQ": CompressionType.INT8_PTQ}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", type=Path, required=True)
    parser.add_argument("--category", default="mono")
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "int8_elpv.md")
    arguments = parser.parse_args()

    model = Dadf.load_from_checkpoint(arguments.ckpt)
    datamodule = ELPV(category=arguments.category, train_batch_size=16, eval_batch_size=16, num_workers=0)
    datamodule.setup()
    test = datamodule.test_data.samples
    paths, labels = list(test["image_path"]), np.asarray(test["label_index"], dtype=int)

    with tempfile.TemporaryDirectory() as scratch:
        inferencers = {
            name: OpenVINOInferencer(
                model.to_openvino(Path(scratch) / name.split()[0], compression_type=compression, datamodule=datamodule),
                device="CPU",
                config=F32,
            )
            for name, compression in VARIANTS.items()
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
        f"Checkpoint: `{arguments.ckpt}`. {len(paths)} test cells, batch 1, f32 inference, image reading included.",
        "",
        "| variant | image AUROC | ms / image (median) | speed-up over FP32 |",
        "|---|---|---|---|",
        *(
            f"| {name} | {roc_auc_score(labels, scores[name]):.3f} | {statistics.median(times[name]):.1f} | "
            f"{fp32 / statistics.median(times[name]):.2f} |"
            for name in VARIANTS
        ),
    ]
    arguments.output.parent.mkdir(parents=True, exist_ok=True)
    arguments.output.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
