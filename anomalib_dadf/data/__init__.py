"""Data modules that DADF adds to anomalib's.

``MVTec`` and ``VisA`` are the names users type for anomalib's ``MVTecAD`` and ``Visa`` data modules;
``ELPV`` serves real solar-cell images from the ``elpv-dataset`` package (see :mod:`.elpv`).

When the category folder is missing, anomalib downloads the data set. Offline (a mistyped
``--data.root`` on a factory PC, say) that download fails with a bare network error; these names
turn it into one that names the missing folder, the layout expected there and where to get the data.
"""

from pathlib import Path

from anomalib.data import MVTecAD, Visa
from anomalib.data.datamodules.image import mvtecad, visa

from .elpv import ELPV, make_elpv_dataset


def _missing_data_error(name: str, folder: Path, layout: str, url: str, error: OSError) -> FileNotFoundError:
    msg = (
        f"{name} data not found: {folder} does not exist, and downloading {name} failed "
        f"({type(error).__name__}: {error}). Expected layout: {layout}. Point --data.root at the folder that holds "
        f"the category folders, or download {name} from {url} and extract it there (online, anomalib downloads "
        "it by itself)."
    )
    return FileNotFoundError(msg)


class MVTec(MVTecAD):
    """anomalib's :class:`~anomalib.data.MVTecAD` under the name ``MVTec`` (``--data MVTec``)."""

    def prepare_data(self) -> None:
        """Use the category folder under ``root``, or download MVTec AD as anomalib does.

        Raises:
            FileNotFoundError: The folder is missing and cannot be downloaded (offline, say).
        """
        try:
            super().prepare_data()
        except OSError as error:  # urllib's URLError and socket errors are OSErrors
            layout = f"{self.root}/{self.category}/train/good/*.png, test/<defect>/*.png, ground_truth/<defect>/*_mask.png"
            raise _missing_data_error("MVTec AD", self.root / self.category, layout, mvtecad.DOWNLOAD_INFO.url, error) from error


class VisA(Visa):
    """anomalib's :class:`~anomalib.data.Visa` under the name ``VisA`` (``--data VisA``)."""

    def prepare_data(self) -> None:
        """Use (and split) the category folder under ``root``, or download VisA as anomalib does.

        Raises:
            FileNotFoundError: The folder is missing and cannot be downloaded (offline, say).
        """
        try:
            super().prepare_data()
        except OSError as error:
            layout = (
                f"{self.root}/{self.category}/Data/Images/{{Normal,Anomaly}}/*.JPG and Data/Masks/Anomaly/*.png "
                "(VisA as released), split by anomalib into visa_pytorch/ on first use"
            )
            raise _missing_data_error("VisA", self.root / self.category, layout, visa.DOWNLOAD_INFO.url, error) from error


__all__ = ["ELPV", "MVTec", "VisA", "make_elpv_dataset"]
