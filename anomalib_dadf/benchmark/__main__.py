"""Run a benchmark grid: ``python -m anomalib_dadf.benchmark --config configs/benchmark.yaml``.

Every model x data set x seed of the config is fitted and tested in a fresh process through
anomalib's serial runner; the results go to ``results.csv`` (one row per run), ``summary.md``
(mean ± std over seeds) and ``image_auroc.png`` in the config's ``output`` folder.
"""

import argparse
import datetime
import os
import platform
import sys
import time
from pathlib import Path

import yaml
from anomalib.pipelines.components.runners import SerialRunner

from .job import DadfBenchmarkJobGenerator
from .report import write_report


def machine() -> str:
    """A short description of this machine for the report."""
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {memory:.0f} GiB, {platform.system()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, required=True, help="benchmark YAML, e.g. configs/benchmark.yaml")
    parser.add_argument("--output", type=Path, default=None, help="overrides the config's output folder")
    arguments = parser.parse_args()
    config = yaml.safe_load(arguments.config.read_text())
    output = arguments.output or Path(config.get("output", "results/benchmark"))

    start = time.perf_counter()
    results = SerialRunner(DadfBenchmarkJobGenerator()).run(config)
    minutes = (time.perf_counter() - start) / 60
    header = (
        f"# Benchmark: {config.get('title', arguments.config.stem)}\n\n"
        f"Command: `{' '.join(['python -m anomalib_dadf.benchmark', *sys.argv[1:]])}` "
        f"(config `{arguments.config}`), {datetime.date.today().isoformat()}, {machine()}, "
        f"{minutes:.0f} min in all. Input {config.get('input_size')} for every model; "
        "metrics are mean ± std over seeds; fit and test seconds, inference ms per image (model forward incl. "
        "pre- and post-processing, one test batch), peak resident memory of the run's process.\n\n"
        f"{config.get('notes', '').strip()}"
    )
    print(f"Wrote {write_report(results, output, header)}")


if __name__ == "__main__":
    main()
