"""Inference latency, peak memory and size on disk of DADF and its peers, exported the same way.

Every model uses the same ResNet-18 prior (layers 1-3; PatchCore its usual layers 2-3) at 256x256.
DADF is the lite preset (``configs/dadf_lite.yaml``); DADF-tuned the same with ``flow_subnet: conv``;
DADF-chosen the setting chosen on validation data (``configs/quickstart.yaml``: DADF-tuned with the flows
on the prior alone, so the export holds no Transformer, on the maps at strides 4, 8, 16: ResNet-18's layers 1-3).
anomalib's FastFlow accepts ResNet-18, which is why it is the shared backbone here. Weights are
random: latency does not depend on their values. PatchCore's memory bank is filled with random
features of the size a 0.1 coreset of 200 training images gives (200 x 32 x 32 x 0.1 = 20,480 x 384).

Each variant is timed interleaved with the others, round after round, so machine noise hits all
alike; the table reports medians (ms per image) and the ratio to DADF OpenVINO FP32. Peak resident
memory is measured in a fresh process per variant (VmHWM after loading and running it).

    python benchmarks/latency.py                  # writes benchmarks/results/latency.md
"""

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import openvino as ov
import torch
from anomalib.deploy import CompressionType
from anomalib.models import Fastflow, Patchcore

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from anomalib_dadf import Dadf
from anomalib_dadf.data import MVTec
from anomalib_dadf.data.synthetic import make_mvtec
from anomalib_dadf.parity import F32

SIZE = 256
LITE = {"embed_dim": 64, "depth": 2, "num_heads": 4, "mlp_ratio": 2.0, "flow_steps": 4}  # configs/dadf_lite.yaml


def dadf(flow_subnet: str = "depthwise", flow_inputs: tuple[str, ...] = ("prior", "local", "global")) -> Dadf:
    model = Dadf(
        backbone="resnet18", pre_trained=False, flow_subnet=flow_subnet, flow_inputs=flow_inputs, **LITE,
    ).eval()
    model.flow_steps_trained += 1  # timing only: the export guard asks for trained flows
    return model


def dadf_tuned() -> Dadf:
    """The lite preset with FastFlow's full-convolution subnets, "DADF (tuned)" of benchmarks/RESULTS.md."""
    return dadf(flow_subnet="conv")


def dadf_chosen() -> Dadf:
    """DADF-tuned with the flows on the prior alone at strides 4-16, the main table's chosen setting's architecture."""
    return dadf(flow_subnet="conv", flow_inputs=("prior",))


def patchcore() -> Patchcore:
    model = Patchcore(backbone="resnet18", pre_trained=False).eval()
    model.model.memory_bank = torch.randn(20_480, 384)
    return model


def fastflow() -> Fastflow:
    return Fastflow(backbone="resnet18", pre_trained=False).eval()


class Deployed(torch.nn.Module):
    """An anomalib model's deployed forward pass (pre-processing, network, post-processing) in a plain module.

    OpenVINO's converter traces it straight from torch, at the example input's static shape and with
    every node named after its torch module; ``anomalib export`` goes through ONNX instead.
    """

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.pre_processor, self.model, self.post_processor = module.pre_processor, module.model, module.post_processor

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs = self.post_processor(self.model(self.pre_processor(images)))
        return tuple(output for output in outputs if output is not None)


class BackboneOnly(torch.nn.Module):
    """DADF's frozen prior alone, returning a tuple (OpenVINO's converter cannot trace a dict of maps)."""

    def __init__(self) -> None:
        super().__init__()
        self.extractor = dadf().model.feature_extractor.eval()

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.extractor(images).values())


def export(name: str, folder: Path, calibration: MVTec) -> Path:
    """OpenVINO IR of a variant, as ``anomalib export`` writes it."""
    builders = {"DADF": dadf, "DADF-tuned": dadf_tuned, "DADF-chosen": dadf_chosen, "FastFlow": fastflow, "PatchCore": patchcore}
    if name == "backbone":
        model_path = folder / name / "model.xml"
        model_path.parent.mkdir(parents=True, exist_ok=True)
        ov.save_model(ov.convert_model(BackboneOnly().eval(), example_input=torch.rand(1, 3, SIZE, SIZE)), model_path)
        return model_path
    base, _, precision = name.partition(" ")
    compression = {"": None, "FP16": CompressionType.FP16, "INT8_PTQ": CompressionType.INT8_PTQ}[precision]
    return builders[base]().to_openvino(folder / name.replace(" ", "_"), compression_type=compression, datamodule=calibration)


# anomalib's PatchCore export fixes the batch at 2 and cannot be reshaped to another (the CPU plugin
# refuses its Interpolate), so its deployed forward is converted from torch at each batch instead.
FROM_TORCH = {"PatchCore": patchcore}


def compiled(name: str, model_path: Path, batch: int) -> Callable[[np.ndarray], object]:
    """Compile at a static batch and f32 (reshaping a dynamic export to static is markedly faster)."""
    core = ov.Core()
    if name in FROM_TORCH:
        with torch.no_grad():
            model = ov.convert_model(Deployed(FROM_TORCH[name]()), example_input=torch.rand(batch, 3, SIZE, SIZE))
    else:
        model = core.read_model(model_path)
        model.reshape({model.input(0): [batch, 3, SIZE, SIZE]})
    return core.compile_model(model, "CPU", F32)


def eager(builder: Callable[[], torch.nn.Module]) -> Callable[[np.ndarray], object]:
    model = builder()

    def run(images: np.ndarray) -> object:
        with torch.no_grad():
            return model(torch.from_numpy(images))

    return run


def peak_memory(arguments: list[str]) -> float:
    """VmHWM in MiB of a fresh process that loads and runs one variant."""
    result = subprocess.run(
        [sys.executable, __file__, *arguments], capture_output=True, text=True, check=True, timeout=600,
    )
    return float(result.stdout.strip().splitlines()[-1])


def child(kind: str, path: str, batch: int) -> None:
    runner = eager(dadf) if kind == "eager" else compiled(kind, Path(path), batch)
    images = np.random.default_rng(0).random((batch, 3, SIZE, SIZE), dtype=np.float32)
    for _ in range(3):
        runner(images)
    status = Path("/proc/self/status").read_text()
    print(int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM"))) / 1024)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "latency.md")
    parser.add_argument("--child", nargs=3, metavar=("KIND", "PATH", "BATCH"), help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.child:
        child(arguments.child[0], arguments.child[1], int(arguments.child[2]))
        return

    torch.manual_seed(0)
    names = [
        "backbone", "DADF", "DADF FP16", "DADF INT8_PTQ", "DADF-tuned", "DADF-tuned INT8_PTQ", "DADF-chosen",
        "DADF-chosen INT8_PTQ", "FastFlow", "PatchCore",
    ]
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        data = make_mvtec(folder / "data", n_train=32, n_test_good=32, n_test_bad=32, size=SIZE)
        calibration = MVTec(root=data, category="widget", train_batch_size=8, eval_batch_size=8, num_workers=0)
        paths, notes = {}, []
        for name in names:
            try:
                paths[name] = export(name, folder / "export", calibration)
            except Exception as error:  # noqa: BLE001 - a peer that cannot export is reported, not fatal
                notes.append(f"- {name}: OpenVINO export failed ({type(error).__name__}: {str(error)[:200]})")
        rows = []
        for batch in (1, 8):
            runners = {f"{name} OpenVINO": compiled(name, path, batch) for name, path in paths.items()}
            runners["DADF torch eager"] = eager(dadf)
            runners["PatchCore torch eager"] = eager(patchcore)
            images = np.random.default_rng(batch).random((batch, 3, SIZE, SIZE), dtype=np.float32)
            times: dict[str, list[float]] = {name: [] for name in runners}
            for runner in runners.values():
                runner(images)  # warm-up
            for _ in range(arguments.rounds):
                for name, runner in runners.items():
                    start = time.perf_counter()
                    runner(images)
                    times[name].append((time.perf_counter() - start) * 1000 / batch)
            reference = statistics.median(times["DADF OpenVINO"])
            for name, samples in times.items():
                base = name.rsplit(" OpenVINO", 1)[0]
                path = paths.get(base) if name.endswith(" OpenVINO") else None
                memory = peak_memory(["--child", "eager", "-", str(batch)]) if name == "DADF torch eager" else (
                    peak_memory(["--child", base, str(path), str(batch)]) if path else float("nan")
                )
                size = sum(f.stat().st_size for f in path.parent.glob("model.*")) / 2**20 if path else float("nan")
                median = statistics.median(samples)
                rows.append(f"| {batch} | {name} | {median:.1f} | {median / reference:.2f} | {memory:.0f} | {size:.1f} |")

    lines = [
        f"# Latency (`python benchmarks/latency.py --rounds {arguments.rounds}`)",
        "",
        (
            f"ResNet-18 prior, {SIZE}x{SIZE}, CPU, OpenVINO at f32 with a static batch; median of {arguments.rounds} "
            "interleaved rounds. Ratio: to DADF OpenVINO FP32 at the same batch. Memory: peak resident (VmHWM) of a "
            "fresh process that loads and runs the variant. Size: the OpenVINO files on disk. PatchCore OpenVINO: "
            "anomalib's export fixes its batch at 2 and cannot be reshaped, so the same deployed forward pass is "
            "converted by OpenVINO from torch at each batch (its size is that of anomalib's export)."
        ),
        "",
        "| batch | variant | ms / image | ratio to DADF FP32 | peak MiB | size MiB |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
        *notes,
    ]
    arguments.output.parent.mkdir(parents=True, exist_ok=True)
    arguments.output.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
