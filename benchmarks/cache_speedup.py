"""What the feature cache saves: fit time of the quickstart configuration with and without it.

Fits ``configs/quickstart.yaml`` (DADF in the setting chosen on validation data, ELPV mono, 128x128,
batch 16, seed 0) with ``cache_features`` on and off, ``--rounds`` times each, interleaved (on, off, on,
off, ...), every fit in a fresh process so that its peak memory is its own. The configuration is read
as ``anomalib train`` reads it (jsonargparse), so the figures follow the quickstart when it changes.
Reports median fit seconds, their ratio, peak resident memory and the last epoch's loss of each stage
that ran (identical with and without the cache, for the same seed, up to float rounding).

    HF_HUB_OFFLINE=1 python benchmarks/cache_speedup.py --rounds 3   # writes benchmarks/results/cache_speedup.md

``--num-workers N`` gives the loaders N workers instead of the quickstart's (the 2026-12-05 run used 2,
which the quickstart then had).

Each finished fit is printed as ``on {...}`` / ``off {...}``; ``--from-log LOG`` writes the report
from those lines alone (a run stopped early reports the rounds it finished).
"""

import argparse
import ast
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "configs" / "quickstart.yaml"


def fit(cache: bool, num_workers: int | None) -> dict[str, float]:
    """One fit of the quickstart configuration (no test), in this process; ``num_workers`` overrides its loaders'."""
    from anomalib.engine import Engine
    from jsonargparse import ArgumentParser

    sys.path.insert(0, str(REPO))
    from anomalib_dadf import Dadf
    from anomalib_dadf.data import ELPV

    config = yaml.safe_load(QUICKSTART.read_text())
    config["model"]["init_args"].update(cache_features=cache, visualizer=False)
    if num_workers is not None:
        config["data"]["init_args"]["num_workers"] = num_workers
    parser = ArgumentParser()
    parser.add_argument("--model", type=Dadf)
    parser.add_argument("--data", type=ELPV)
    parts = parser.instantiate_classes(parser.parse_object({"model": config["model"], "data": config["data"]}))
    with tempfile.TemporaryDirectory() as scratch:
        engine = Engine(default_root_dir=scratch, accelerator="cpu", devices=1, logger=False)
        start = time.perf_counter()
        engine.fit(model=parts.model, datamodule=parts.data)
        seconds = time.perf_counter() - start
    losses = {name: float(value) for name, value in engine.trainer.callback_metrics.items() if name.endswith("_epoch")}
    return {"seconds": seconds, "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, **losses}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "cache_speedup.md")
    parser.add_argument("--note", default="nothing else running", help="what else ran on the machine")
    parser.add_argument("--num-workers", type=int, help="loader workers instead of the quickstart's")
    parser.add_argument("--from-log", type=Path, help="write the report from the fits printed in this log")
    parser.add_argument("--child", choices=["on", "off"], help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.child:
        print(json.dumps(fit(arguments.child == "on", arguments.num_workers)))
        return

    runs: dict[str, list[dict[str, float]]] = {"on": [], "off": []}
    if arguments.from_log:
        for line in arguments.from_log.read_text().splitlines():
            setting, _, fields = line.partition(" ")
            if setting in runs and fields.startswith("{"):
                runs[setting].append(ast.literal_eval(fields))
        arguments.rounds = min(len(results) for results in runs.values())
        runs = {setting: results[: arguments.rounds] for setting, results in runs.items()}
    for _ in range(0 if arguments.from_log else arguments.rounds):
        for setting in runs:
            child = subprocess.run(
                [sys.executable, __file__, "--child", setting]
                + ([] if arguments.num_workers is None else ["--num-workers", str(arguments.num_workers)]),
                capture_output=True, text=True, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
            )
            runs[setting].append(json.loads(child.stdout.strip().splitlines()[-1]))
            print(setting, runs[setting][-1], flush=True)

    median = {setting: statistics.median(run["seconds"] for run in results) for setting, results in runs.items()}
    command = f"--from-log {arguments.from_log}" if arguments.from_log else f"--rounds {arguments.rounds}"
    if arguments.num_workers is not None:
        command += f" --num-workers {arguments.num_workers}"
    loss_names = sorted(name for name in runs["on"][0] if name.endswith("_epoch"))
    lines = [
        f"# Feature cache (`python benchmarks/cache_speedup.py {command}`)",
        "",
        "Fit of `configs/quickstart.yaml` (data, input size, epochs and batch as that file sets them),",
        (
            f"{arguments.rounds} round(s) interleaved, each fit in a fresh process; {platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} cores; {arguments.note}. Losses: the last epoch's mean of each stage."
        ),
        "",
        "| cache | fit s (median) | fit s (all) | peak MiB (max) | " + " | ".join(loss_names) + " |",
        "|---|---|---|---|" + "---|" * len(loss_names),
    ]
    for setting, results in runs.items():
        seconds = ", ".join(f"{run['seconds']:.0f}" for run in results)
        peak = max(run["peak_mib"] for run in results)
        losses = " | ".join(f"{results[0][name]:.6g}" for name in loss_names)
        lines.append(f"| {setting} | {median[setting]:.0f} | {seconds} | {peak:.0f} | {losses} |")
    lines += ["", f"Speed-up (median off / median on): **{median['off'] / median['on']:.2f}x**."]
    arguments.output.parent.mkdir(parents=True, exist_ok=True)
    arguments.output.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
