"""Building blocks of DADF: the prior's description, the dual-attention Transformer, the flows, the feature cache."""

from .backbone import PriorScales, describe_prior, input_statistics, pretrained_features
from .cache import FeatureCache, RunCache
from .flow import DiscriminativeFlow
from .transformer import DualAttention, DualAttentionBlock, DualAttentionTransformer

__all__ = [
    "DiscriminativeFlow",
    "DualAttention",
    "DualAttentionBlock",
    "DualAttentionTransformer",
    "FeatureCache",
    "PriorScales",
    "RunCache",
    "describe_prior",
    "input_statistics",
    "pretrained_features",
]
