"""Metrics and evaluation that DADF adds to anomalib's: sPRO for MVTec LOCO, an evaluator that reports only
defined metrics, and a threshold at a false-positive rate."""

from .evaluator import FieldAwareEvaluator
from .spro import SPRO
from .spro_curve import Defect, spro_auc
from .threshold import FalsePositiveRateThreshold

__all__ = ["SPRO", "Defect", "FalsePositiveRateThreshold", "FieldAwareEvaluator", "spro_auc"]
