"""Checkpoints that are either whole or not there: written beside the target, then renamed into place.

Lightning's default writer streams into the checkpoint's own path (through a temporary file that
fsspec may keep on another file system and copy over), so a crash or a full disk mid-write can leave
a truncated ``model.ckpt`` where the last good one was. This writer finishes and syncs a sibling file
first; ``os.replace`` then swaps it in atomically (same directory, so same file system).

Example:
    >>> from anomalib.engine import Engine
    >>> from anomalib_dadf.checkpoint_io import AtomicCheckpointIO
    >>> engine = Engine(plugins=[AtomicCheckpointIO()])  # any anomalib model; DADF sets it up itself
"""

import os
from pathlib import Path
from typing import Any

import torch
from anomalib.engine.plugins import AnomalibCheckpointIO
from lightning.fabric.utilities.types import _PATH


class AtomicCheckpointIO(AnomalibCheckpointIO):
    """anomalib's checkpoint I/O plugin (Lightning's ``TorchCheckpointIO`` with anomalib's safe loading), writing atomically.

    Remote paths (``s3://`` and other fsspec URLs) are written by Lightning as before.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        """Write ``checkpoint`` to ``path``; a failure leaves any previous file at ``path`` untouched.

        Raises:
            TypeError: ``storage_options`` given (as Lightning's writer).
        """
        if "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        if storage_options is not None:
            msg = f"`Trainer.save_checkpoint(..., storage_options=...)` is not supported by {type(self).__name__}."
            raise TypeError(msg)
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.partial")
        try:
            with partial.open("wb") as file:
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)
