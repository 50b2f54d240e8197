"""Smoothing strategies (SPEC §6): Gaussian-smoothed soft consensus (SC-G) and spatially varying label
smoothing (SVLS)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from orcal.fusion.voting import mean_vote
from orcal.ops.checks import check_real
from orcal.ops.masks import as_bool_masks as check_masks

PADDINGS = ("reflect", "replicate")


def gaussian_kernel1d(sigma: float, truncate: float = 3.0, dtype: torch.dtype = torch.float32,
                      device: torch.device | str | None = None) -> torch.Tensor:
    """Normalised 1D Gaussian of width ``sigma``, radius ``round(truncate * sigma)``; ``[1]`` for sigma 0."""
    sigma = check_real("sigma (in voxels)", sigma)
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
    return _blur_separable(mean_vote(m), kernel, padding).clamp(0.0, 1.0)


def svls_kernel(ndim: int, sigma: float = 1.0, dtype: torch.dtype = torch.float32,
                device: torch.device | str | None = None) -> torch.Tensor:
    """The SVLS kernel (Islam & Glocker 2021): shape ``(3,) * ndim``, sums to 1, its centre is 1/2.

    A 3^d Gaussian of width ``sigma`` whose centre weight is replaced by the sum of the other weights,
    then normalised.
    """
    if ndim not in (1, 2, 3):
        raise ValueError(f"ndim must be 1, 2 or 3, got {ndim!r}")
    sigma = check_real("sigma (in voxels)", sigma)
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
    x = _pad(mean_vote(m).unsqueeze(1), 1, "replicate", range(2, 2 + nd))
    conv = F.conv2d if nd == 2 else F.conv3d
    return conv(x, kernel[None, None]).squeeze(1).clamp(0.0, 1.0)
