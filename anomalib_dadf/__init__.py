"""DADF (Dual-Attention Transformer and Discriminative Flow) as an anomalib model.

Importing the package also registers the data-module aliases in :mod:`anomalib_dadf.data`, so that
``anomalib train --model anomalib_dadf.Dadf --data MVTec`` resolves.
"""

from . import data
from .lightning_model import Dadf
from .torch_model import DadfModel

__all__ = ["Dadf", "DadfModel", "data"]
