"""Multi-annotation strategies (SPEC §6): turn ``R`` binary rater masks into one training target.

Every strategy maps ``masks`` ``(B, R, *S)`` (bool, or integers / floats in {0, 1}; ``S`` 2D or 3D) to a
float32 target ``(B, *S)`` in [0, 1] on the same device, batched, without modifying its input.
``ordinal`` is the exception: it returns the ORC vote count ``k`` as uint8 (SPEC §1).

Hard outputs (``median``, ``hard=True``) use a strict majority: a voxel is foreground when its soft value
is above 0.5, so that for an even number of raters a tie is background, as with ``m = R // 2 + 1``.

Usage::

    t = make_target("staple", masks)                   # any name in METHODS
    t = make_target("soft_gaussian", masks, sigma=2.0)
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from orcal.staple import staple

METHODS = ("random", "median", "soft", "soft_gaussian", "staple", "simple", "svls", "ordinal")
PADDINGS = ("reflect", "replicate")

__all__ = ["METHODS", "check_masks", "gaussian_kernel1d", "make_target", "median", "ordinal", "random_rater",
           "simple", "soft", "soft_gaussian", "staple", "svls", "svls_kernel"]


# --- input checks --------------------------------------------------------------------------------------

def check_masks(masks, name: str = "masks") -> torch.Tensor:
    """Validate rater masks ``(B, R, *S)`` with values in {0, 1} and return them as a bool tensor."""
    if not isinstance(masks, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (B, R, H, W) or (B, R, D, H, W), "
                        f"got {type(masks).__name__}")
    if masks.dtype.is_complex:
        raise TypeError(f"{name} must be bool or uint8 in {{0, 1}}, got dtype {masks.dtype}")
    if masks.ndim not in (4, 5):
        raise ValueError(f"{name} must have shape (B, R, H, W) or (B, R, D, H, W), got {tuple(masks.shape)} "
                         f"({masks.ndim} dimensions)")
    if masks.shape[1] < 1:
        raise ValueError(f"{name} must hold at least one rater (dimension 1), got shape {tuple(masks.shape)}")
    if masks.shape[1] > 255:
        raise ValueError(f"{name} holds {masks.shape[1]} raters; at most 255 are supported")
    if masks.dtype == torch.bool:
        return masks
    if masks.numel() and not bool(((masks == 0) | (masks == 1)).all()):
        bad = masks[(masks != 0) & (masks != 1)].flatten()[0].item()
        raise ValueError(f"{name} must be binary (values 0 or 1), found the value {bad}")
    return masks != 0


def _check_sigma(sigma: float) -> float:
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not math.isfinite(sigma) or sigma < 0:
        raise ValueError(f"sigma must be a finite number >= 0 (in voxels), got {sigma!r}")
    return float(sigma)


def _mean_vote(m: torch.Tensor) -> torch.Tensor:
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
    thr = R // 2 + 1 if majority is None else majority
    if isinstance(thr, bool) or not isinstance(thr, int) or not 1 <= thr <= R:
        raise ValueError(f"majority must be an integer in 1..{R} (R = {R}), got {majority!r}")
    return (m.sum(1) >= thr).to(torch.float32)


def soft(masks: torch.Tensor) -> torch.Tensor:
    """SC: the fraction of raters voting foreground, ``k / R``."""
    return _mean_vote(check_masks(masks))


def ordinal(masks: torch.Tensor) -> torch.Tensor:
    """The ORC target: the number of raters voting foreground ``k``, uint8 ``(B, *S)`` (SPEC §1)."""
    return check_masks(masks).sum(1, dtype=torch.uint8)


# --- smoothing strategies ------------------------------------------------------------------------------

def gaussian_kernel1d(sigma: float, truncate: float = 3.0, dtype: torch.dtype = torch.float32,
                      device: torch.device | str | None = None) -> torch.Tensor:
    """Normalised 1D Gaussian of width ``sigma``, radius ``round(truncate * sigma)``; ``[1]`` for sigma 0."""
    sigma = _check_sigma(sigma)
    radius = int(truncate * sigma + 0.5)
    if sigma == 0 or radius == 0:
        return torch.ones(1, dtype=dtype, device=device)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    w = torch.exp(-0.5 * (x / sigma) ** 2)
    return (w / w.sum()).to(dtype=dtype, device=device)


def _pad_index(n: int, r: int, mode: str, device: torch.device) -> torch.Tensor:
    """Source index of each position of an axis of length ``n`` padded by ``r`` on both sides.

    ``reflect`` mirrors about the edge voxel without repeating it (``d c b | a b c d | c b a``), repeated
    as often as needed so that it works for any ``r``; ``replicate`` repeats the edge voxel.
    """
    i = torch.arange(-r, n + r, device=device)
    if mode == "replicate" or n == 1:
        return i.clamp(0, n - 1)
    period = 2 * (n - 1)
    i = i.remainder(period)
    return torch.where(i > n - 1, period - i, i)


def _pad(x: torch.Tensor, r: int, mode: str, dims: range) -> torch.Tensor:
    for d in dims:
        x = x.index_select(d, _pad_index(x.shape[d], r, mode, x.device))
    return x


def _blur_separable(x: torch.Tensor, kernel: torch.Tensor, padding: str) -> torch.Tensor:
    """Convolve ``x`` ``(B, *S)`` with the 1D ``kernel`` along every spatial axis."""
    r = (kernel.numel() - 1) // 2
    if r == 0:
        return x
    for axis in range(1, x.ndim):
        y = x.movedim(axis, -1)
        shape = y.shape
        y = _pad(y.reshape(-1, 1, shape[-1]), r, padding, range(2, 3))
        y = F.conv1d(y, kernel.view(1, 1, -1))
        x = y.reshape(shape).movedim(-1, axis)
    return x


def soft_gaussian(masks: torch.Tensor, *, sigma: float = 1.0, padding: str = "reflect") -> torch.Tensor:
    """SC-G: the soft consensus ``k / R`` smoothed by a normalised Gaussian of width ``sigma`` voxels.

    The Gaussian is separable and truncated at 3 sigma. ``padding`` chooses the border: ``"reflect"``
    (mirror about the edge voxel, the default) or ``"replicate"`` (repeat the edge voxel). The result is
    clipped to [0, 1] against rounding.
    """
    m = check_masks(masks)
    if padding not in PADDINGS:
        raise ValueError(f"padding must be one of {', '.join(PADDINGS)}; got {padding!r}")
    kernel = gaussian_kernel1d(sigma, device=m.device)
    return _blur_separable(_mean_vote(m), kernel, padding).clamp(0.0, 1.0)


def svls_kernel(ndim: int, sigma: float = 1.0, dtype: torch.dtype = torch.float32,
                device: torch.device | str | None = None) -> torch.Tensor:
    """The SVLS kernel (Islam & Glocker 2021): shape ``(3,) * ndim``, sums to 1, its centre is 1/2.

    A 3^d Gaussian of width ``sigma`` whose centre weight is replaced by the sum of the other weights,
    then normalised.
    """
    if ndim not in (1, 2, 3):
        raise ValueError(f"ndim must be 1, 2 or 3, got {ndim!r}")
    sigma = _check_sigma(sigma)
    if sigma == 0:
        raise ValueError("sigma must be > 0 for the SVLS kernel")
    axes = torch.meshgrid(*[torch.arange(-1.0, 2.0, dtype=torch.float64)] * ndim, indexing="ij")
    w = torch.exp(-sum(a**2 for a in axes) / (2 * sigma**2))
    centre = (1,) * ndim
    w[centre] = 0.0
    w[centre] = w.sum()
    return (w / w.sum()).to(dtype=dtype, device=device)


def svls(masks: torch.Tensor, *, sigma: float = 1.0) -> torch.Tensor:
    """SVLS: each rater's mask smoothed by :func:`svls_kernel` (replicate padding), averaged over raters.

    Smoothing and averaging are both linear, so this smooths the mean vote once instead of every rater.
    """
    m = check_masks(masks)
    nd = m.ndim - 2
    kernel = svls_kernel(nd, sigma, device=m.device)
    x = _pad(_mean_vote(m).unsqueeze(1), 1, "replicate", range(2, 2 + nd))
    conv = F.conv2d if nd == 2 else F.conv3d
    return conv(x, kernel[None, None]).squeeze(1).clamp(0.0, 1.0)


# --- SIMPLE --------------------------------------------------------------------------------------------

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
    if not math.isfinite(alpha):
        raise ValueError(f"alpha must be a finite number, got {alpha!r}")
    if isinstance(max_rounds, bool) or not isinstance(max_rounds, int) or max_rounds < 1:
        raise ValueError(f"max_rounds must be a positive integer, got {max_rounds!r}")
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


# --- dispatch ------------------------------------------------------------------------------------------

_STRATEGIES: dict[str, Callable[..., torch.Tensor]] = {
    "random": random_rater,
    "median": median,
    "soft": soft,
    "soft_gaussian": soft_gaussian,
    "staple": staple,
    "simple": simple,
    "svls": svls,
    "ordinal": ordinal,
}


def make_target(method: str, masks: torch.Tensor, **options) -> torch.Tensor:
    """The training target of strategy ``method`` (one of :data:`METHODS`) for ``masks`` ``(B, R, *S)``.

    ``options`` go to the strategy's function (e.g. ``sigma`` for ``soft_gaussian`` and ``svls``,
    ``seed`` / ``generator`` for ``random``, ``alpha`` for ``simple``, ``confidence_weight`` for ``staple``).
    """
    if not isinstance(method, str):
        raise TypeError(f"method must be a string, one of {', '.join(METHODS)}; got {type(method).__name__}")
    fn = _STRATEGIES.get(method)
    if fn is None:
        raise ValueError(f"unknown method {method!r}; valid methods: {', '.join(METHODS)}")
    try:
        return fn(masks, **options)
    except TypeError as err:
        if "unexpected keyword argument" in str(err):
            raise TypeError(f"method {method!r} does not take that option: {err}") from None
        raise
