"""Building blocks of DADF: the prior's description, the dual-attention Transformer, the flows, the feature cache,
the held-out stop of stage 1."""

from .backbone import PriorScales, describe_prior, input_statistics, neighbourhood_pooling, pretrained_features
from .cache import BlankImages, FeatureCache, RunCache, delivers_blanks, read_images_again, skip_reading_images
from .flow import DiscriminativeFlow, PositionalFlow, flow_with_log_jacobian_map
from .held_out import Plateau, check_holdout, held_out_images
from .transformer import DualAttention, DualAttentionBlock, DualAttentionTransformer

__all__ = [
    "BlankImages",
    "DiscriminativeFlow",
    "DualAttention",
    "DualAttentionBlock",
    "DualAttentionTransformer",
    "FeatureCache",
    "Plateau",
    "PositionalFlow",
    "PriorScales",
    "RunCache",
    "check_holdout",
    "delivers_blanks",
    "describe_prior",
    "flow_with_log_jacobian_map",
    "held_out_images",
    "input_statistics",
    "neighbourhood_pooling",
    "pretrained_features",
    "read_images_again",
    "skip_reading_images",
]
