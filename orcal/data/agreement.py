"""Inter-rater agreement of a multi-rater dataset, accumulated one image at a time."""

from __future__ import annotations

from collections.abc import Iterable
from itertools import combinations

import numpy as np


def _as_numpy(masks) -> np.ndarray:
    if hasattr(masks, "detach"):
        masks = masks.detach().cpu().numpy()
    masks = np.asarray(masks)
    if masks.ndim < 2:
        raise ValueError(f"masks must have shape (R, *S) with at least one spatial axis, got {masks.shape}")
    return masks != 0


class AgreementAccumulator:
    """Running sums behind :func:`agreement_stats`; ``update`` with one ``(R, *S)`` mask stack at a time."""

    def __init__(self) -> None:
        self.n_images = 0
        self.raters: set[int] = set()
        self.shapes: set[tuple[int, ...]] = set()
        self.dice_sum = 0.0          # over (image, pair) with a non-empty union
        self.dice_count = 0
        self.pair_inter = 0          # pooled over pairs: sum 2|A&B| and sum |A|+|B|
        self.pair_size = 0
        self.voxels = 0
        self.nonempty_images = 0
        self.union = 0
        self.disagree = 0
        self.k_counts = np.zeros(0, dtype=np.int64)
        self.empty = np.zeros(0, dtype=np.int64)       # per rater index: images left empty
        self.seen = np.zeros(0, dtype=np.int64)        # per rater index: images with that rater
        self.fg = np.zeros(0, dtype=np.int64)          # per rater index: foreground voxels
        self.fg_voxels = np.zeros(0, dtype=np.int64)   # per rater index: voxels seen

    @staticmethod
    def _grow(arr: np.ndarray, size: int) -> np.ndarray:
        return arr if arr.size >= size else np.concatenate([arr, np.zeros(size - arr.size, dtype=arr.dtype)])

    def update(self, masks) -> None:
        """Add one image's rater masks, shape ``(R, *S)``, values in {0, 1} (or any non-zero foreground)."""
        m = _as_numpy(masks)
        R = m.shape[0]
        flat = m.reshape(R, -1)
        n_vox = flat.shape[1]
        self.n_images += 1
        self.raters.add(R)
        self.shapes.add(tuple(m.shape[1:]))
        sizes = flat.sum(axis=1, dtype=np.int64)
        for a, b in combinations(range(R), 2):
            inter = int(np.count_nonzero(flat[a] & flat[b]))
            total = int(sizes[a] + sizes[b])
            self.pair_inter += 2 * inter
            self.pair_size += total
            if total:
                self.dice_sum += 2.0 * inter / total
                self.dice_count += 1
        k = flat.sum(axis=0, dtype=np.int64)
        self.voxels += n_vox
        n_union = int(np.count_nonzero(k))
        self.union += n_union
        self.nonempty_images += n_union > 0
        self.disagree += int(np.count_nonzero((k > 0) & (k < R)))
        self.k_counts = self._grow(self.k_counts, R + 1)
        self.k_counts[: R + 1] += np.bincount(k, minlength=R + 1)
        for name in ("empty", "seen", "fg", "fg_voxels"):
            setattr(self, name, self._grow(getattr(self, name), R))
        self.empty[:R] += sizes == 0
        self.seen[:R] += 1
        self.fg[:R] += sizes
        self.fg_voxels[:R] += n_vox

    def compute(self) -> dict:
        """The statistics as a JSON-friendly dict (see :func:`agreement_stats`)."""
        k = self.k_counts
        in_union = k[1:].sum()
        nan = float("nan")
        return {
            "n_images": self.n_images,
            "raters": sorted(self.raters),
            "shapes": [list(s) for s in sorted(self.shapes)][:10],
            "mean_pairwise_dice": self.dice_sum / self.dice_count if self.dice_count else nan,
            "pooled_pairwise_dice": self.pair_inter / self.pair_size if self.pair_size else nan,
            "disagreement_fraction": self.disagree / self.union if self.union else nan,
            "union_fraction": self.union / self.voxels if self.voxels else nan,
            "k_hist": (k / k.sum()).tolist() if k.sum() else [],
            "k_hist_union": ([0.0] + (k[1:] / in_union).tolist()) if in_union else [],
            "empty_fraction_per_rater": (self.empty / np.maximum(self.seen, 1)).tolist(),
            "all_empty_fraction": ((self.n_images - self.nonempty_images) / self.n_images
                                   if self.n_images else nan),
            "foreground_fraction_per_rater": (self.fg / np.maximum(self.fg_voxels, 1)).tolist(),
        }


def agreement_stats(masks_iterable: Iterable, progress: bool = False, total: int | None = None) -> dict:
    """Inter-rater agreement over images, each a ``(R, *S)`` mask stack (numpy or torch).

    Returns a dict with

    * ``mean_pairwise_dice``: mean over images and rater pairs of Dice(A, B), pairs where both raters left
      the image empty skipped; ``pooled_pairwise_dice``: sum 2|A&B| / sum (|A|+|B|) over all pairs;
    * ``disagreement_fraction``: among voxels some rater marked (the union), the fraction where the raters
      do not all agree (0 < k < R);
    * ``k_hist``: normalised histogram of the vote count k over all voxels; ``k_hist_union``: the same over
      the union (k >= 1; entry 0 is 0);
    * ``empty_fraction_per_rater``: per rater index, fraction of images that rater left empty;
      ``all_empty_fraction``: images no rater marked;
    * ``foreground_fraction_per_rater``: per rater index, fraction of voxels marked (systematic bias);
    * ``n_images``, ``raters`` (the R values seen), ``shapes`` (up to 10 spatial shapes), ``union_fraction``.
    """
    acc = AgreementAccumulator()
    it = masks_iterable
    if progress:
        from orcal._progress import progress_bar

        it = progress_bar(masks_iterable, total=total, desc="agreement", unit="case")
    for masks in it:
        acc.update(masks)
    return acc.compute()
