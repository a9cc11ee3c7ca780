"""Data modules that DADF adds to anomalib's.

``MVTec`` and ``VisA`` are the names users type for anomalib's ``MVTecAD`` and ``Visa`` data modules;
``ELPV`` serves real solar-cell images from the ``elpv-dataset`` package (see :mod:`.elpv`).
"""

from anomalib.data import MVTecAD, Visa

from .elpv import ELPV, make_elpv_dataset


class MVTec(MVTecAD):
    """anomalib's :class:`~anomalib.data.MVTecAD` under the name ``MVTec`` (``--data MVTec``)."""


class VisA(Visa):
    """anomalib's :class:`~anomalib.data.Visa` under the name ``VisA`` (``--data VisA``)."""


__all__ = ["ELPV", "MVTec", "VisA", "make_elpv_dataset"]
