"""anomalib's post-processor with thresholds that work from normal validation images alone.

anomalib sets its image and pixel thresholds where F1 peaks on the validation set, which needs
anomalous validation images. With good images only (the usual start on a factory floor) that
threshold falls to an extreme score and labels everything one way. This post-processor sets each
threshold at a target false-positive rate on the normal validation images instead: by default
(``threshold="auto"``) exactly when the validation set holds no anomalous image, and says so in the log.
Normalisation, export and inferencers are anomalib's, unchanged.

Example:
    Any anomalib model takes it:

    >>> from anomalib.models import Patchcore
    >>> from anomalib_dadf.post_processing import FalseAlarmPostProcessor
    >>> model = Patchcore(post_processor=FalseAlarmPostProcessor(false_positive_rate=0.01))
"""

import logging
from typing import Any

import torch
from anomalib.data import Batch
from anomalib.post_processing import PostProcessor
from lightning.pytorch import LightningModule, Trainer

from .metrics.threshold import FalsePositiveRateThreshold

logger = logging.getLogger(__name__)

THRESHOLD_METHODS = ("auto", "f1", "false_positive_rate")


class FalseAlarmPostProcessor(PostProcessor):
    """:class:`~anomalib.post_processing.PostProcessor` that can threshold at a false-positive rate.

    Args:
        threshold (str): ``"f1"`` (anomalib's F1-adaptive thresholds), ``"false_positive_rate"`` (the
            score above which at most ``false_positive_rate`` of the normal validation images, and of
            their pixels, fall), or ``"auto"``: the latter when the validation set has no anomalous
            image, else the former. Defaults to ``"auto"``.
        false_positive_rate (float): Target share of normal images (and pixels) flagged. Defaults to ``0.01``.
        kwargs: anomalib's :class:`~anomalib.post_processing.PostProcessor` arguments.

    Raises:
        ValueError: Unknown ``threshold`` or a rate outside ``[0, 1)``.
    """

    def __init__(self, threshold: str = "auto", false_positive_rate: float = 0.01, **kwargs) -> None:
        super().__init__(**kwargs)
        if threshold not in THRESHOLD_METHODS:
            msg = f"Unknown threshold method '{threshold}': choose one of {list(THRESHOLD_METHODS)}."
            raise ValueError(msg)
        self.threshold = threshold
        self.false_positive_rate = false_positive_rate
        self._image_rate_metric = FalsePositiveRateThreshold(
            false_positive_rate=false_positive_rate, fields=["pred_score", "gt_label"], strict=False,
        )
        self._pixel_rate_metric = FalsePositiveRateThreshold(
            false_positive_rate=false_positive_rate, fields=["anomaly_map", "gt_label"], strict=False,
        )
        self._anomalous_seen = False
        self._announced = False

    @property
    def _checkpoint_config_keys(self) -> tuple[str, ...]:
        return (*super()._checkpoint_config_keys, "threshold", "false_positive_rate")

    def on_validation_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Batch,
        *args: Any,
        **kwargs: Any,
    ) -> None:
        """Feed anomalib's metrics and the false-positive-rate thresholds."""
        super().on_validation_batch_end(trainer, pl_module, outputs, *args, **kwargs)
        if self.enable_thresholding and self.threshold != "f1":
            self._image_rate_metric.update(outputs)
            self._pixel_rate_metric.update(outputs)
            labels = getattr(outputs, "gt_label", None)
            self._anomalous_seen |= labels is not None and bool((labels != 0).any())

    def _uses_false_positive_rate(self) -> bool:
        if self.threshold == "auto" and not self._anomalous_seen and not self._announced:
            self._announced = True
            logger.info(
                "The validation set has no anomalous image: thresholds are set to flag %.2g %% of its normal "
                "images and pixels (threshold='false_positive_rate').",
                100 * self.false_positive_rate,
            )
        return self.threshold == "false_positive_rate" or (self.threshold == "auto" and not self._anomalous_seen)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Set the thresholds (by F1 or by false-positive rate) and the normalisation range."""
        use_rate = self.enable_thresholding and self._uses_false_positive_rate()
        if use_rate:
            # anomalib's F1 thresholds would warn about (and fall back on) the missing anomalies; they are not used.
            self._image_threshold_metric.reset()
            self._pixel_threshold_metric.reset()
        super().on_validation_epoch_end(trainer, pl_module)
        for metric, threshold in (
            (self._image_rate_metric, self._image_threshold),
            (self._pixel_rate_metric, self._pixel_threshold),
        ):
            if use_rate and metric.update_called:
                metric.false_positive_rate = self.false_positive_rate  # as restored from a checkpoint
                threshold.copy_(metric.compute())
            metric.reset()
        self._anomalous_seen = False


class RankKeepingPostProcessor(FalseAlarmPostProcessor):
    """:class:`FalseAlarmPostProcessor` whose normalisation keeps the order of every score, for measuring.

    anomalib maps a score ``s`` to ``(s - threshold) / (max - min) + 0.5`` with ``min`` and ``max`` taken on the
    validation set, and clamps the result to [0, 1]; its evaluator then computes AUROC, AUPRO and sPRO on those
    clamped values. Every test score beyond the validation range becomes 0 or 1, and tied, so a normal test image
    that scores above every validation image ties with the anomalies however far below them it lies. With a small
    validation split (four images on a 60-image set) that alone can take a perfect image AUROC to 0.6. This maps the
    same ``z = (s - threshold) / (max - min)`` to ``0.5 + atan(z) / pi`` instead: still in (0, 1), 0.5 at the
    threshold (so labels and F1 are unchanged), never clamped, strictly increasing in ``s``, so threshold-free metrics
    read each model's own ranking. Scores for deployment are anomalib's; this is for benchmarks.

    Example:
        >>> from anomalib.models import Patchcore
        >>> model = Patchcore(post_processor=RankKeepingPostProcessor())
    """

    @staticmethod
    def _normalize(
        preds: torch.Tensor | None,
        norm_min: torch.Tensor,
        norm_max: torch.Tensor,
        threshold: torch.Tensor,
    ) -> torch.Tensor | None:
        if preds is None or torch.isnan(norm_min) or torch.isnan(norm_max):
            return preds
        threshold = torch.where(torch.isnan(threshold), (norm_max + norm_min) / 2, threshold)
        value_range = norm_max - norm_min
        scale = torch.where(value_range > 0, value_range, torch.ones_like(value_range))
        return 0.5 + torch.atan((preds - threshold) / scale) / torch.pi
