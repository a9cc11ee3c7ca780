"""Side-by-side benchmarks of DADF and any other anomalib model: ``python -m anomalib_dadf.benchmark``."""

from .job import DadfBenchmarkJob, DadfBenchmarkJobGenerator, import_class
from .peers import TimmFastflow
from .report import write_report

__all__ = ["DadfBenchmarkJob", "DadfBenchmarkJobGenerator", "TimmFastflow", "import_class", "write_report"]
