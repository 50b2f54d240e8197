"""Strategies by vote counting (SPEC §6): random rater, median (majority) consensus, soft consensus, and the
ORC target itself."""

from __future__ import annotations

import torch

from orcal.ops.checks import check_int
from orcal.ops.masks import as_bool_masks as check_masks
from orcal.ops.reference import majority_threshold


def mean_vote(m: torch.Tensor) -> torch.Tensor:
    """The fraction of raters voting foreground, float32 ``(B, *S)``, of bool masks ``(B, R, *S)``."""
    return m.sum(1, dtype=torch.float32) / m.shape[1]


# --- simple strategies ---------------------------------------------------------------------------------

def random_rater(masks: torch.Tensor, *, seed: int | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """RS: the mask of one rater drawn uniformly per sample (a fresh draw per call).

    Deterministic given ``seed`` (a fresh generator) or ``generator`` (advanced by the call); with neither,
    the global torch RNG is used.
    """
    m = check_masks(masks)
    if seed is not None and generator is not None:
        raise ValueError("give either seed or generator, not both")
    if seed is not None:
        generator = torch.Generator().manual_seed(int(seed))
    B, R = m.shape[:2]
    gen_device = generator.device if generator is not None else torch.device("cpu")
    pick = torch.randint(R, (B,), generator=generator, device=gen_device).to(m.device)
    return m[torch.arange(B, device=m.device), pick].to(torch.float32)


def median(masks: torch.Tensor, *, majority: int | None = None) -> torch.Tensor:
    """MC: the majority label ``[k >= m]`` with ``m = R // 2 + 1`` unless ``majority`` is given."""
    m = check_masks(masks)
    R = m.shape[1]
    thr = majority_threshold(R) if majority is None else check_int(f"majority (R = {R})", majority, 1, R)
    return (m.sum(1) >= thr).to(torch.float32)


def label_smoothing(masks: torch.Tensor, *, smoothing: float = 0.1, majority: int | None = None) -> torch.Tensor:
    """Label smoothing (Szegedy et al., 2016) of the majority label, for two classes:
    ``(1 - smoothing) * [k >= m] + smoothing / 2``."""
    from orcal.ops.checks import check_real

    eps = check_real("smoothing", smoothing)
    if eps > 1:
        raise ValueError(f"smoothing must lie in [0, 1], got {smoothing}")
    return median(masks, majority=majority) * (1 - eps) + eps / 2


def soft(masks: torch.Tensor) -> torch.Tensor:
    """SC: the fraction of raters voting foreground, ``k / R``."""
    return mean_vote(check_masks(masks))


def ordinal(masks: torch.Tensor) -> torch.Tensor:
    """The ORC target: the number of raters voting foreground ``k``, uint8 ``(B, *S)`` (SPEC §1)."""
    return check_masks(masks).sum(1, dtype=torch.uint8)
