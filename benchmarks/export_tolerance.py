"""Measure how far each OpenVINO export of DADF strays from the Lightning model.

Trains the test suite's tiny DADF on its toy data once per seed (exactly the setting of
``tests/test_export.py``), exports it as FP32, FP16, INT8 (weights) and INT8_PTQ, and compares every
export with the Lightning model on the test images (``anomalib_dadf.parity``). FP32 is also run
at OpenVINO's CPU default precision (bf16 where the CPU has it) to show why parity pins f32.
The worst case over seeds is what the test suite's tolerances are set from.

    python benchmarks/export_tolerance.py            # writes benchmarks/results/export_tolerance.md
"""

import argparse
import os
import sys
import tempfile
from pathlib import Path

from anomalib.deploy import CompressionType, ExportType
from anomalib.engine import Engine
from lightning.pytorch import seed_everything

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from anomalib_dadf import Dadf
from anomalib_dadf.data import MVTec
from anomalib_dadf.data.synthetic import make_mvtec
from anomalib_dadf.parity import compare, exported_predictions, lightning_predictions
from tests.conftest import TINY_MODEL, small_pre_processor

VARIANTS = {
    "FP32 (f32)": (None, None),
    "FP32 (CPU default precision)": (None, {}),
    "FP16": (CompressionType.FP16, None),
    "INT8 (weights)": (CompressionType.INT8, None),
    "INT8_PTQ": (CompressionType.INT8_PTQ, None),
}


def measure(seed: int, work: Path) -> dict[str, dict[str, float]]:
    root = make_mvtec(work / "data")
    seed_everything(seed)
    datamodule = MVTec(
        root=root, category="widget", train_batch_size=4, eval_batch_size=4, num_workers=0,
        val_split_mode="synthetic", val_split_ratio=0.25, seed=0,
    )
    model = Dadf(**TINY_MODEL, reconstruction_epochs=2, flow_epochs=3, pre_processor=small_pre_processor())
    Engine(default_root_dir=work, accelerator="cpu", devices=1).train(model=model, datamodule=datamodule)
    images = sorted((root / "widget" / "test").rglob("*.png"))
    expected = lightning_predictions(model, images)
    results = {}
    for name, (compression, config) in VARIANTS.items():
        exported = Engine(default_root_dir=work).export(
            model=model, export_type=ExportType.OPENVINO, export_root=work / name.split()[0],
            compression_type=compression, datamodule=datamodule,
        )
        results[name] = compare(expected, exported_predictions(exported, images, config))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "export_tolerance.md")
    arguments = parser.parse_args()

    runs, start = [], Path.cwd()
    for seed in range(arguments.seeds):
        with tempfile.TemporaryDirectory() as scratch:
            os.chdir(scratch)  # the inferencer writes its compile cache into the working directory
            try:
                runs.append(measure(seed, Path(scratch)))
            finally:
                os.chdir(start)
    lines = [
        f"# Export tolerance (`python benchmarks/export_tolerance.py --seeds {arguments.seeds}`)",
        "",
        "Worst case over seeds of each export against the Lightning model on the toy test images:",
        "score error = max |score difference| / score range; labels = share of equal labels (worst seed).",
        "",
        "| export | score error (worst) | score error (median) | map Pearson (worst) | labels (worst) |",
        "|---|---|---|---|---|",
    ]
    for name in VARIANTS:
        errors = sorted(run[name]["score_error"] for run in runs)
        lines.append(
            f"| {name} | {errors[-1]:.2e} | {errors[len(errors) // 2]:.2e} | "
            f"{min(run[name]['map_pearson'] for run in runs):.5f} | "
            f"{min(run[name]['label_agreement'] for run in runs):.3f} |",
        )
    arguments.output.parent.mkdir(parents=True, exist_ok=True)
    arguments.output.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
