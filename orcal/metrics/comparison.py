"""Seeds and paired comparisons (SPEC §5.1): how much of a gap between two methods is training noise.

The bootstrap of SPEC §5 resamples test images; it says nothing about the noise of training itself. With
models of several seeds evaluated on the same test images:

- :func:`seed_summary` reports each metric's test-set value averaged over seeds, its standard deviation over
  seeds, and the bootstrap of the seed average (every seed's statistics resampled with the same draws);
- :func:`paired_difference` reports ``metric(a) - metric(b)`` per seed and the bootstrap of the
  seed-averaged difference on the same resampled images, which cancels the images both methods find hard;
- :func:`exceeds_noise` says whether a difference is larger than both noises.

>>> import torch, orcal
>>> g = torch.Generator().manual_seed(0)
>>> k = torch.randint(0, 4, (30, 16, 16), generator=g, dtype=torch.uint8)
>>> def stats(shift):  # a model of one seed: k / R plus noise of size shift
...     p = (k / 3 + shift * torch.rand(30, 16, 16, generator=g)).clamp(0, 1)
...     return orcal.calibration_stats(p, k, num_raters=3)
>>> good, bad = [stats(0.05), stats(0.06)], [stats(0.4), stats(0.5)]
>>> d = paired_difference(good, bad, n_boot=200)["mr_ece"]
>>> d["diff"] < 0, exceeds_noise(d)
(True, True)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from orcal.metrics.pooled import bootstrap_samples, calibration_metrics, summarize_samples
from orcal.ops.stats import CalibrationStats

__all__ = ["SeedSamples", "exceeds_noise", "paired_difference", "seed_samples", "seed_summary"]


@dataclass(frozen=True)
class SeedSamples:
    """One method's metrics over seeds, computed once and shared by every comparison it enters: ``values``
    per seed (``{metric: (S,)}``) and the bootstrap of the seed mean (``{metric: (n_boot,)}``)."""

    values: dict[str, np.ndarray]
    boot: dict[str, torch.Tensor]
    n_images: int


Seeds = Sequence[CalibrationStats] | SeedSamples


def seed_samples(stats: Sequence[CalibrationStats], n_boot: int = 1000, fraction: float = 0.6, seed: int = 0,
                 groups: Sequence | None = None) -> SeedSamples:
    """The :class:`SeedSamples` of one method's per-seed statistics (every seed resampled with the same draws;
    with ``groups``, one id per image such as its patient, whole groups are resampled: SPEC §5)."""
    stats = list(stats)
    if not stats or not all(isinstance(s, CalibrationStats) for s in stats):
        raise TypeError("stats must be a non-empty sequence of CalibrationStats (one per seed)")
    n = {s.n_images for s in stats}
    if len(n) != 1:
        raise ValueError(f"every seed must be evaluated on the same test images, got {sorted(n)} images")
    full = [calibration_metrics(s.to("cpu")) for s in stats]
    values = {k: np.array([v[k] for v in full], dtype=np.float64) for k in full[0]}
    per_seed = [bootstrap_samples(s, n_boot=n_boot, fraction=fraction, seed=seed, groups=groups) for s in stats]
    boot = {k: torch.stack([p[k] for p in per_seed]).mean(0) for k in per_seed[0]}
    return SeedSamples(values, boot, n.pop())


def _samples(x: Seeds, n_boot: int, fraction: float, seed: int, groups: Sequence | None) -> SeedSamples:
    return x if isinstance(x, SeedSamples) else seed_samples(x, n_boot, fraction, seed, groups)


def _std(values: np.ndarray) -> float:
    values = values[np.isfinite(values)]
    return float(values.std(ddof=1)) if values.size > 1 else math.nan


def _mean(values: np.ndarray) -> float:
    return float(values.mean()) if np.isfinite(values).all() else math.nan


def seed_summary(stats: Seeds, n_boot: int = 1000, fraction: float = 0.6, seed: int = 0,
                 groups: Sequence | None = None) -> dict[str, dict]:
    """Every metric of one method over seeds: ``{metric: {"value", "seed_std", "seeds", "mean", "std", "low",
    "high"}}``.

    ``stats`` holds the per-seed statistics (or their :class:`SeedSamples`). ``value`` is the mean over seeds
    of the test-set value, ``seed_std`` their standard deviation (NaN for one seed), ``seeds`` the per-seed
    values; ``mean``/``std``/``low``/``high`` summarise the bootstrap of the seed average (SPEC §5 with one
    seed). ``groups`` (one id per image) resamples whole groups, as in :func:`orcal.metrics.bootstrap`.
    """
    s = _samples(stats, n_boot, fraction, seed, groups)
    return {k: {**summarize_samples(b, _mean(s.values[k])), "seed_std": _std(s.values[k]),
                "seeds": s.values[k].tolist()} for k, b in s.boot.items()}


def paired_difference(a: Seeds, b: Seeds, n_boot: int = 1000, fraction: float = 0.6, seed: int = 0,
                      groups: Sequence | None = None) -> dict[str, dict]:
    """``metric(a) - metric(b)`` for every metric, seed by seed (``a[i]`` and ``b[i]`` trained with the same
    seed): ``{metric: {"diff", "seed_diffs", "seed_std", "mean", "std", "low", "high"}}``.

    ``diff`` is the mean over seeds of the test-set differences; ``low``/``high`` the 2.5 / 97.5 percentiles
    of the seed-averaged difference over bootstrap resamples drawn identically for both methods (of whole
    groups with ``groups``, one id per image such as its patient; :class:`SeedSamples` carry their own draws).
    """
    a, b = _samples(a, n_boot, fraction, seed, groups), _samples(b, n_boot, fraction, seed, groups)
    if len(next(iter(a.values.values()))) != len(next(iter(b.values.values()))):
        raise ValueError("a and b need the same seeds")
    if a.n_images != b.n_images:
        raise ValueError(f"a and b must be evaluated on the same images, got {a.n_images} and {b.n_images}")
    out = {}
    for key in a.boot:
        d = a.values[key] - b.values[key]
        s = summarize_samples(a.boot[key] - b.boot[key], _mean(d))
        out[key] = {**s, "diff": s.pop("value"), "seed_diffs": d.tolist(), "seed_std": _std(d)}
    return out


def exceeds_noise(difference: dict) -> bool:
    """Whether a :func:`paired_difference` entry is larger than the noise: its bootstrap 95 % interval
    excludes 0 and every seed's difference has the same sign as the mean."""
    diff, low, high = difference.get("diff"), difference.get("low"), difference.get("high")
    if not all(isinstance(x, (int, float)) and math.isfinite(x) for x in (diff, low, high)) or diff == 0:
        return False
    same_sign = all(isinstance(x, (int, float)) and x * diff > 0 for x in difference.get("seed_diffs", [diff]))
    return (low > 0 or high < 0) and same_sign
