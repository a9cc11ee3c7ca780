"""Which nodes of DADF's f32-marked OpenVINO export the CPU plugin still runs in bf16.

Exports an untrained lite DADF (the paper's three views, so the attention blocks are in the graph) with
DADF's f32 marking, compiles it for the CPU with no precision hint, and counts the compiled model's
nodes by layer type and ``runtimePrecision``. A second check stores ``INFERENCE_PRECISION_HINT: f32`` in
the IR's ``rt_info["runtime_options"]`` and reports the precision the plugin compiles it at. On a CPU
without bf16 everything reports f32.

    python benchmarks/bf16_precision.py         # writes benchmarks/results/bf16_precision.md
"""

import argparse
import collections
import sys
import tempfile
from pathlib import Path

import openvino as ov

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from anomalib_dadf import Dadf

LITE = {"embed_dim": 64, "depth": 2, "num_heads": 4, "mlp_ratio": 2.0, "flow_steps": 4}  # configs/dadf_lite.yaml


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "bf16_precision.md")
    arguments = parser.parse_args()
    core = ov.Core()
    with tempfile.TemporaryDirectory() as scratch:
        model = Dadf(backbone="resnet18", pre_trained=False, **LITE).eval()
        model.flow_steps_trained += 1  # the export guard asks for trained flows; precision does not depend on it
        xml = model.to_openvino(Path(scratch) / "dadf")
        counts = collections.Counter()
        for node in core.compile_model(str(xml), "CPU").get_runtime_model().get_ordered_ops():
            info = node.get_rt_info()
            counts[(info["layerType"].astype(str), info["runtimePrecision"].astype(str))] += 1
        hinted = core.read_model(xml)
        hinted.set_rt_info("f32", ["runtime_options", "INFERENCE_PRECISION_HINT"])
        hinted_path = Path(scratch) / "hinted.xml"
        ov.save_model(hinted, hinted_path, compress_to_fp16=False)
        hinted_precision = core.compile_model(str(hinted_path), "CPU").get_property("INFERENCE_PRECISION_HINT")
    bf16 = sorted((layer, count) for (layer, precision), count in counts.items() if precision == "bf16")
    lines = [
        "# Runtime precision of DADF's f32-marked OpenVINO export (`python benchmarks/bf16_precision.py`)",
        "",
        (f"OpenVINO {ov.__version__}; the CPU's default inference precision: "
        f"{core.get_property('CPU', 'INFERENCE_PRECISION_HINT').get_type_name()}. Lite DADF, ResNet-18 prior, "
        "256x256, compiled with no precision hint."),
        "",
        "| layer type | runtime precision | nodes |",
        "|---|---|---|",
        *(f"| {layer} | {precision} | {count} |" for (layer, precision), count in sorted(counts.items())),
        "",
        f"Layer types with bf16 nodes: {', '.join(f'{layer} ({count})' for layer, count in bf16) or 'none'}.",
        "",
        (f"With `INFERENCE_PRECISION_HINT: f32` in the IR's `rt_info[\"runtime_options\"]`, the plugin compiles at "
        f"{hinted_precision.get_type_name()}."),
    ]
    arguments.output.parent.mkdir(parents=True, exist_ok=True)
    arguments.output.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
