"""Data modules that DADF adds to anomalib's.

``MVTec`` and ``VisA`` are the names users type for anomalib's ``MVTecAD`` and ``Visa`` data modules.
"""

from anomalib.data import MVTecAD, Visa


class MVTec(MVTecAD):
    """anomalib's :class:`~anomalib.data.MVTecAD` under the name ``MVTec`` (``--data MVTec``)."""


class VisA(Visa):
    """anomalib's :class:`~anomalib.data.Visa` under the name ``VisA`` (``--data VisA``)."""


__all__ = ["MVTec", "VisA"]
