"""Metrics and evaluation that DADF adds to anomalib's: sPRO for MVTec LOCO and a mask-aware evaluator."""

from .evaluator import FieldAwareEvaluator
from .spro import SPRO
from .spro_curve import Defect, spro_auc

__all__ = ["SPRO", "Defect", "FieldAwareEvaluator", "spro_auc"]
