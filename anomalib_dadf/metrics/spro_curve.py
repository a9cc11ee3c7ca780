"""Exact area under the saturated per-region overlap (sPRO) curve, streamed over images.

Definitions (MVTec LOCO AD, Bergmann et al., IJCV 2022): at threshold ``t`` a pixel is predicted
anomalous when its score is strictly greater than ``t``. ``sPRO(t)`` is the mean over all defects
of ``min(|predicted & defect| / saturation, 1)``; ``FPR(t)`` is the share of predicted pixels among
the pixels that no defect covers, pooled over all images. The result is the area under sPRO over
FPR from 0 to ``integration_limit`` (the curve linearly interpolated there), divided by the limit.

Every distinct score is a threshold, and so are +inf and -inf, so the curve runs from (0, 0) to
(1, 1); tied scores form one step. Only the pixels scoring at least
the first threshold beyond the limit can shape the curve up to it, so the images are streamed three
times (counts, that cutoff, the candidates) and only the candidates are ever sorted.
"""

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Defect:
    """One ground-truth defect of an image.

    Attributes:
        mask: Boolean ``(H, W)`` map of the defect's pixels.
        saturation: Overlap, in pixels, at which the defect counts as fully found (at least 1).
    """

    mask: np.ndarray
    saturation: int


ImageStream = Callable[[], Iterable[tuple[np.ndarray, Sequence[Defect]]]]
"""Returns a fresh iterator over ``(scores, defects)`` per image; called once per pass."""


def _defect_free(scores: np.ndarray, defects: Sequence[Defect]) -> np.ndarray:
    free = np.ones(scores.shape, dtype=bool)
    for defect in defects:
        if defect.mask.shape != scores.shape:
            msg = (
                f"Anomaly map of shape {scores.shape} and defect mask of shape {defect.mask.shape} differ: "
                "resize the map to the mask's (original image) size first."
            )
            raise ValueError(msg)
        free &= ~defect.mask
    return free


def _kth_largest(images: ImageStream, k: int) -> float:
    """The k-th largest defect-free score, keeping at most about 2k scores in memory."""
    kept = np.empty(0)
    for scores, defects in images():
        kept = np.concatenate([kept, scores[_defect_free(scores, defects)]])
        if kept.size > 2 * k:
            kept = np.partition(kept, kept.size - k)[-k:]
    return float(np.partition(kept, kept.size - k)[kept.size - k])


def truncated_area(fpr: np.ndarray, overlap: np.ndarray, limit: float) -> float:
    """Trapezoidal area under a curve with non-decreasing ``fpr`` from 0 to ``limit``, interpolated there."""
    inside = fpr <= limit
    area = float(np.trapezoid(overlap[inside], fpr[inside]))
    beyond = np.flatnonzero(~inside)
    if beyond.size:
        last, first = np.flatnonzero(inside)[-1], beyond[0]
        fraction = (limit - fpr[last]) / (fpr[first] - fpr[last])
        at_limit = overlap[last] + fraction * (overlap[first] - overlap[last])
        area += 0.5 * (overlap[last] + at_limit) * (limit - fpr[last])
    return area


def spro_auc(images: ImageStream, integration_limit: float = 0.05) -> float:
    """Normalised area under the sPRO curve up to an FPR of ``integration_limit``.

    Args:
        images: Callable giving a fresh iterable of ``(scores, defects)`` per image, where
            ``scores`` is a float ``(H, W)`` map and ``defects`` its ground-truth defects (empty for
            a defect-free image).
        integration_limit: Upper FPR limit of the integration, in ``(0, 1]``.

    Returns:
        float: The area divided by ``integration_limit``, in ``[0, 1]``.

    Raises:
        ValueError: A limit outside ``(0, 1]``, a map and a mask of different sizes, no defect at
            all (sPRO is undefined for a defect-free test set), or no defect-free pixel.
    """
    if not 0.0 < integration_limit <= 1.0:
        msg = f"integration_limit must lie in (0, 1], got {integration_limit}."
        raise ValueError(msg)
    free_pixels, saturations = 0, []
    for scores, defects in images():
        free_pixels += int(_defect_free(scores, defects).sum())
        saturations.extend(max(int(defect.saturation), 1) for defect in defects)
    if not saturations:
        msg = "sPRO is undefined without defects: the test set has no anomalous image with a ground-truth mask."
        raise ValueError(msg)
    if free_pixels == 0:
        msg = "sPRO needs defect-free pixels to measure false positives, and every pixel is part of a defect."
        raise ValueError(msg)

    # The first threshold past the limit is the k-th largest defect-free score.
    k = int(np.floor(integration_limit * free_pixels)) + 1
    cutoff = _kth_largest(images, k) if k <= free_pixels else -np.inf

    candidate_scores, candidate_owners = [], []  # owner -1: defect-free pixel; otherwise the defect's index
    owner = 0
    for scores, defects in images():
        candidates = scores >= cutoff
        free = _defect_free(scores, defects) & candidates
        candidate_scores.append(scores[free])
        candidate_owners.append(np.full(int(free.sum()), -1))
        for defect in defects:
            hit = defect.mask & candidates
            candidate_scores.append(scores[hit])
            candidate_owners.append(np.full(int(hit.sum()), owner))
            owner += 1
    scores = np.concatenate(candidate_scores).astype(np.float64)
    owners = np.concatenate(candidate_owners)
    order = np.argsort(-scores, kind="stable")
    scores, owners = scores[order], owners[order]

    # A defect's n-th pixel (by descending score) adds 1 / (saturation * defects) while n <= saturation.
    saturation = np.asarray(saturations)
    gain = np.zeros(scores.size)
    in_defect = np.flatnonzero(owners >= 0)
    by_defect = in_defect[np.argsort(owners[in_defect], kind="stable")]
    defect_of = owners[by_defect]
    starts = np.searchsorted(defect_of, defect_of, side="left")
    rank = np.arange(by_defect.size) - starts
    gain[by_defect] = (rank < saturation[defect_of]) / (saturation[defect_of] * len(saturations))

    # One curve point per distinct score, after every pixel of that score is predicted.
    step_ends = np.flatnonzero(np.append(scores[1:] != scores[:-1], True))
    fpr = np.concatenate([[0.0], np.cumsum(owners < 0)[step_ends] / free_pixels])
    overlap = np.concatenate([[0.0], np.cumsum(gain)[step_ends]])
    return truncated_area(fpr, overlap, integration_limit) / integration_limit
