"""An anomalib evaluator that reports only the metrics the data could feed.

anomalib's evaluator logs every metric at the end of an epoch. A non-strict metric that no batch
could update (pixel metrics on a data set without masks, such as ELPV or a ``Folder`` without
``mask_dir``) then makes torchmetrics warn that ``compute`` ran before ``update``, and the metric
has nothing to report. This evaluator leaves such metrics out of that epoch's log.
"""

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from anomalib.metrics import Evaluator
from lightning.pytorch import LightningModule, Trainer
from torch.nn import ModuleList

logger = logging.getLogger(__name__)


class FieldAwareEvaluator(Evaluator):
    """:class:`~anomalib.metrics.Evaluator` that skips metrics no batch updated this epoch."""

    @contextmanager
    def _only_updated(self, attribute: str) -> Iterator[None]:
        metrics = getattr(self, attribute)
        updated = [metric for metric in metrics if metric.update_count > 0]
        skipped = sorted(metric.name for metric in metrics if metric.update_count == 0)
        if skipped:
            logger.info("No batch had the fields for %s: not reported.", ", ".join(skipped))
        setattr(self, attribute, ModuleList(updated))
        try:
            yield
        finally:
            setattr(self, attribute, metrics)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Compute and log the validation metrics that some batch updated."""
        with self._only_updated("val_metrics"):
            super().on_validation_epoch_end(trainer, pl_module)

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Compute and log the test metrics that some batch updated."""
        with self._only_updated("test_metrics"):
            super().on_test_epoch_end(trainer, pl_module)
