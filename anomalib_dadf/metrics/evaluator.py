"""An anomalib evaluator that reports only the metrics the data could feed and define.

anomalib's evaluator logs every metric at the end of an epoch. Two cases then print numbers that
mean nothing:

- a non-strict metric that no batch could update (pixel metrics on a data set without masks, such
  as ELPV or a ``Folder`` without ``mask_dir``) makes torchmetrics warn that ``compute`` ran before
  ``update``;
- a metric whose ground truth holds a single class (AUROC or F1 on a test set of good images only,
  pixel metrics on masks without a defect pixel) is undefined, and torchmetrics reports ``0.0``.

This evaluator leaves such metrics out of that epoch's report, with one log line saying why.
"""

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from anomalib.metrics import Evaluator
from lightning.pytorch import LightningModule, Trainer
from torch.nn import ModuleList

logger = logging.getLogger(__name__)

# Ground-truth fields whose classes decide whether a metric is defined; a metric that reads none of
# them (sPRO reads anomaly maps and paths) needs both image labels.
TARGET_FIELDS = ("gt_mask", "gt_label")


class FieldAwareEvaluator(Evaluator):
    """:class:`~anomalib.metrics.Evaluator` that skips metrics no batch updated or that one class leaves undefined."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._classes: dict[str, set[int]] = {field: set() for field in TARGET_FIELDS}

    def _record_classes(self, batch: Any) -> None:
        for field in TARGET_FIELDS:
            target = getattr(batch, field, None)
            if isinstance(target, torch.Tensor) and target.numel():
                self._classes[field].update(int(value) for value in torch.unique(target.int()).tolist())

    def _undefined_reason(self, metric: Any) -> str | None:
        field = next((name for name in TARGET_FIELDS if name in metric.fields), "gt_label")
        classes = self._classes[field]
        if len(classes) >= 2:
            return None
        kind = "pixel" if field == "gt_mask" else "image"
        present = {0: "normal", 1: "anomalous"}.get(next(iter(classes), -1), "no")
        return f"its ground truth ({field}) holds {present} {kind}s only"

    @contextmanager
    def _only_defined(self, attribute: str, stage: str) -> Iterator[None]:
        metrics = getattr(self, attribute)
        kept = []
        for metric in metrics:
            if metric.update_count == 0:
                logger.info("No batch had the fields for %s: not reported.", metric.name)
            elif reason := self._undefined_reason(metric):
                logger.warning("%s is undefined on this %s set (%s): not reported.", metric.name, stage, reason)
            else:
                kept.append(metric)
        setattr(self, attribute, ModuleList(kept))
        try:
            yield
        finally:
            for metric in metrics:
                if metric not in kept:
                    metric.reset()  # Lightning resets only what it logged
            setattr(self, attribute, metrics)
            self._classes = {field: set() for field in TARGET_FIELDS}

    def on_validation_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                                *args: Any, **kwargs: Any) -> None:
        """Update the validation metrics and note which classes the batch holds."""
        super().on_validation_batch_end(trainer, pl_module, outputs, batch, *args, **kwargs)
        self._record_classes(batch)

    def on_test_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                          *args: Any, **kwargs: Any) -> None:
        """Update the test metrics and note which classes the batch holds."""
        super().on_test_batch_end(trainer, pl_module, outputs, batch, *args, **kwargs)
        self._record_classes(batch)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Compute and log the validation metrics that are defined on this epoch's data."""
        with self._only_defined("val_metrics", "validation"):
            super().on_validation_epoch_end(trainer, pl_module)

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Compute and log the test metrics that are defined on this epoch's data."""
        with self._only_defined("test_metrics", "test"):
            super().on_test_epoch_end(trainer, pl_module)
