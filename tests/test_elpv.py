"""The ELPV data module over the installed elpv-dataset package: protocol, determinism, errors."""

import pytest
from anomalib.data.utils import LabelName, Split

from anomalib_dadf.data import ELPV, make_elpv_dataset
from anomalib_dadf.data import elpv as elpv_module

# Cell counts of the elpv-dataset package per type: defect probability 0 and 1.
COUNTS = {"mono": (588, 313), "poly": (920, 402)}


def counts(samples) -> dict[tuple[Split, int], int]:
    return {
        (Split(split), int(label)): int(size)
        for (split, label), size in samples.groupby(["split", "label_index"]).size().items()
    }


@pytest.mark.parametrize("category", ["mono", "poly"])
def test_protocol_split_sizes_and_labels(category: str) -> None:
    normal, defective = COUNTS[category]
    samples = make_elpv_dataset(category=category)
    train = round(0.6 * normal)
    assert counts(samples) == {
        (Split.TRAIN, LabelName.NORMAL): train,
        (Split.TEST, LabelName.NORMAL): normal - train,
        (Split.TEST, LabelName.ABNORMAL): defective,
    }
    assert set(samples.loc[samples["split"] == Split.TRAIN, "defect_probability"]) == {0.0}
    assert set(samples.loc[samples["label_index"] == LabelName.ABNORMAL, "defect_probability"]) == {1.0}


def test_split_is_deterministic_and_seeded() -> None:
    first, again = make_elpv_dataset(seed=0), make_elpv_dataset(seed=0)
    other = make_elpv_dataset(seed=1)
    train = lambda samples: set(samples.loc[samples["split"] == Split.TRAIN, "image_path"])  # noqa: E731
    assert train(first) == train(again)
    assert train(first) != train(other)
    assert len(train(first)) == len(train(other))


def test_uncertain_cells_can_be_tested_as_anomalous() -> None:
    default = make_elpv_dataset(category="mono")
    included = make_elpv_dataset(category="mono", include_uncertain=True)
    uncertain = included[included["defect_probability"].between(0.3, 0.7)]
    assert len(uncertain) > 0
    assert set(uncertain["label_index"]) == {LabelName.ABNORMAL}
    assert set(uncertain["split"]) == {Split.TEST}
    assert len(included) == len(default) + len(uncertain)


def test_data_module_trains_on_normals_and_validates_without_test_cells() -> None:
    datamodule = ELPV(category="mono", num_workers=0, train_batch_size=4, eval_batch_size=4)
    assert (datamodule.name, datamodule.category) == ("ELPV", "mono"), "results go to results/Dadf/ELPV/mono"
    datamodule.setup()
    normal, defective = COUNTS["mono"]
    train = round(0.6 * normal)
    assert len(datamodule.train_data) + len(datamodule.val_data) == train
    assert len(datamodule.test_data) == normal - train + defective
    test_paths = set(datamodule.test_data.samples["image_path"])
    assert not test_paths & set(datamodule.train_data.samples["image_path"])
    batch = next(iter(datamodule.test_dataloader()))
    assert batch.image.shape[1] == 3, "grayscale cells are read as RGB"
    assert batch.gt_mask is None


def test_bad_arguments_and_missing_package_are_named(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="Unknown ELPV category 'quartz'"):
        make_elpv_dataset(category="quartz")
    with pytest.raises(ValueError, match="train_ratio"):
        make_elpv_dataset(train_ratio=1.0)

    def missing(name: str) -> None:
        raise ModuleNotFoundError(name)

    monkeypatch.setattr(elpv_module, "import_module", missing)
    with pytest.raises(ModuleNotFoundError, match=r'pip install -e "\.\[elpv\]"'):
        ELPV(category="mono")
