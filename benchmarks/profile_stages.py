"""Where DADF's OpenVINO inference time goes: per-stage times from OpenVINO's own performance counters.

The models are those of ``benchmarks/latency.py`` (ResNet-18 prior, 256x256, compiled at f32 and a
static batch), with the same deployed forward pass as ``anomalib export`` (pre-processing, network,
post-processing), but converted by OpenVINO straight from torch rather than through ONNX, so that
every node's name keeps the scope of the torch module it came from. With ``PERF_COUNT`` on, the CPU
plugin reports the time of every executed node; a node fused from several graph nodes (a
convolution with its batch norm, say) is assigned by the scopes of the nodes it was fused from, to
pre-processing, backbone, Transformer, flows, anomaly map or post-processing, and to "other" when
none of them kept a scope. Times are medians over rounds of the per-round stage sums, in ms per image.

    python benchmarks/profile_stages.py          # writes benchmarks/results/profile_stages.md
"""

import argparse
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import openvino as ov
import torch
from anomalib.models.components import AnomalibModule

sys.path.insert(0, str(Path(__file__).resolve().parent))

from latency import SIZE, Deployed, dadf, dadf_chosen, dadf_tuned, fastflow

from anomalib_dadf.parity import F32

# Module scopes in the exported graph, first match wins; FastFlow's names are mapped to the same stages.
STAGES = {
    "pre_processor": "pre-processing",
    "feature_extractor": "backbone",
    "transformer": "Transformer",
    "flows": "flows",
    "fast_flow_blocks": "flows",
    "norms": "flows",
    "anomaly_map_generator": "anomaly map",
    "post_processor": "post-processing",
}


def stage_of(original_names: str) -> str:
    """The stage of a compiled node, from the module scopes of the graph nodes it was fused from."""
    for name in original_names.split(","):
        modules = name.split("/")[0].split(".")
        if stage := next((stage for scope, stage in STAGES.items() if scope in modules), None):
            return stage
    return "other"


def profile(module: AnomalibModule, batch: int, rounds: int) -> dict[str, float]:
    """Median ms per image of each stage over ``rounds`` inferences."""
    model = ov.convert_model(Deployed(module.eval()), example_input=torch.rand(batch, 3, SIZE, SIZE))
    compiled = ov.Core().compile_model(model, "CPU", {**F32, "PERF_COUNT": True})
    fused_from = {
        node.get_friendly_name(): node.get_rt_info()["originalLayersNames"].astype(str)
        for node in compiled.get_runtime_model().get_ops()
        if "originalLayersNames" in node.get_rt_info()
    }
    request = compiled.create_infer_request()
    images = np.random.default_rng(0).random((batch, 3, SIZE, SIZE), dtype=np.float32)
    request.infer({0: images})  # warm-up
    samples: dict[str, list[float]] = defaultdict(list)
    for _ in range(rounds):
        request.infer({0: images})
        totals: dict[str, float] = defaultdict(float)
        for node in request.get_profiling_info():
            totals[stage_of(fused_from.get(node.node_name, node.node_name))] += node.real_time.total_seconds() * 1000 / batch
        for stage, milliseconds in totals.items():
            samples[stage].append(milliseconds)
    return {stage: statistics.median(values) for stage, values in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "profile_stages.md")
    arguments = parser.parse_args()

    order = ["pre-processing", "backbone", "Transformer", "flows", "anomaly map", "post-processing", "other"]
    rows = []
    with torch.no_grad():
        for name, builder in (("DADF", dadf), ("DADF-tuned", dadf_tuned), ("DADF-chosen", dadf_chosen), ("FastFlow", fastflow)):
            for batch in (1, 8):
                stages = profile(builder(), batch, arguments.rounds)
                total = sum(stages.values())
                cells = [f"{stages.get(stage, 0.0):.1f} ({100 * stages.get(stage, 0.0) / total:.0f} %)" for stage in order]
                rows.append(f"| {name} | {batch} | " + " | ".join(cells) + f" | {total:.1f} |")

    lines = [
        f"# Per-stage inference time (`python benchmarks/profile_stages.py --rounds {arguments.rounds}`)",
        "",
        (
            f"OpenVINO CPU, f32, static batch, {SIZE}x{SIZE}, ResNet-18 prior (the models of `latency.py`). "
            "Sum of OpenVINO's per-node times per stage (median over rounds), ms per image and share of the total. "
            "Per-node times add up to somewhat less than the wall-clock latency of `latency.py` (scheduling "
            "between nodes is not counted)."
        ),
        "",
        "| model | batch | " + " | ".join(order) + " | total |",
        "|---|---|" + "---|" * len(order) + "---|",
        *rows,
    ]
    arguments.output.parent.mkdir(parents=True, exist_ok=True)
    arguments.output.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
