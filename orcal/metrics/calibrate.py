"""Post-hoc temperature scaling against voxel–rater pairs (SPEC §10).

The cheapest thing a user can do instead of training with a calibration-aware loss: divide the trained
network's logits by one temperature ``T`` fitted on held-out data. Here the fit is against the voxel–rater
pairs of the multi-rater metrics: ``T`` minimises the pair NLL ``-sum_v [k log p + (R - k) log(1 - p)]`` of
the validation voxels, where ``p`` is the foreground probability of ``logits / T`` (a sigmoid for a binary
logit; a readout of the softmax over the ``R + 1`` levels for ordinal logits, so one ``T`` serves either
readout's probability). ``T > 1`` softens an over-confident model, ``T < 1`` sharpens an under-confident one.

Streaming, with bounded memory: :class:`TemperatureScaler` keeps a uniform random sample of at most
``max_voxels`` valid voxels over all its updates (each voxel gets a random key; the smallest keys are kept),
and :meth:`TemperatureScaler.fit` searches ``log T`` on that sample::

    >>> import torch
    >>> from orcal.metrics import fit_temperature
    >>> g = torch.Generator().manual_seed(0)
    >>> z = torch.randn(2, 64, 64, generator=g) * 2                   # well calibrated logits ...
    >>> k = torch.binomial(torch.full_like(z, 4.0), torch.sigmoid(z), generator=g).to(torch.uint8)
    >>> round(fit_temperature(3 * z, k, num_raters=4), 1)              # ... made three times too confident
    3.0
"""

from __future__ import annotations

import math

import torch

from orcal import ops
from orcal.metrics.batch_stats import prepare
from orcal.ops import reference
from orcal.ops.masks import check_masks

__all__ = ["TemperatureScaler", "apply_temperature", "fit_temperature"]

#: The search interval of the temperature, and the golden-section steps (the bracket shrinks by 0.618 each).
T_BOUNDS = (0.02, 50.0)
_STEPS = 80
_EPS = 1e-12


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``logits / temperature`` (binary or ordinal logits alike)."""
    t = ops.check_real("temperature", temperature)
    if not t > 0:
        raise ValueError(f"temperature must be positive, got {t}")
    return logits / t


def _check(logits: torch.Tensor, target: torch.Tensor, num_raters: int | None, valid: torch.Tensor | None,
           kind: str) -> int:
    """Validate one update (the rules of SPEC §8); returns ``R``."""
    if not logits.dtype.is_floating_point:
        raise TypeError(f"logits must be a float tensor, got {logits.dtype}")
    if num_raters is None:
        check_masks(target, "target")
        R, spatial = target.shape[1], target.shape[:1] + target.shape[2:]
    else:
        R = ops.check_int("num_raters", num_raters, 1, ops.MAX_RATERS)
        if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
            raise TypeError(f"target (vote counts) must be an integer tensor, got {target.dtype}")
        spatial = target.shape
        if target.numel():
            lo, hi = ops.integer_range(target)  # every integer dtype, uint16 included
            ops.data_check((lo >= 0) & (hi <= R),
                           lambda: f"target (vote counts) must lie in 0..R = 0..{R}; found {int(lo)}..{int(hi)}")
    if kind == "ordinal":
        if logits.ndim < 2 or logits.shape[1] != R + 1:
            raise ValueError(f"ordinal logits need R + 1 = {R + 1} channels, got shape {tuple(logits.shape)}")
        got = logits.shape[:1] + logits.shape[2:]
    elif logits.ndim == len(spatial) + 1:  # channel-first (B, 1, *S)
        if logits.shape[1] != 1:
            raise ValueError(f"binary logits must be (B, *S) or (B, 1, *S), got shape {tuple(logits.shape)}")
        got = logits.shape[:1] + logits.shape[2:]
    else:
        got = logits.shape
    if got != spatial:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} do not describe the same "
                         "images")
    ops.check_valid(valid, spatial, "the images")
    return R


class TemperatureScaler:
    """Fit one temperature on held-out voxel–rater pairs, then apply it to logits.

    Args:
        kind: ``"logit"`` (binary logits ``(B, *S)`` / ``(B, 1, *S)``) or ``"ordinal"`` (``(B, R+1, *S)``).
        readout: the ordinal readout whose pair NLL is minimised (``"majority"`` or ``"expected"``).
        majority: majority threshold of the majority readout; default ``R // 2 + 1``.
        max_voxels: size of the uniform voxel sample the fit uses (memory: ``max_voxels x (R + 2)`` values).
        seed: seed of the sample.
    """

    def __init__(self, kind: str = "logit", readout: str = "majority", majority: int | None = None,
                 max_voxels: int = 1_000_000, seed: int = 0) -> None:
        ops.check_choice("kind", kind, ("logit", "ordinal"))
        ops.check_choice("readout", readout, ops.READOUTS)
        self.kind, self.readout = kind, readout
        self.majority = None if majority is None else ops.check_int("majority", majority, 1, ops.MAX_RATERS)
        self.max_voxels = ops.check_int("max_voxels", max_voxels, 1, 1 << 31)
        self._gen = torch.Generator().manual_seed(ops.check_int("seed", seed, 0, 2**63 - 1))
        self.temperature: float | None = None
        self.reset()

    def reset(self) -> None:
        """Forget the sample and the fitted temperature."""
        self._logits: torch.Tensor | None = None  # (N, C) float32 on the CPU
        self._k = torch.zeros(0, dtype=torch.uint8)
        self._keys = torch.zeros(0)
        self._R: int | None = None
        self.temperature = None

    def update(self, logits: torch.Tensor, target: torch.Tensor, num_raters: int | None = None,
               valid: torch.Tensor | None = None) -> None:
        """Add held-out voxels: ``target`` is the rater stack ``(B, R, *S)``, or vote counts ``k`` with
        ``num_raters``; ``valid`` an optional ``(B, *S)`` mask."""
        logits, target, valid = prepare(logits, target, valid, num_raters, self.kind)
        R = _check(logits, target, num_raters, valid, self.kind)
        if self._R is not None and R != self._R:
            raise ValueError(f"TemperatureScaler saw R = {self._R} raters before, now R = {R}")
        self._R = R
        B = logits.shape[0]
        k = target.sum(1, dtype=torch.uint8) if num_raters is None else target.to(torch.uint8)  # checked: 0..R
        channels = logits.shape[1] if self.kind == "ordinal" else 1
        z = logits.detach().reshape(B, channels, -1).transpose(1, 2).reshape(-1, channels)
        k = k.reshape(-1)
        if valid is not None:
            keep = valid.reshape(-1)
            z, k = z[keep], k[keep]
        # one NaN or infinite logit makes every pair NLL non-finite and drives T to a bound of its search
        bad = ~torch.isfinite(z).all(1)
        ops.data_check(~bad.any(), lambda: f"logits hold NaN or infinite values at {int(bad.sum())} valid voxels; "
                                           "mark them invalid (valid=) or fix the model")
        keys = torch.rand(k.shape[0], generator=self._gen).to(z.device)
        # only this batch's smallest keys can survive the merge: trim on its device before the copy
        keys, z, k = (t.cpu() for t in self._smallest(keys, z.float(), k))
        if self._logits is not None:
            keys, z, k = torch.cat([self._keys, keys]), torch.cat([self._logits, z]), torch.cat([self._k, k])
        self._keys, self._logits, self._k = self._smallest(keys, z, k)
        self.temperature = None

    def _smallest(self, keys: torch.Tensor, *rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``keys`` and ``rows`` restricted to the ``max_voxels`` smallest keys (all of them when fewer)."""
        if keys.shape[0] <= self.max_voxels:
            return (keys, *rows)
        keys, order = torch.topk(keys, self.max_voxels, largest=False)
        return (keys, *(r[order] for r in rows))

    def pair_nll(self, temperature: float) -> float:
        """Mean NLL per voxel–rater pair of the sample at ``temperature``."""
        if self._logits is None or self._k.numel() == 0:
            raise RuntimeError("TemperatureScaler has no voxel: call update() with held-out data first")
        z, k, R = self._logits / temperature, self._k.float(), float(self._R)
        if self.kind == "logit":  # stable: softplus, never log(sigmoid)
            nll = k * torch.nn.functional.softplus(-z[:, 0]) + (R - k) * torch.nn.functional.softplus(z[:, 0])
        else:
            m = reference.majority_threshold(self._R, self.majority)
            # (N, C) as a one-voxel-high image: the readout takes (B, R+1, *S)
            p = reference.foreground_probability(z.T[None, :, :, None], self.readout, m)[0, :, 0].double()
            p = p.clamp(_EPS, 1 - _EPS)
            nll = -(k * torch.log(p) + (R - k) * torch.log1p(-p))
        return float(nll.double().sum() / (R * k.numel()))

    def fit(self) -> float:
        """The temperature in :data:`T_BOUNDS` that minimises the pair NLL of the sample (golden-section search
        on ``log T``; the binary pair NLL is convex in ``1 / T``). Stored in ``self.temperature``."""
        lo, hi = math.log(T_BOUNDS[0]), math.log(T_BOUNDS[1])
        ratio = (math.sqrt(5) - 1) / 2
        a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
        fa, fb = self.pair_nll(math.exp(a)), self.pair_nll(math.exp(b))
        for _ in range(_STEPS):
            if fa <= fb:
                hi, b, fb = b, a, fa
                a = hi - ratio * (hi - lo)
                fa = self.pair_nll(math.exp(a))
            else:
                lo, a, fa = a, b, fb
                b = lo + ratio * (hi - lo)
                fb = self.pair_nll(math.exp(b))
        self.temperature = math.exp((lo + hi) / 2)
        return self.temperature

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits / T`` with the fitted temperature."""
        if self.temperature is None:
            raise RuntimeError("TemperatureScaler: call fit() before applying it")
        return apply_temperature(logits, self.temperature)

    def __repr__(self) -> str:
        n = 0 if self._logits is None else self._k.numel()
        return f"TemperatureScaler(kind={self.kind!r}, readout={self.readout!r}, voxels={n}, T={self.temperature})"


def fit_temperature(logits: torch.Tensor, target: torch.Tensor, num_raters: int | None = None,
                    kind: str = "logit", readout: str = "majority", valid: torch.Tensor | None = None,
                    max_voxels: int = 1_000_000) -> float:
    """The temperature of :class:`TemperatureScaler` fitted on one batch of held-out data."""
    scaler = TemperatureScaler(kind=kind, readout=readout, max_voxels=max_voxels)
    scaler.update(logits, target, num_raters=num_raters, valid=valid)
    return scaler.fit()
