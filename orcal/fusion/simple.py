"""SIMPLE (Langerak et al. 2010): iterative rater selection by agreement with the running estimate."""

from __future__ import annotations

import math

import torch

from orcal.fusion.voting import median
from orcal.ops.checks import check_int, check_real
from orcal.ops.masks import as_bool_masks as check_masks


def simple(masks: torch.Tensor, *, alpha: float = 1.0, max_rounds: int = 10, hard: bool = False,
           majority: int | None = None) -> torch.Tensor:
    """SIMPLE (Langerak et al. 2010), per image.

    Start from the majority vote. Each round scores every kept rater by its Dice against the current
    estimate (two empty masks have Dice 1), drops raters scoring below ``mean - alpha * std`` of the kept
    raters' scores (population std), and re-estimates the consensus as the Dice-weighted vote of the kept
    raters (binary: weighted vote above 0.5). Stops when the kept set no longer changes, or after
    ``max_rounds``; the best rater is always kept.

    Returns the Dice-weighted soft vote of the final kept raters in [0, 1] (its binary version with
    ``hard=True``).
    """
    m = check_masks(masks)
    alpha = check_real("alpha", alpha, low=-math.inf)
    max_rounds = check_int("max_rounds", max_rounds, 1)
    B, R, *S = m.shape
    d = m.reshape(B, R, math.prod(S))
    df = d.to(torch.float32)
    sizes = d.sum(2)  # (B, R) int64, exact
    est = median(m, majority=majority).reshape(B, math.prod(S)).bool()
    fused = est.to(torch.float32)
    kept = torch.ones(B, R, dtype=torch.bool, device=m.device)
    done = torch.zeros(B, dtype=torch.bool, device=m.device)
    for _ in range(max_rounds):
        inter = (d & est.unsqueeze(1)).sum(2)
        total = sizes + est.sum(1, keepdim=True)
        dice = torch.where(total > 0, 2.0 * inter / total.clamp_min(1), 1.0).to(torch.float64)

        n = kept.sum(1, keepdim=True)
        mean = (dice * kept).sum(1, keepdim=True) / n
        std = (((dice - mean) ** 2 * kept).sum(1, keepdim=True) / n).sqrt()
        # The small slack keeps equal scores equal when mean and std carry rounding error.
        new_kept = kept & (dice >= mean - alpha * std - 1e-9)
        best = torch.where(kept, dice, -1.0).argmax(1)
        none_left = new_kept.sum(1) == 0
        new_kept[none_left, best[none_left]] = True
        new_kept = torch.where(done.unsqueeze(1), kept, new_kept)

        weights = dice * new_kept
        weights = torch.where(weights.sum(1, keepdim=True) > 0, weights, new_kept.to(torch.float64))
        weights = (weights / weights.sum(1, keepdim=True)).to(torch.float32)
        vote = torch.einsum("br,brv->bv", weights, df).clamp(0.0, 1.0)
        fused = torch.where(done.unsqueeze(1), fused, vote)
        est = fused > 0.5

        done = done | (new_kept == kept).all(1)
        kept = new_kept
        if bool(done.all()):
            break
    fused = fused.reshape(B, *S)
    return (fused > 0.5).to(torch.float32) if hard else fused
