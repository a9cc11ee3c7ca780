"""Run a benchmark grid: ``python -m anomalib_dadf.benchmark --config configs/benchmark.yaml``.

Every model x data set x seed of the config is fitted and tested in a fresh process through
anomalib's serial runner; the results go to ``results.csv`` (one row per run), ``summary.md``
(mean ± std over seeds) and ``image_auroc.png`` in the config's ``output`` folder.

``--seeds N`` runs at most N seeds of every model (a first pass when time is short); ``--first-seed K``
starts at seed K, so later seeds can be added to cells whose first seeds already ran.
``--models`` / ``--data`` run part of the grid and merge it into the folder's ``results.csv``: rows of
the re-run cells are replaced (with ``--first-seed K``, only their seeds from K on), all others are kept,
and the report is written anew. ``--report-only`` runs nothing and writes the report anew from the
folder's ``results.csv``, which it leaves as it is (after a change to the config's ``notes`` or ``rank_by``, say).
Each run that writes rows adds its command line to the folder's ``runs.txt`` (a whole-grid run starts it
anew), and the report names every command there: a table merged from several partial runs says how each
part was made.
"""

import argparse
import datetime
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import pandas as pd
import yaml
from anomalib.pipelines.components.runners import SerialRunner

from .job import DadfBenchmarkJobGenerator
from .report import write_report


def machine() -> str:
    """A short description of this machine for the report."""
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {memory:.0f} GiB, {platform.system()}"


def input_sizes(config: dict) -> str:
    """What the report says of the input size: the config's, and each model's own where it has one.

    Example:
        >>> input_sizes({"input_size": [128, 128], "models": [{"name": "A"}, {"name": "B", "input_size": [256, 256]}]})
        'Input [128, 128] for every model but B ([256, 256])'
    """
    own = [f"{model['name']} ({model['input_size']})" for model in config.get("models", []) if "input_size" in model]
    return f"Input {config.get('input_size')} for every model" + (f" but {', '.join(own)}" if own else "")


def read_rows(path: Path) -> pd.DataFrame:
    """The rows of a ``results.csv``, every number read back to the bit, so that writing them again keeps their text."""
    return pd.read_csv(path, float_precision="round_trip")


def merged(results: pd.DataFrame, previous: Path, config: dict, first_seed: int = 0) -> pd.DataFrame:
    """``results`` in place of the same data/model cells of an earlier ``results.csv``, in config order.

    A re-run cell's earlier rows of seeds below ``first_seed`` are kept: those seeds were not run again.
    """
    if previous.is_file():
        earlier = read_rows(previous)
        rerun = set(zip(results["data"], results["model"], strict=True))
        kept = [
            (data, model) not in rerun or seed < first_seed
            for data, model, seed in zip(earlier["data"], earlier["model"], earlier["seed"], strict=True)
        ]
        results = pd.concat([earlier[kept], results], ignore_index=True)
    # Rows of entries since removed from the config go last.
    positions = pd.DataFrame({
        column: results[column].map({entry["name"]: index for index, entry in enumerate(config[key])}).fillna(
            len(config[key]),
        )
        for column, key in (("data", "data"), ("model", "models"))
    })
    return results.loc[positions.sort_values(["data", "model"], kind="stable").index].reset_index(drop=True)


def record_run(output: Path, run: str, *, partial: bool) -> list[str]:
    """Add ``run`` to the commands in ``output``'s ``runs.txt`` (replace them for a whole-grid run); all of them.

    Example:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> record_run(folder, "a", partial=False), record_run(folder, "b", partial=True)
        (['a'], ['a', 'b'])
        >>> record_run(folder, "c", partial=False)
        ['c']
    """
    runs = [*recorded_runs(output), run] if partial else [run]
    (output / "runs.txt").write_text("".join(f"{line}\n" for line in runs))
    return runs


def recorded_runs(output: Path) -> list[str]:
    """The commands of ``output``'s ``runs.txt``, oldest first; none for a folder written before it was kept."""
    path = output / "runs.txt"
    return path.read_text().splitlines() if path.exists() else []


def cap_seeds(config: dict, seeds: int) -> None:
    """Let every model of ``config`` run at most ``seeds`` seeds (a data entry's ``seeds`` caps its models')."""
    for data in config["data"]:
        data["seeds"] = min(int(data.get("seeds", seeds)), seeds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, required=True, help="benchmark YAML, e.g. configs/benchmark.yaml")
    parser.add_argument("--output", type=Path, default=None, help="overrides the config's output folder")
    parser.add_argument("--models", nargs="+", default=None, help="run only these models (names in the config)")
    parser.add_argument("--data", nargs="+", default=None, help="run only these data sets (names in the config)")
    parser.add_argument("--seeds", type=int, default=None, help="run at most this many seeds of every model (time)")
    parser.add_argument("--first-seed", type=int, default=0, help="start at this seed (add seeds to cells already run)")
    parser.add_argument("--report-only", action="store_true", help="rewrite the report from the existing results.csv")
    arguments = parser.parse_args()
    config = yaml.safe_load(arguments.config.read_text())
    if arguments.seeds is not None:
        cap_seeds(config, arguments.seeds)
    output = arguments.output or Path(config.get("output", "results/benchmark"))

    command = f"python -m anomalib_dadf.benchmark {shlex.join(sys.argv[1:])}"
    today = datetime.date.today().isoformat()
    if arguments.report_only:
        results = read_rows(output / "results.csv")
        runs = recorded_runs(output)
        ran = "report rewritten from the results.csv of the runs below" if runs else (
            "report rewritten from the results.csv of an earlier run"
        )
    else:
        start = time.perf_counter()
        runner = SerialRunner(DadfBenchmarkJobGenerator(arguments.models, arguments.data, arguments.first_seed))
        results = runner.run(config)
        if results.empty:
            parser.error(f"nothing to run: no model of the selection has a seed from {arguments.first_seed} on.")
        partial = bool(arguments.models or arguments.data or arguments.first_seed)
        if partial:
            results = merged(results, output / "results.csv", config, arguments.first_seed)
        minutes = (time.perf_counter() - start) / 60
        ran = f"{minutes:.0f} min{' for the re-run cells' if partial else ' in all'}"
        output.mkdir(parents=True, exist_ok=True)
        results.to_csv(output / "results.csv", index=False)
        runs = record_run(output, f"`{command}`: {today}, {machine()}, {ran}", partial=partial)
    listed = "".join(f"- {run}\n" for run in runs)
    header = (
        f"# Benchmark: {config.get('title', arguments.config.stem)}\n\n"
        f"Command: `{command}` (config `{arguments.config}`), {today}, {machine()}, "
        f"{ran}. {input_sizes(config)}; "
        "metrics are mean ± std over seeds; fit and test seconds, inference ms per image (model forward incl. "
        "pre- and post-processing, one test batch), peak resident memory of the run's process.\n\n"
        + (f"The rows were written by these runs (runs.txt), oldest first:\n\n{listed}\n" if runs else "")
        + f"{config.get('notes', '').strip()}"
    )
    print(f"Wrote {write_report(results, output, header, config.get('rank_by'), config.get('cost_growth', False))}")


if __name__ == "__main__":
    main()
