"""Building blocks of DADF: the prior's description, the dual-attention Transformer and the flows."""

from .backbone import PriorScales, describe_prior, pretrained_features
from .flow import DiscriminativeFlow
from .transformer import DualAttention, DualAttentionBlock, DualAttentionTransformer

__all__ = [
    "DiscriminativeFlow",
    "DualAttention",
    "DualAttentionBlock",
    "DualAttentionTransformer",
    "PriorScales",
    "describe_prior",
    "pretrained_features",
]
