"""Measure how far each OpenVINO export of DADF strays from the Lightning model.

Trains the test suite's tiny DADF on its toy data once per seed (exactly the setting of
``tests/test_export.py``), exports it as FP32, FP16, INT8 (weights) and INT8_PTQ, and compares every
export, loaded with OpenVINO's default settings as a user loads it, with the Lightning model on the
test images (``anomalib_dadf.parity``). FP32 is also run without DADF's f32 marking
(``anomalib_dadf.deploy.allow_bf16``), both at the CPU's default precision (bf16 where the CPU has it) and pinned
to f32. The worst case over seeds is what the test suite's tolerances are set from; INT8 kernels
differ between CPUs, so the CPU's instruction sets are written beside the table. ``--flow-inputs prior``
measures the views of the quickstart's chosen setting (a flow on the prior alone, no Transformer in
the export) on the same tiny model.

    python benchmarks/export_tolerance.py            # writes benchmarks/results/export_tolerance.md
    python benchmarks/export_tolerance.py --flow-inputs prior --output benchmarks/results/export_tolerance_prior.md
"""

import argparse
import os
import sys
import tempfile
from pathlib import Path

import openvino as ov
from anomalib.deploy import CompressionType, ExportType
from anomalib.engine import Engine
from lightning.pytorch import seed_everything

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from anomalib_dadf import Dadf
from anomalib_dadf.data import MVTec
from anomalib_dadf.data.synthetic import make_mvtec
from anomalib_dadf.deploy import allow_bf16
from anomalib_dadf.parity import F32, compare, exported_predictions, lightning_predictions
from tests.conftest import TINY_MODEL, small_pre_processor

# name: (compression, f32 marking kept, inferencer config)
VARIANTS = {
    "FP32": (None, True, None),
    "FP32 unmarked, CPU default precision": (None, False, None),
    "FP32 unmarked, pinned to f32": (None, False, F32),
    "FP16": (CompressionType.FP16, True, None),
    "INT8 (weights)": (CompressionType.INT8, True, None),
    "INT8_PTQ": (CompressionType.INT8_PTQ, True, None),
}


def measure(seed: int, work: Path, flow_inputs: list[str]) -> dict[str, dict[str, float]]:
    root = make_mvtec(work / "data")
    seed_everything(seed)
    datamodule = MVTec(
        root=root, category="widget", train_batch_size=4, eval_batch_size=4, num_workers=0,
        val_split_mode="synthetic", val_split_ratio=0.25, seed=0,
    )
    model = Dadf(
        **TINY_MODEL, reconstruction_epochs=2, flow_epochs=3, flow_inputs=flow_inputs,
        pre_processor=small_pre_processor(),
    )
    Engine(default_root_dir=work, accelerator="cpu", devices=1).train(model=model, datamodule=datamodule)
    images = sorted((root / "widget" / "test").rglob("*.png"))
    expected = lightning_predictions(model, images)
    results = {}
    for index, (name, (compression, marked, config)) in enumerate(VARIANTS.items()):
        exported = Engine(default_root_dir=work).export(
            model=model, export_type=ExportType.OPENVINO, export_root=work / f"export{index}",
            compression_type=compression, datamodule=datamodule,
        )
        if not marked:
            allow_bf16(exported)
        results[name] = compare(expected, exported_predictions(exported, images, config))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--flow-inputs", nargs="+", default=["prior", "local", "global"], metavar="VIEW")
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "export_tolerance.md")
    arguments = parser.parse_args()

    runs, start = [], Path.cwd()
    for seed in range(arguments.seeds):
        with tempfile.TemporaryDirectory() as scratch:
            os.chdir(scratch)  # the inferencer writes its compile cache into the working directory
            try:
                runs.append(measure(seed, Path(scratch), arguments.flow_inputs))
            finally:
                os.chdir(start)
    core = ov.Core()
    cpu = (
        f"{core.get_property('CPU', 'FULL_DEVICE_NAME')}; OpenVINO {ov.__version__}; default inference precision "
        f"{core.get_property('CPU', 'INFERENCE_PRECISION_HINT').get_type_name()}; capabilities "
        f"{', '.join(core.get_property('CPU', 'OPTIMIZATION_CAPABILITIES'))}"
    )
    views = " ".join(arguments.flow_inputs)
    lines = [
        f"# Export tolerance (`python benchmarks/export_tolerance.py --seeds {arguments.seeds} --flow-inputs {views}`)",
        "",
        "Worst case over seeds of each export against the Lightning model on the toy test images:",
        "score error = max |score difference| / score range; labels = share of equal labels (worst seed).",
        f"CPU: {cpu}.",
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
