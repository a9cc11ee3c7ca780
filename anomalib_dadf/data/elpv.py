"""ELPV: real electroluminescence images of solar cells, as an anomalib data module.

The ``elpv-dataset`` package (an optional extra: ``pip install -e ".[elpv]"``) ships 2,624
300x300 grayscale cells, each with a defect probability (0, 1/3, 2/3 or 1) and a type (``mono``
or ``poly``). The labels are image-level: there are no masks, so only image metrics apply.

Protocol (fixed, per category):

- train: a seeded 60 % of the cells with defect probability 0;
- test: the other 40 % of those (normal) and every cell with probability 1 (anomalous);
- cells with probability 1/3 or 2/3 are left out, or added to the test set as anomalous with
  ``include_uncertain=True``;
- validation (thresholds and normalisation only): by default a share of the *training* cells,
  half of them given anomalib's synthetic anomalies, so no test cell is seen before testing.

Example:
    >>> from anomalib_dadf.data import ELPV
    >>> datamodule = ELPV(category="mono")  # doctest: +SKIP
"""

from importlib import import_module
from pathlib import Path

import numpy as np
import pandas as pd
from anomalib.data import Tabular
from anomalib.data.utils import LabelName, Split, TestSplitMode, ValSplitMode
from torchvision.transforms.v2 import Transform

CATEGORIES = ("mono", "poly")
INSTALL_HINT = 'pip install -e ".[elpv]"  (or: pip install elpv-dataset)'


def elpv_root() -> Path:
    """Folder of the installed ``elpv-dataset`` package that holds ``labels.csv`` and ``images/``.

    Raises:
        ModuleNotFoundError: If the package is not installed, naming the install command.
    """
    try:
        package = import_module("elpv_dataset")
    except ModuleNotFoundError as error:
        msg = f"The ELPV data module needs the 'elpv-dataset' package, which is not installed: {INSTALL_HINT}"
        raise ModuleNotFoundError(msg) from error
    return Path(package.__file__).parent / "data"


def make_elpv_dataset(
    root: str | Path | None = None,
    category: str = "mono",
    train_ratio: float = 0.6,
    include_uncertain: bool = False,
    seed: int = 0,
) -> pd.DataFrame:
    """Samples table of one ELPV category under the fixed protocol (see the module docstring).

    Args:
        root: Folder with ``labels.csv`` and ``images/``; ``None`` for the installed package.
        category: ``"mono"`` or ``"poly"``.
        train_ratio: Share of the defect-free cells used for training.
        include_uncertain: Add cells with defect probability 1/3 or 2/3 to the test set as anomalous.
        seed: Seed of the train/test draw of the defect-free cells.

    Returns:
        pd.DataFrame: ``image_path``, ``label_index``, ``split`` and ``defect_probability`` per cell.

    Raises:
        ValueError: Unknown category or a train ratio outside (0, 1).
        FileNotFoundError: ``labels.csv`` is not in ``root``.
    """
    if category not in CATEGORIES:
        msg = f"Unknown ELPV category '{category}': choose one of {list(CATEGORIES)}."
        raise ValueError(msg)
    if not 0.0 < train_ratio < 1.0:
        msg = f"train_ratio must lie strictly between 0 and 1, got {train_ratio}."
        raise ValueError(msg)
    root = Path(root) if root is not None else elpv_root()
    labels_file = root / "labels.csv"
    if not labels_file.is_file():
        msg = f"No ELPV labels at {labels_file}: point root at the folder holding labels.csv and images/."
        raise FileNotFoundError(msg)

    labels = pd.read_csv(labels_file, sep=r"\s+", header=None, names=["path", "defect_probability", "type"])
    cells = labels[labels["type"] == category].reset_index(drop=True)
    normal = cells.index[cells["defect_probability"] == 0].to_numpy()
    shuffled = np.random.default_rng(seed).permutation(normal)
    train = set(shuffled[: round(train_ratio * len(normal))].tolist())
    anomalous = cells["defect_probability"] > 0 if include_uncertain else cells["defect_probability"] == 1
    keep = (cells["defect_probability"] == 0) | anomalous

    samples = pd.DataFrame({
        "image_path": [str(root / path) for path in cells["path"]],
        "label_index": np.where(anomalous, LabelName.ABNORMAL, LabelName.NORMAL),
        "split": [Split.TRAIN if index in train else Split.TEST for index in cells.index],
        "defect_probability": cells["defect_probability"],
    })
    return samples[keep].reset_index(drop=True)


class ELPV(Tabular):
    """ELPV solar cells (``mono`` or ``poly``) through anomalib's :class:`~anomalib.data.Tabular` data module.

    Args:
        category (str): ``"mono"`` or ``"poly"``. Defaults to ``"mono"``.
        root (str | Path | None): Folder with ``labels.csv`` and ``images/``; ``None`` (default)
            uses the installed ``elpv-dataset`` package.
        train_ratio (float): Share of defect-free cells for training. Defaults to ``0.6``.
        include_uncertain (bool): Test cells with defect probability 1/3 or 2/3 as anomalous.
            Defaults to ``False`` (left out).
        train_batch_size (int): Training batch size. Defaults to ``32``.
        eval_batch_size (int): Validation and test batch size. Defaults to ``32``.
        num_workers (int): Data-loading workers. Defaults to ``8``.
        train_augmentations (Transform | None): Training augmentations. Defaults to ``None``.
        val_augmentations (Transform | None): Validation augmentations. Defaults to ``None``.
        test_augmentations (Transform | None): Test augmentations. Defaults to ``None``.
        augmentations (Transform | None): Augmentations for every stage without its own.
            Defaults to ``None``.
        val_split_mode (ValSplitMode | str): Where validation images come from. Defaults to
            ``"synthetic"``: training cells, half with synthetic anomalies, never test cells.
        val_split_ratio (float): Share of training cells moved to validation. Defaults to ``0.1``.
        seed (int): Seed of the train/test draw and of the validation split. Defaults to ``0``.
    """

    def __init__(
        self,
        category: str = "mono",
        root: str | Path | None = None,
        train_ratio: float = 0.6,
        include_uncertain: bool = False,
        train_batch_size: int = 32,
        eval_batch_size: int = 32,
        num_workers: int = 8,
        train_augmentations: Transform | None = None,
        val_augmentations: Transform | None = None,
        test_augmentations: Transform | None = None,
        augmentations: Transform | None = None,
        val_split_mode: ValSplitMode | str = ValSplitMode.SYNTHETIC,
        val_split_ratio: float = 0.1,
        seed: int = 0,
    ) -> None:
        samples = make_elpv_dataset(root, category, train_ratio, include_uncertain, seed)
        super().__init__(
            name="ELPV",
            samples=samples,
            train_batch_size=train_batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            train_augmentations=train_augmentations,
            val_augmentations=val_augmentations,
            test_augmentations=test_augmentations,
            augmentations=augmentations,
            test_split_mode=TestSplitMode.FROM_DIR,
            val_split_mode=val_split_mode,
            val_split_ratio=val_split_ratio,
            seed=seed,
        )
        self.category = category  # after the base class, which resets it
