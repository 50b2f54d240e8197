"""Metrics of pooled statistics and the bootstrap over images or groups of images (SPEC §4–5, §11).

Every value here comes from :class:`~orcal.ops.stats.CalibrationStats` rows through the metric registry
(:mod:`orcal.metrics.registry`): rows are summed first, then each registered metric is computed once per
pooled row. No voxel is read again, so the bootstrap costs O(n_boot x n_images x bins).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from orcal.metrics.registry import auc_counts, metrics_from_totals, safe_div
from orcal.ops.checks import check_int, check_real
from orcal.ops.stats import CalibrationStats


def _check_stats(stats) -> None:
    if not isinstance(stats, CalibrationStats):
        raise TypeError(f"stats must be CalibrationStats, got {type(stats).__name__}")


# --- §4 metrics from statistics --------------------------------------------------------------------------

def calibration_metrics(stats: CalibrationStats) -> dict[str, float]:
    """Dataset metrics from per-image statistics: ``mr_ece`` (l1), ``mr_ece_l2``, ``mr_mce``, ``auc`` (binned,
    with ``auc_error_bound``), ``brier``, ``nll``, ``dice`` and any metric registered since. All rows are
    pooled first (SPEC §4); undefined values are NaN. With several structures (SPEC §11) the plain keys pool
    every structure, and ``"<metric>/<label>"`` and ``"<metric>/macro"`` give each structure and their
    unweighted mean."""
    _check_stats(stats)
    out = metrics_from_totals(stats.pooled())
    if stats.num_structures > 1:
        out.update(per_structure(metrics_from_totals(stats.total()), stats.num_structures))
    return {key: float(value[0]) for key, value in out.items()}


def per_structure(values: dict[str, torch.Tensor], num_structures: int) -> dict[str, torch.Tensor]:
    """``{metric: (rows * C,) values}``, structure-minor, as ``"<metric>/macro"`` (the NaN-skipping mean over
    structures) and ``"<metric>/<label>"`` for labels 1..C, each ``(rows,)`` (SPEC §11)."""
    out = {}
    for key, v in values.items():
        v = v.reshape(-1, num_structures)
        out[f"{key}/macro"] = v.nanmean(1)
        out.update({f"{key}/{c + 1}": v[:, c] for c in range(num_structures)})
    return out


def bin_table(stats: CalibrationStats) -> dict[str, np.ndarray]:
    """The pooled reliability table: per-bin pair count, mean confidence and observed positive fraction."""
    tot = stats.pooled()
    n = tot.n[0].double()
    return {
        "lower": np.linspace(0, 1, stats.n_bins + 1)[:-1],
        "upper": np.linspace(0, 1, stats.n_bins + 1)[1:],
        "count": tot.n[0].cpu().numpy(),
        "confidence": safe_div(tot.s[0], n).cpu().numpy(),
        "accuracy": safe_div(tot.a[0].double(), n).cpu().numpy(),
    }


def auc_exact(p: torch.Tensor, k: torch.Tensor, num_raters: int, valid: torch.Tensor | None = None) -> float:
    """Exact multi-rater AUC: ``P(score_pos > score_neg) + 0.5 P(tie)`` over expanded voxel–rater pairs.

    Each voxel contributes ``k`` positive and ``R - k`` negative pairs with score ``p``; ties are grouped
    by sorting, so nothing is expanded.
    """
    p = p.reshape(-1).double()
    k = k.reshape(-1).long()
    if valid is not None:
        keep = valid.reshape(-1)
        p, k = p[keep], k[keep]
    _, pos, neg = merge_scores(p, k, num_raters - k)
    return auc_from_sorted_counts(pos, neg)


def merge_scores(scores: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sorted unique scores with the summed positive and negative pair counts of each."""
    unique, inverse = torch.unique(scores, sorted=True, return_inverse=True)
    merged_pos = torch.zeros(unique.shape[0], dtype=pos.dtype, device=pos.device).index_add_(0, inverse, pos)
    merged_neg = torch.zeros(unique.shape[0], dtype=neg.dtype, device=neg.device).index_add_(0, inverse, neg)
    return unique, merged_pos, merged_neg


def auc_from_sorted_counts(pos: torch.Tensor, neg: torch.Tensor) -> float:
    """Exact AUC from pair counts per distinct score in increasing order (ties count one half); NaN without
    a positive or a negative pair. The same count as the binned AUC of SPEC §4, with one bin per score."""
    wins, _, total = auc_counts(pos[None], neg[None])
    return float(wins[0] / total[0]) if float(total[0]) > 0 else math.nan


# --- §5 bootstrap ----------------------------------------------------------------------------------------

def group_index(groups: Sequence | None, n_images: int) -> torch.Tensor | None:
    """Each image's group as an index ``0..G-1`` in order of first appearance (None for None).

    ``groups`` holds one id per image row (a patient, a case, a volume: any hashable); images of one group
    are resampled together by the bootstrap. Numbering by first appearance makes one image per group draw
    exactly what the image bootstrap draws with the same seed.
    """
    if groups is None:
        return None
    if isinstance(groups, (torch.Tensor, np.ndarray)):
        groups = groups.tolist()
    groups = list(groups)
    if len(groups) != n_images:
        raise ValueError(f"groups must hold one id per image row: got {len(groups)} for {n_images} images")
    first: dict = {}
    return torch.tensor([first.setdefault(g, len(first)) for g in groups], dtype=torch.long)


def bootstrap_weights(n_images: int, n_boot: int = 1000, fraction: float = 0.6, count: int | None = None,
                      seed: int = 0, groups: Sequence | None = None) -> torch.Tensor:
    """How often each image enters each resample of :func:`bootstrap_samples`: ``(n_boot, n_images)`` float64.

    The draws depend only on ``seed``, ``n_boot``, the resample size and the number of units (images, or
    ``groups``), so any per-image quantity weighted by these rows is resampled exactly as the calibration
    statistics of the same images are (the paired comparisons of SPEC §5.1).
    """
    if n_images == 0:
        raise ValueError("bootstrap needs statistics of at least one image")
    index = group_index(groups, n_images)
    n_units = n_images if index is None else int(index.max()) + 1
    size = count if count is not None else math.ceil(fraction * n_units)
    if size < 1:
        raise ValueError(f"bootstrap resample size must be >= 1, got {size}")
    gen = torch.Generator().manual_seed(seed)
    draws = torch.randint(n_units, (n_boot, size), generator=gen)
    # Multiplicity of each unit in each resample; resampled totals are then one matrix product.
    weights = torch.zeros(n_boot, n_units, dtype=torch.float64).scatter_add_(
        1, draws, torch.ones(n_boot, size, dtype=torch.float64))
    if index is not None:
        weights = weights[:, index]  # every image of a group counts as often as its group was drawn
    return weights


def bootstrap_samples(stats: CalibrationStats, n_boot: int = 1000, fraction: float = 0.6, count: int | None = None,
                      seed: int = 0, groups: Sequence | None = None) -> dict[str, torch.Tensor]:
    """Every metric on each of ``n_boot`` resamples of the images (SPEC §5): ``{metric: (n_boot,) float64}``.

    Each resample draws ``count`` images (default ``ceil(fraction * n_images)``) with replacement and sums
    their rows. With ``groups`` (one id per image, e.g. its patient) the units drawn are the groups instead:
    ``count`` (default ``ceil(fraction * n_groups)``) groups with replacement, each with all its images, so
    images that are correlated within a group are not counted as independent evidence (SPEC §5). The draws
    depend only on ``seed``, ``n_boot``, the size and the number of units, so statistics of other models on
    the same images are resampled identically (the paired comparison of SPEC §5.1). Cost is
    O(n_boot x n_images x bins): no voxel is visited.
    """
    n_images, C = stats.n_images, stats.num_structures
    weights = bootstrap_weights(n_images, n_boot, fraction, count, seed, groups)

    def resample(t: torch.Tensor) -> torch.Tensor:
        flat = t.reshape(n_images, -1).double()  # an image's C structure rows resampled together
        out = (weights @ flat).reshape(n_boot * C, *t.shape[1:])
        return out.round().long() if t.dtype == torch.int64 else out  # integer counts stay exact (< 2^53)

    resampled = stats.to("cpu")._map(resample)  # one "image" per resample
    out = metrics_from_totals(resampled._map(lambda t: t.reshape(n_boot, C, *t.shape[1:]).sum(1), 1))
    if C > 1:
        out.update(per_structure(metrics_from_totals(resampled), C))
    return {k: v.double() for k, v in out.items()}


def summarize_samples(samples: torch.Tensor, value: float) -> dict[str, float]:
    """``{"mean", "std", "low", "high", "value"}`` of one metric's bootstrap ``samples`` (undefined resamples,
    NaN, left out; all NaN when none is defined), with the full-sample ``value``."""
    v = samples.numpy()
    v = v[~np.isnan(v)]
    if v.size == 0:
        return {"mean": math.nan, "std": math.nan, "low": math.nan, "high": math.nan, "value": value}
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else 0.0,
            "low": float(np.percentile(v, 2.5)), "high": float(np.percentile(v, 97.5)), "value": value}


def bootstrap(stats: CalibrationStats, n_boot: int = 1000, fraction: float = 0.6, seed: int = 0,
              count: int | None = None, groups: Sequence | None = None) -> dict[str, dict[str, float]]:
    """Bootstrap confidence intervals over images, or over groups of images (SPEC §5).

    Returns ``{metric: {"mean", "std", "low", "high", "value"}}`` over the resamples of
    :func:`bootstrap_samples`, with the 2.5 / 97.5 percentiles as ``low`` / ``high`` and the full-sample
    metric as ``value``. ``groups`` (one id per image row, e.g. the patient) resamples whole groups.
    """
    _check_stats(stats)
    n_boot = check_int("n_boot", n_boot, 1)
    seed = check_int("seed", seed)
    if count is not None:
        count = check_int("count", count, 1)
    elif not 0 < check_real("fraction", fraction) <= 1:
        raise ValueError(f"fraction must lie in (0, 1], got {fraction}")
    boot = bootstrap_samples(stats, n_boot=n_boot, fraction=fraction, count=count, seed=seed, groups=groups)
    full = calibration_metrics(stats.to("cpu"))
    return {key: summarize_samples(values, full[key]) for key, values in boot.items()}
