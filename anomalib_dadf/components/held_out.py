"""Stage 1's length from the reconstruction loss of held-out normal images.

The paper trains the Transformer for a fixed 200 epochs. Without anomalies to validate on, the one
signal that says the Transformer has stopped learning the normal prior is its reconstruction loss on
normal training images it does not fit: :func:`held_out_images` sets a few aside for the whole of
stage 1, and :class:`Plateau` says when their loss has stopped improving. Stage 2 trains on every
image again.

Example:
    >>> plateau = Plateau(patience=2)
    >>> [plateau.stalled(loss) for loss in (1.0, 0.5, 0.499, 0.6)]
    [False, False, False, True]
"""

from collections.abc import Iterable

import torch

# An epoch whose loss is less than 0.5 % below the best so far has not improved: the held-out loss of a
# converged Transformer keeps creeping down by fractions of that for many epochs.
MIN_RELATIVE_IMPROVEMENT = 0.005


def check_holdout(fraction: float) -> None:
    """Refuse a held-out share that leaves nothing to hold out or nothing to train on.

    Raises:
        ValueError: ``fraction`` outside (0, 1).
    """
    if not 0 < fraction < 1:
        msg = f"reconstruction_holdout must lie strictly between 0 and 1, got {fraction}."
        raise ValueError(msg)


def held_out_images(paths: Iterable[str], fraction: float, seed: int = 0) -> frozenset[str]:
    """A fixed random ``fraction`` of ``paths`` (at least one image, never all), the same for a seed.

    Raises:
        ValueError: ``fraction`` outside (0, 1), or fewer than two images to split.
    """
    check_holdout(fraction)
    ordered = sorted(set(paths))
    if len(ordered) < 2:
        msg = (
            f"A stage-1 stop on held-out images needs at least two training images, got {len(ordered)}: "
            "set reconstruction_patience=None to train stage 1 for reconstruction_epochs."
        )
        raise ValueError(msg)
    count = min(len(ordered) - 1, max(1, round(fraction * len(ordered))))
    order = torch.randperm(len(ordered), generator=torch.Generator().manual_seed(seed))
    return frozenset(ordered[index] for index in order[:count].tolist())


class Plateau:
    """Whether a loss has gone ``patience`` epochs without improving on its best by 0.5 %.

    Args:
        patience (int): Epochs without improvement that end the wait.
    """

    def __init__(self, patience: int) -> None:
        if patience < 1:
            msg = f"reconstruction_patience must be at least 1 (or None to switch the stop off), got {patience}."
            raise ValueError(msg)
        self.patience = patience
        self.best = float("inf")
        self.best_epoch = -1
        self.waited = 0
        self._epoch = -1

    def stalled(self, loss: float) -> bool:
        """Record one epoch's ``loss``; ``True`` once the last ``patience`` epochs brought no improvement."""
        self._epoch += 1
        if loss < self.best * (1 - MIN_RELATIVE_IMPROVEMENT):
            self.best, self.best_epoch, self.waited = loss, self._epoch, 0
        else:
            self.waited += 1
        return self.waited >= self.patience
