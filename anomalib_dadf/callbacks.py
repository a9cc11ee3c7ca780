"""Unreadable images, named before they stop a run.

One corrupt file in a folder would otherwise stop ``anomalib predict`` at that file with PIL's
``UnidentifiedImageError``, and no image would get a prediction. This callback checks every image of
the run's data before the first batch is read: when predicting, unreadable files are left out with a
warning naming each; when training, the run stops with an error naming all of them.

Example:
    >>> from anomalib.engine import Engine
    >>> from anomalib_dadf.callbacks import UnreadableImages
    >>> engine = Engine(callbacks=[UnreadableImages()])  # any anomalib model; DADF adds it itself
"""

import logging
from collections.abc import Iterable, Iterator
from pathlib import Path

from anomalib.data import AnomalibDataModule, AnomalibDataset, PredictDataset
from lightning.pytorch import Callback, LightningModule, Trainer
from PIL import Image
from torch.utils.data import DataLoader

logger = logging.getLogger(__name__)


def unreadable_images(paths: Iterable[str | Path]) -> dict[str, str]:
    """The paths PIL cannot read as an image, with the reason for each.

    ``verify`` reads the whole file (every chunk and checksum of a PNG) without decoding pixels, so
    empty, truncated and non-image files are all caught at a fraction of the cost of loading them.
    """
    problems = {}
    for path in paths:
        try:
            with Image.open(path) as image:
                image.verify()
        except (OSError, SyntaxError, ValueError) as error:
            problems[str(path)] = f"{type(error).__name__}: {error}"
    return problems


def _datasets(source: object, datamodule_attribute: str) -> Iterator[AnomalibDataset | PredictDataset]:
    """The image datasets behind a stage's data source (data loaders or an anomalib data module)."""
    if isinstance(source, AnomalibDataModule):
        dataset = getattr(source, datamodule_attribute, None)
        sources = [dataset]
    else:
        sources = [loader.dataset for loader in (source if isinstance(source, list | tuple) else [source])
                   if isinstance(loader, DataLoader)]
    yield from (dataset for dataset in sources if isinstance(dataset, AnomalibDataset | PredictDataset))


def _image_paths(dataset: AnomalibDataset | PredictDataset) -> list[str]:
    if isinstance(dataset, PredictDataset):
        return [str(path) for path in dataset.image_filenames]
    return [str(path) for path in dataset.samples["image_path"]]


def _drop(dataset: AnomalibDataset | PredictDataset, paths: set[str]) -> None:
    if isinstance(dataset, PredictDataset):
        dataset.image_filenames = [path for path in dataset.image_filenames if str(path) not in paths]
    else:
        samples = dataset.samples
        dataset.samples = samples[~samples["image_path"].astype(str).isin(paths)].reset_index(drop=True)


class UnreadableImages(Callback):
    """Skip unreadable images when predicting (with a warning each); name them in an error when training."""

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Check the images of the stage's data before any is loaded.

        Raises:
            ValueError: A training image cannot be read (all such files are named).
        """
        del pl_module
        if stage == "fit":
            self._refuse_unreadable_training_images(trainer)
        elif stage == "predict":
            self._skip_unreadable_predict_images(trainer)

    @staticmethod
    def _refuse_unreadable_training_images(trainer: Trainer) -> None:
        # Lightning keeps what was passed to fit/predict only on its loops; no public accessor exists before setup.
        source = trainer.fit_loop._data_source.instance  # noqa: SLF001
        for dataset in _datasets(source, "train_data"):
            problems = unreadable_images(_image_paths(dataset))
            if problems:
                listed = "; ".join(f"{path} ({reason})" for path, reason in problems.items())
                msg = (
                    f"{len(problems)} training image(s) cannot be read: {listed}. "
                    "Replace or remove these files (training uses every image of the training folder) and run again."
                )
                raise ValueError(msg)

    @staticmethod
    def _skip_unreadable_predict_images(trainer: Trainer) -> None:
        source = trainer.predict_loop._data_source.instance  # noqa: SLF001
        for dataset in _datasets(source, "test_data"):
            problems = unreadable_images(_image_paths(dataset))
            for path, reason in problems.items():
                logger.warning("Skipping unreadable image %s (%s); every other image is predicted.", path, reason)
            if problems:
                _drop(dataset, set(problems))
