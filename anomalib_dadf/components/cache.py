"""Per-image tensors computed once per run and reused every later epoch.

DADF's prior comes from a frozen backbone, and without training augmentations each image's prior is
the same in every epoch; in stage 2 the Transformer is frozen too, so the flows' whole input
(prior, local and global reconstruction) is fixed per image. :class:`FeatureCache` keeps such
tensors, keyed by image path, in memory while they fit a byte budget and in a memory-mapped file on
disk beyond it. Once every training image's prior is cached, the image files need not be read again:
:func:`skip_reading_images` makes the training loader deliver :class:`BlankImages` (path and label,
no pixels) until :func:`read_images_again`.

Example:
    >>> import torch
    >>> from anomalib_dadf.components.cache import FeatureCache
    >>> cache = FeatureCache(capacity=4, budget_bytes=2**20)
    >>> calls = []
    >>> compute = lambda: calls.append(1) or [torch.ones(2, 3)]
    >>> first = cache.get(["a.png", "b.png"], compute)
    >>> again = cache.get(["b.png", "a.png"], compute)
    >>> len(calls), torch.equal(first[0], again[0])
    (1, True)
"""

import logging
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from anomalib.data import ImageItem
from anomalib.data.datasets.base import AnomalibDataset
from torch.utils.data import DataLoader, Dataset

logger = logging.getLogger(__name__)


class FeatureCache:
    """A fixed number of rows of per-image tensors, filled on first use.

    Args:
        capacity: Most images the cache will hold (the training set's size).
        budget_bytes: Largest size kept in memory; a larger cache is memory-mapped from a temporary file.
        directory: Where a memory-mapped cache's file goes (the system's temporary folder by default).
    """

    def __init__(self, capacity: int, budget_bytes: int, directory: str | Path | None = None) -> None:
        self.capacity = capacity
        self.budget_bytes = budget_bytes
        self.directory = directory
        self._rows: dict[str, int] = {}
        self._storage: list[torch.Tensor] | None = None
        self._scratch: tempfile.TemporaryDirectory | None = None

    @property
    def on_disk(self) -> bool:
        """Whether the cache is memory-mapped from a file (decided when the first batch arrives)."""
        return self._scratch is not None

    @property
    def full(self) -> bool:
        """Whether every row is filled: each image the cache was sized for is in it."""
        return len(self._rows) == self.capacity

    @property
    def memory_bytes(self) -> int:
        """Bytes the cache holds in memory (none while unallocated or memory-mapped)."""
        if self._storage is None or self.on_disk:
            return 0
        return sum(stored.numel() * stored.element_size() for stored in self._storage)

    def _allocate(self, example: Sequence[torch.Tensor]) -> None:
        shapes = [(self.capacity, *tensor.shape[1:]) for tensor in example]
        total = sum(torch.Size(shape).numel() for shape in shapes) * 4
        if total <= self.budget_bytes:
            self._storage = [torch.empty(shape) for shape in shapes]
            return
        self._scratch = tempfile.TemporaryDirectory(prefix="dadf-cache-", dir=self.directory)
        self._storage = []
        for index, shape in enumerate(shapes):
            path = Path(self._scratch.name) / f"{index}.f32"
            flat = torch.from_file(str(path), shared=True, size=torch.Size(shape).numel(), dtype=torch.float32)
            self._storage.append(flat.view(shape))
        logger.info(
            "Feature cache of %.1f GB exceeds its memory budget of %.1f GB: memory-mapped from %s.",
            total / 1e9, self.budget_bytes / 1e9, self._scratch.name,
        )

    def get(
        self,
        keys: Sequence[str],
        compute: Callable[[], Sequence[torch.Tensor]],
        device: torch.device | str = "cpu",
    ) -> list[torch.Tensor]:
        """The batch's tensors: from the cache when every key is there, else computed and stored.

        Args:
            keys: One key per image of the batch (its path).
            compute: Computes the batch's tensors, each ``(len(keys), ...)``, when some key is missing.
            device: Where cached tensors are returned (the cache holds f32 CPU copies).

        Returns:
            list[torch.Tensor]: The batch's tensors.
        """
        if self._storage is not None and all(key in self._rows for key in keys):
            rows = torch.tensor([self._rows[key] for key in keys])
            return [stored[rows].to(device) for stored in self._storage]
        values = [tensor.detach() for tensor in compute()]
        if self._storage is None:
            self._allocate(values)
        for position, key in enumerate(keys):
            if key not in self._rows and len(self._rows) < self.capacity:
                self._rows[key] = len(self._rows)
            if key in self._rows:
                for stored, value in zip(self._storage, values, strict=True):
                    stored[self._rows[key]] = value[position].float().cpu()
        return values

    def close(self) -> None:
        """Free the cache (and delete a memory-mapped file)."""
        self._storage = None
        self._rows.clear()
        if self._scratch is not None:
            self._scratch.cleanup()
            self._scratch = None


class RunCache:
    """The caches of one training run, one per kind of tensor (priors, reconstructions), sharing one memory budget.

    Each kind gets what the kinds before it left of the budget; a kind that does not fit is memory-mapped.

    Args:
        capacities: Images per kind of tensor (the training set's size for its priors, the validation
            set's for its own).
        budget_bytes: Memory all caches together may use.
        directory: Where memory-mapped caches' files go.
    """

    def __init__(self, capacities: dict[str, int], budget_bytes: int, directory: str | Path | None = None) -> None:
        self.capacities = capacities
        self.budget_bytes = budget_bytes
        self.directory = directory
        self._caches: dict[str, FeatureCache] = {}

    def caches(self, kind: str) -> bool:
        """Whether this run caches tensors of ``kind``."""
        return kind in self.capacities

    def full(self, kind: str) -> bool:
        """Whether the cache of ``kind`` holds every image it was sized for."""
        return kind in self._caches and self._caches[kind].full

    def get(
        self,
        kind: str,
        keys: Sequence[str],
        compute: Callable[[], Sequence[torch.Tensor]],
        device: torch.device | str = "cpu",
    ) -> list[torch.Tensor]:
        """:meth:`FeatureCache.get` on the cache of ``kind``, created on first use."""
        if kind not in self._caches:
            left = self.budget_bytes - sum(cache.memory_bytes for cache in self._caches.values())
            self._caches[kind] = FeatureCache(self.capacities[kind], max(0, left), self.directory)
        return self._caches[kind].get(keys, compute, device)

    def close(self) -> None:
        """Free every cache."""
        for cache in self._caches.values():
            cache.close()
        self._caches.clear()


class BlankImages(Dataset):
    """An anomalib data set's items with their path and label but a blank image of the model's input size.

    For a training set whose every prior is cached: the images would be read and decoded each epoch
    only to be ignored, and on a small CPU that work competes with training. The blank has the input
    size, so the pre-processor's resizing keeps its shape. Nothing random is drawn, so the loader's
    shuffling, and with it the run, stays the same.

    Args:
        dataset: The training set.
        input_size: Height and width of the model's input.
        num_workers: Worker processes the loader had for the real images (given back with them).
    """

    def __init__(self, dataset: AnomalibDataset, input_size: Sequence[int], num_workers: int = 0) -> None:
        self.dataset = dataset
        self.blank = torch.zeros(3, *input_size)
        self.num_workers = num_workers

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> ImageItem:
        sample = self.dataset.samples.iloc[index]
        return ImageItem(image=self.blank, gt_label=torch.tensor(sample.label_index), image_path=sample.image_path)


def skip_reading_images(loader: object, input_size: Sequence[int]) -> bool:
    """Make ``loader`` deliver :class:`BlankImages` of its anomalib data set from its next epoch on.

    Args:
        loader: The run's training loader (Lightning builds it for the run from the data module; the data
            module's own data set is left as it is).
        input_size: Height and width of the model's input.

    Returns:
        bool: Whether the loader switched to blanks: not when it already delivers them or its data set is not
        anomalib's.
    """
    if not isinstance(loader, DataLoader) or not isinstance(loader.dataset, AnomalibDataset):
        return False
    # DataLoader refuses a new data set after it is built, since its sampler was sized from the old one;
    # the blanks keep the length and the order, so the sampler stays right.
    object.__setattr__(loader, "dataset", BlankImages(loader.dataset, input_size, loader.num_workers))
    # Blanks cost nothing to make: worker processes would only add their start-up each epoch.
    loader.num_workers = 0
    return True


def delivers_blanks(loader: object) -> bool:
    """Whether ``loader`` delivers :class:`BlankImages`."""
    return isinstance(loader, DataLoader) and isinstance(loader.dataset, BlankImages)


def read_images_again(loader: object) -> None:
    """Undo :func:`skip_reading_images` (a loader that delivers real images is left alone)."""
    if delivers_blanks(loader):
        loader.num_workers = loader.dataset.num_workers
        object.__setattr__(loader, "dataset", loader.dataset.dataset)
