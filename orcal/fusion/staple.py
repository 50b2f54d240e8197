"""Binary STAPLE (Warfield et al. 2004) as SimpleITK's ``STAPLEImageFilter`` computes it (SPEC §6).

The EM only ever looks at a voxel through its *vote pattern* (which raters marked it), so voxels sharing a
pattern share their posterior. We therefore compress each image to its distinct patterns and their counts
once, run the EM on that small table (at most ``2^R`` rows per image), and scatter the result back. Every
iteration then costs O(patterns x R) instead of O(voxels x R), which is what makes this much faster than
a voxel-by-voxel loop while computing the same numbers (float64 throughout).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

from orcal.ops.checks import check_int, check_real
from orcal.ops.masks import as_bool_masks

# Vote patterns are looked up in a dense table when it has at most this many entries (B x 2^R).
_DENSE_TABLE_MAX = 1 << 22
# Votes are packed this many to an int32 word (int32 arithmetic is much faster than int64 on CPUs).
_BITS = 30


def _pattern_words(votes: torch.Tensor) -> torch.Tensor:
    """Pack each voxel's votes ``(B, R, V)`` bool into int32 words ``(n_words, B, V)``, 30 raters a word."""
    B, R, V = votes.shape
    words = []
    for first in range(0, R, _BITS):
        word = votes[:, first].to(torch.int32)
        for bit, r in enumerate(range(first + 1, min(first + _BITS, R)), start=1):
            word.add_(votes[:, r], alpha=1 << bit)
        words.append(word)
    return words[0].unsqueeze(0) if len(words) == 1 else torch.stack(words)


class VotePatterns(NamedTuple):
    """The distinct vote patterns of each image of a ``(B, R, V)`` batch."""

    patterns: torch.Tensor  # (U, R) bool: which raters vote foreground
    image: torch.Tensor  # (U,) int64: the image of each pattern, in increasing order
    counts: torch.Tensor  # (U,) int64: voxels with that pattern
    voxel_key: torch.Tensor  # (B, V): a key per voxel, see key_rows
    key_rows: torch.Tensor | None  # dense histogram: the keys of the rows; None: voxel_key is the row

    def per_voxel(self, values: torch.Tensor) -> torch.Tensor:
        """Spread one value per pattern ``(U,)`` back to every voxel ``(B, V)``."""
        if self.key_rows is None:
            return values[self.voxel_key]
        table = values.new_zeros(int(self.voxel_key.shape[0]) << int(self.patterns.shape[1]))
        table[self.key_rows] = values
        return table[self.voxel_key]


def vote_patterns(votes: torch.Tensor) -> VotePatterns:
    """Distinct vote patterns of each image of ``votes`` ``(B, R, V)`` bool, with their voxel counts."""
    B, R, V = votes.shape
    device = votes.device
    words = _pattern_words(votes)
    if words.shape[0] == 1 and (B << R) <= _DENSE_TABLE_MAX:
        # Small pattern space: one histogram over the key (image, pattern), no sorting.
        key = words[0].add_(torch.arange(B, dtype=torch.int32, device=device).unsqueeze(1), alpha=1 << R)
        counts = torch.bincount(key.reshape(-1), minlength=B << R)
        present = counts.nonzero().squeeze(1)
        image, codes, counts = present >> R, (present & ((1 << R) - 1)).unsqueeze(1), counts[present]
        key_rows = present
    else:
        image_col = torch.arange(B, dtype=torch.int32, device=device).view(1, B, 1).expand(1, B, V)
        rows = torch.cat([image_col, words]).permute(1, 2, 0).reshape(B * V, -1)
        uniq, key, counts = torch.unique(rows, dim=0, return_inverse=True, return_counts=True)
        image, codes, key, key_rows = uniq[:, 0].long(), uniq[:, 1:].long(), key.view(B, V), None
    r = torch.arange(R, device=device)
    patterns = ((codes[:, r // _BITS] >> (r % _BITS)) & 1).bool()
    return VotePatterns(patterns, image, counts, key, key_rows)


def _per_image_table(vp: VotePatterns, B: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Lay the pattern rows out as a padded ``(B, U, R)`` table (padding rows have count 0).

    Returns the table, the counts ``(B, U)`` and the flat table slot of each pattern row.
    """
    image = vp.image
    per = torch.bincount(image, minlength=B)
    U = max(int(per.max()) if B else 0, 1)
    start = torch.cumsum(per, 0) - per
    pos = torch.arange(image.numel(), device=image.device) - start[image]  # rows are sorted by image
    slot = image * U + pos
    R = vp.patterns.shape[1]
    table = torch.zeros(B * U, R, dtype=torch.bool, device=image.device)
    table[slot] = vp.patterns
    cnt = torch.zeros(B * U, dtype=torch.float64, device=image.device)
    cnt[slot] = vp.counts.to(torch.float64)
    return table.view(B, U, R), cnt.view(B, U), slot


def _em_on_table(P: np.ndarray, cnt: np.ndarray, n_voxels: int, confidence_weight: float, max_iter: int,
                 tol: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The STAPLE EM on a pattern table ``P`` ``(B, U, R)`` with voxel counts ``cnt`` ``(B, U)``.

    Returns W ``(B, U)``, rates ``[p, 1 - q]`` ``(B, 2, R)`` and iterations ``(B,)``.
    """
    B, U, R = P.shape
    Pf = P.astype(np.float64)
    fg = P[:, None]  # (B, 1, U, R)
    # Initial W is the mean vote; the prior g is the mean of W over the image, times the confidence weight
    # (clamped to [0, 1]: a confidence weight that pushes g past 1 would make (1 - g) negative).
    W = Pf.mean(2)
    g = np.clip((cnt * W).sum(1) / max(n_voxels, 1) * confidence_weight, 0.0, 1.0)
    # Rates are kept as r = [p, 1 - q] (B, 2, R): "rater says foreground" then contributes log r and
    # "rater says background" log(1 - r), for the foreground and the background hypothesis alike.
    undefined = np.array([[1.0], [0.0]])  # p = q = 1 when nothing defines them: vacuously perfect
    rates = np.broadcast_to(undefined, (B, 2, R)).copy()
    last = np.full_like(rates, -10.0)
    active = np.ones((B, 1, 1), dtype=bool)
    iterations = np.zeros(B, dtype=np.int64)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        log_prior = np.stack([np.log(g), np.log1p(-g)], 1)[:, :, None]
        for it in range(max_iter):
            # M-step: sensitivity and false-positive rate of each rater against the current soft truth.
            w = cnt[:, None] * np.stack([W, 1.0 - W], 1)  # (B, 2, U)
            den = w.sum(2, keepdims=True)
            rates = np.where(active, np.where(den > 0, (w @ Pf) / den, undefined), rates)

            # E-step in log space, so that many raters cannot underflow the products.
            ll = np.where(fg, np.log(rates)[:, :, None], np.log1p(-rates)[:, :, None]).sum(3) + log_prior
            new_W = 1.0 / (1.0 + np.exp(ll[:, 1] - ll[:, 0]))
            # Both likelihoods zero (-inf - -inf): the data says nothing new, keep the previous estimate.
            new_W = np.where(np.isnan(new_W), W, new_W)
            W = np.where(active[:, 0], new_W, W)
            iterations += active.reshape(B)

            # Converged when every squared change of p and q is at most tol (not checked on the first pass).
            if it > 0:
                active &= ~((rates - last) ** 2 <= tol).all(axis=(1, 2), keepdims=True)
                if not active.any():
                    break
            last = rates
    return W, rates, iterations


def staple_em(votes: torch.Tensor, confidence_weight: float = 1.0, max_iter: int = 100_000,
              tol: float = 1e-14, hard: bool = False,
              dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run binary STAPLE on ``(B, R, V)`` bool votes.

    Returns ``W`` ``(B, V)`` of ``dtype`` (posterior foreground probability, or ``W > 0.5`` with ``hard``),
    sensitivities ``p`` and specificities ``q`` ``(B, R)`` float64, and the EM iterations per image ``(B,)``.
    """
    B, R, V = votes.shape
    dev = votes.device
    vp = vote_patterns(votes)
    P, cnt, slot = _per_image_table(vp, B)
    # The EM runs on the host: its table is tiny and its thousands of small steps are latency-bound.
    W, rates, iterations = _em_on_table(P.cpu().numpy(), cnt.cpu().numpy(), V, confidence_weight, max_iter,
                                        tol)
    # Finish W on the small table (threshold or clip, cast), then one gather spreads it to the voxels.
    W = (W > 0.5) if hard else np.clip(W, 0.0, 1.0)
    W = vp.per_voxel(torch.from_numpy(W).to(device=dev, dtype=dtype).view(-1)[slot])
    rates = torch.from_numpy(rates).to(dev)
    return W, rates[:, 0], 1.0 - rates[:, 1], torch.from_numpy(iterations).to(dev)


def staple(masks: torch.Tensor, confidence_weight: float = 1.0, max_iter: int = 100_000, tol: float = 1e-14,
           hard: bool = False, return_performance: bool = False, dtype: torch.dtype = torch.float32):
    """Posterior foreground probability of binary STAPLE, per image (SPEC §6).

    Matches ``SimpleITK.STAPLE(images, 1)`` (which iterates until convergence): the EM starts from the mean
    vote, uses the global prior ``g = mean vote x confidence_weight``, and stops when every squared change
    of a rater's sensitivity ``p`` and specificity ``q`` is at most ``tol``, or after ``max_iter`` rounds.
    Unlike SimpleITK it never returns NaN: an undefined rate (all raters empty, or all full) is set to 1.

    Args:
        masks: ``(B, R, *S)`` bool / uint8 in {0, 1}; ``S`` is 2D or 3D.
        confidence_weight: scales the prior ``g``.
        max_iter: most EM iterations per image.
        tol: convergence threshold on the squared change of each ``p_r`` and ``q_r``.
        hard: return ``W > 0.5`` as 0/1 instead of the probability.
        return_performance: also return ``p`` and ``q`` ``(B, R)`` float64.
        dtype: dtype of the returned map (float32 by default; float64 keeps full precision).

    Returns:
        ``W`` ``(B, *S)`` in [0, 1], or ``(W, p, q)`` when ``return_performance``.
    """
    masks = as_bool_masks(masks)
    max_iter = check_int("max_iter", max_iter, 1)
    tol = check_real("tol", tol)
    if not check_real("confidence_weight", confidence_weight) > 0:
        raise ValueError(f"confidence_weight must be > 0, got {confidence_weight!r}")
    B, R, *S = masks.shape
    W, p, q, _ = staple_em(masks.reshape(B, R, math.prod(S)), confidence_weight, max_iter, tol, hard, dtype)
    W = W.view(B, *S)
    return (W, p, q) if return_performance else W
