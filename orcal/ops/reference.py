"""The ops of SPEC §1–4 in plain, readable PyTorch: the oracle of every backend, and the ``"torch"`` backend.

This module is the ground truth of every test: each compiled or Triton kernel must compute the same
function. It favours clarity over speed, but stays vectorised so that tests run in reasonable time.
It does not validate its inputs; :mod:`orcal.ops` does that before calling any backend.

Conventions (SPEC "Notation"): ``masks`` (B, R, *S), ``k`` (B, *S) integer vote counts, ordinal
``logits`` (B, R+1, *S), probabilities ``p`` (B, *S), optional boolean ``valid`` (B, *S).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from orcal.ops._schema import opmath_dtype  # noqa: F401  (the accumulation dtype of every backend)
from orcal.ops.stats import CalibrationStats

NLL_EPS = 1e-7  # SPEC §4: log p and log(1 - p) are bounded below by log(NLL_EPS) for the NLL
DICE_THRESHOLD = 0.5  # SPEC §4: a voxel is predicted foreground when p >= 0.5


def majority_threshold(num_raters: int, majority: int | None = None) -> int:
    """The smallest vote count that makes a voxel foreground; strict majority ``R // 2 + 1`` by default."""
    return num_raters // 2 + 1 if majority is None else int(majority)


def half_tie_thresholds(num_raters: int) -> tuple[int, ...]:
    """The majority thresholds the half-tie readout averages: ``(R/2, R/2 + 1)`` for even ``R``, where a tie of
    ``R/2`` votes counts half; ``(R // 2 + 1,)`` for odd ``R``, where no tie exists (SPEC §2)."""
    m = num_raters // 2 + 1
    return (m,) if num_raters % 2 else (m - 1, m)


# --- §1 ORC target -------------------------------------------------------------------------------------

def orc_targets(masks: torch.Tensor) -> torch.Tensor:
    """Number of raters voting foreground: ``(B, R, *S)`` binary masks -> ``(B, *S)`` uint8."""
    return masks.to(torch.int64).sum(1).to(torch.uint8)


# --- §2 readouts ---------------------------------------------------------------------------------------

def majority_logit(logits: torch.Tensor, majority: int | None = None) -> torch.Tensor:
    """``l = LSE(z_m..z_R) - LSE(z_0..z_{m-1})`` over the channel dimension, in the accumulation dtype."""
    z = logits.to(opmath_dtype(logits.dtype))
    m = majority_threshold(z.shape[1] - 1, majority)
    return torch.logsumexp(z[:, m:], dim=1) - torch.logsumexp(z[:, :m], dim=1)


def foreground_probability(logits: torch.Tensor, readout: str = "majority",
                           majority: int | None = None) -> torch.Tensor:
    """Foreground probability from ordinal logits.

    ``readout="majority"``: probability that at least ``m`` raters vote foreground (the paper's Eq. 2).
    ``readout="expected"``: expected fraction of raters voting foreground, ``sum_i i q_i / R``.
    ``readout="half_tie"``: ``P(k > R/2) + P(k = R/2) / 2``, the mean of the majority readouts of
    :func:`half_tie_thresholds` (``majority`` is not used).
    """
    if readout == "majority":
        return torch.sigmoid(majority_logit(logits, majority))
    if readout == "half_tie":
        ps = [torch.sigmoid(majority_logit(logits, m)) for m in half_tie_thresholds(logits.shape[1] - 1)]
        return sum(ps) / len(ps)
    if readout == "expected":
        z = logits.to(opmath_dtype(logits.dtype))
        R = z.shape[1] - 1
        levels = torch.arange(R + 1, dtype=z.dtype, device=z.device).view(1, -1, *([1] * (z.ndim - 2)))
        # Rounding can carry the sum just past 1 on confident voxels (e.g. 1.0000001): clamp, keep NaN.
        p = ((torch.softmax(z, dim=1) * levels).sum(1) / R).clamp(0, 1)
        # +inf logits (softmax gives NaN): one such level takes all the mass, several have no limit (NaN).
        pinf = z == math.inf
        n_inf = pinf.sum(1) + 2 * z.isnan().sum(1)  # a NaN level: no limit either
        limit = torch.where(n_inf == 1, (pinf * levels).sum(1) / R, torch.full_like(p, math.nan))
        return torch.where(n_inf == 0, p, limit)
    raise ValueError(f"readout must be 'majority', 'expected' or 'half_tie', got {readout!r}")


def binary_probability(pred: torch.Tensor, kind: str, readout: str = "majority",
                       majority: int | None = None) -> torch.Tensor:
    """Foreground probability ``(B, *S)`` of a prediction of the given kind (SPEC §7 ``calibration_stats``)."""
    if kind == "ordinal":
        return foreground_probability(pred, readout, majority)
    x = pred.to(opmath_dtype(pred.dtype))
    if kind == "logit":
        return torch.sigmoid(x)
    if kind == "prob":
        return x
    raise ValueError(f"kind must be 'prob', 'logit' or 'ordinal', got {kind!r}")


# --- §3 the training objective -------------------------------------------------------------------------

def _levels_below(k: torch.Tensor, R: int, dtype: torch.dtype) -> torch.Tensor:
    """``G_j = [j >= k]`` for ``j = 0..R-1``, shape (B, R, *S): the target's cumulative distribution."""
    j = torch.arange(R, device=k.device).view(1, -1, *([1] * (k.ndim - 1)))
    return (j >= k.unsqueeze(1).long()).to(dtype)


def ordinal_loss_map(logits: torch.Tensor, k: torch.Tensor, rps_weight: float = 1.0,
                     majority: int | None = None) -> torch.Tensor:
    """Per-voxel ``BCE(majority logit, [k >= m]) + rps_weight * RPS`` (SPEC §3), shape (B, *S)."""
    z = logits.to(opmath_dtype(logits.dtype))
    R = z.shape[1] - 1
    m = majority_threshold(R, majority)
    q = torch.softmax(z, dim=1)
    F_cum = torch.cumsum(q, dim=1)[:, :R]
    rps = ((F_cum - _levels_below(k, R, z.dtype)) ** 2).sum(1) / R
    l = majority_logit(z, m)
    y = (k.long() >= m).to(z.dtype)
    bce = F.softplus(l) - y * l
    return bce + rps_weight * rps


def _reduce(per_voxel: torch.Tensor, valid: torch.Tensor | None, reduction: str) -> torch.Tensor:
    if valid is not None:
        per_voxel = torch.where(valid, per_voxel, torch.zeros((), dtype=per_voxel.dtype, device=per_voxel.device))
    if reduction == "none":
        return per_voxel
    total = per_voxel.sum()
    if reduction == "sum":
        return total
    if reduction == "mean":
        if valid is None:
            return total / max(per_voxel.numel(), 1)
        return total / valid.sum().clamp_min(1)  # no valid voxel: 0 with a zero gradient, never NaN
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def _valid_logits(logits: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Logits with 0 at invalid voxels: whatever they held (NaN, inf) then gets exactly zero gradient."""
    if valid is None:
        return logits
    return torch.where(valid.unsqueeze(1), logits, torch.zeros((), dtype=logits.dtype, device=logits.device))


def ordinal_loss(logits: torch.Tensor, k: torch.Tensor, rps_weight: float = 1.0, majority: int | None = None,
                 valid: torch.Tensor | None = None, reduction: str = "mean") -> torch.Tensor:
    """The ordinal loss of SPEC §3 with its reduction over valid voxels; differentiable by autograd."""
    return _reduce(ordinal_loss_map(_valid_logits(logits, valid), k, rps_weight, majority), valid, reduction)


def ordinal_loss_grad(logits: torch.Tensor, k: torch.Tensor, rps_weight: float = 1.0,
                      majority: int | None = None, valid: torch.Tensor | None = None,
                      reduction: str = "mean") -> torch.Tensor:
    """Analytic gradient of :func:`ordinal_loss` w.r.t. the logits (SPEC §3), for an upstream gradient of 1.

    For ``reduction="none"`` each voxel's gradient is that of its own loss. Returned in the accumulation
    dtype, shape of ``logits``.
    """
    z = _valid_logits(logits, valid).to(opmath_dtype(logits.dtype))
    R = z.shape[1] - 1
    m = majority_threshold(R, majority)
    q = torch.softmax(z, dim=1)
    # RPS: dRPS/dq_i = (2/R) * sum_{j>=i} (F_j - G_j), a reverse cumulative sum; 0 for the last level.
    diff = torch.cumsum(q, dim=1)[:, :R] - _levels_below(k, R, z.dtype)
    g = torch.flip(torch.cumsum(torch.flip(diff, [1]), 1), [1]) * (2.0 / R)
    g = torch.cat([g, torch.zeros_like(g[:, :1])], dim=1)
    d_rps = q * (g - (q * g).sum(1, keepdim=True))
    # BCE through the majority logit: dl/dz is a partial softmax, + on the upper levels, - on the lower.
    l = torch.logsumexp(z[:, m:], 1) - torch.logsumexp(z[:, :m], 1)
    d_l = torch.sigmoid(l) - (k.long() >= m).to(z.dtype)
    dl_dz = torch.cat([-torch.softmax(z[:, :m], 1), torch.softmax(z[:, m:], 1)], dim=1)
    grad = d_l.unsqueeze(1) * dl_dz + rps_weight * d_rps
    if valid is not None:
        grad = torch.where(valid.unsqueeze(1), grad, 0.0)
    if reduction == "mean":
        grad = grad / (max(grad[:, 0].numel(), 1) if valid is None else valid.sum().clamp_min(1))
    return grad


# --- §4 calibration statistics -------------------------------------------------------------------------

def _bin_index(p: torch.Tensor, bins: int) -> torch.Tensor:
    """``min(floor(p * bins), bins - 1)``: equal-width bins on [0, 1], ``p = 1`` in the last bin."""
    return torch.clamp(torch.floor(p * bins), 0, bins - 1).long()


def calibration_stats(p: torch.Tensor, k: torch.Tensor, num_raters: int, n_bins: int = 15,
                      auc_bins: int = 4096, majority: int | None = None,
                      valid: torch.Tensor | None = None) -> CalibrationStats:
    """Per-image statistics (SPEC §4) of probabilities ``p`` (B, *S) against vote counts ``k`` (B, *S)."""
    R = int(num_raters)
    m = majority_threshold(R, majority)
    B, V = p.shape[0], math.prod(p.shape[1:])
    p = p.to(opmath_dtype(p.dtype)).reshape(B, V)
    k = k.reshape(B, V).long()
    w = torch.ones_like(k) if valid is None else valid.reshape(B, V).long()  # 1 for voxels that count
    if valid is not None:  # an invalid voxel may hold anything, even NaN: give it a harmless value
        p = torch.where(w.bool(), p, 0.0)
    kw, rw = k * w, R * w

    def hist(index: torch.Tensor, values: torch.Tensor, bins: int) -> torch.Tensor:
        out = torch.zeros(B, bins, dtype=values.dtype, device=values.device)
        return out.scatter_add_(1, index, values)

    pd = p.double()
    b = _bin_index(p, n_bins)
    t = _bin_index(p, auc_bins)
    brier = k * (1 - p) ** 2 + (R - k) * p ** 2
    # The bound applies to the logarithms, so a confident miss costs -log(NLL_EPS) on either side (clamping p
    # to [eps, 1 - eps] would not: 1 - 1e-7 rounds to 1 - 1.19e-7 in float32).
    log_eps = float(torch.log(torch.tensor(NLL_EPS, dtype=p.dtype)))
    nll = -(k * torch.log(p).clamp_min(log_eps) + (R - k) * torch.log1p(-p).clamp_min(log_eps))
    fg = p >= DICE_THRESHOLD
    y = k >= m
    wb = w.bool()
    return CalibrationStats(
        n=hist(b, rw, n_bins), a=hist(b, kw, n_bins), s=hist(b, rw.double() * pd, n_bins),
        brier=torch.where(wb, brier, 0).double().sum(1), nll=torch.where(wb, nll, 0).double().sum(1),
        tp=(fg & y & wb).sum(1), fp=(fg & ~y & wb).sum(1), fn=(~fg & y & wb).sum(1),
        pos=hist(t, kw, auc_bins), neg=hist(t, rw - kw, auc_bins),
    )
