"""Metrics and evaluation that DADF adds to anomalib's: sPRO for MVTec LOCO, an evaluator that reports only
defined metrics, a threshold at a false-positive rate, and the flows' likelihood of held-out normal images."""

from .evaluator import FieldAwareEvaluator
from .held_out_nll import (
    FLOW_OBJECTIVES,
    FLOW_STOPS,
    HELD_OUT_FLOW_NLL,
    HeldOutFlowNll,
    HeldOutFlowStopMixin,
    PerFlowStop,
    check_flow_objective,
    check_flow_stop,
    held_out_flow_nll_key,
    held_out_flow_stop,
    with_norm_log_jacobians,
)
from .spro import SPRO
from .spro_curve import Defect, spro_auc
from .threshold import FalsePositiveRateThreshold

__all__ = [
    "FLOW_OBJECTIVES",
    "FLOW_STOPS",
    "HELD_OUT_FLOW_NLL",
    "SPRO",
    "Defect",
    "FalsePositiveRateThreshold",
    "FieldAwareEvaluator",
    "HeldOutFlowNll",
    "HeldOutFlowStopMixin",
    "PerFlowStop",
    "check_flow_objective",
    "check_flow_stop",
    "held_out_flow_nll_key",
    "held_out_flow_stop",
    "spro_auc",
    "with_norm_log_jacobians",
]
