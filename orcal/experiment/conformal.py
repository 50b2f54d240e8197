"""The experiment's conformal columns (SPEC §12): each row's guarantees against a random rater, calibrated on
the validation split and measured on the test split.

``orcal experiment --conformal ALPHA`` fits, for every row (each method and readout, the ``+ TS`` rows too),
a :class:`~orcal.metrics.conformal_evaluation.ConformalEvaluation` on the validation images (the calibration
set: images, or the patients several images share, are the exchangeable units) and reports on the test
images, per image, the columns of its :data:`~orcal.metrics.conformal_evaluation.KINDS`. The per-image
values are kept, so that the rows are bootstrapped, averaged over seeds and compared on the same resampled
images as the other tables (:func:`orcal.metrics.pooled.bootstrap_weights`, SPEC §5.1): :func:`summarize`,
:func:`leads`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from orcal.metrics.conformal_evaluation import KINDS, Batch, Column, ConformalEvaluation, ConformalKind, columns

__all__ = ["KINDS", "Batch", "Column", "ConformalEvaluation", "ConformalKind", "check_calibration_size", "columns",
           "leads", "misses", "summarize"]


def misses(column: Column, summary: Mapping[str, float], alpha: float, n_calibration: int | None = None) -> bool:
    """Whether a row's ``summary`` of ``column`` misses its bound at ``alpha`` beyond the noise.

    The guarantee holds in expectation over calibration and test sets, and the experiment has one calibration
    set: for it the test risk (coverage) fluctuates around its expectation by about
    ``sqrt(alpha (1 - alpha) / n_calibration)`` (SPEC §12.6), which the test bootstrap does not see. So a row
    misses only when its distance past the bound exceeds both noises together: the bootstrap interval's half on
    that side and 1.96 times that calibration spread, added in quadrature (without ``n_calibration``, the
    bootstrap interval alone; without an interval, the test-set value against the calibration spread).
    ``n_calibration``: the calibration set's independent units, its patients (cases, volumes) where several
    images share one."""
    if column.bound is None:
        return False
    op, target = column.bound
    t = target(alpha)
    low, high, value = (summary.get(k, math.nan) for k in ("low", "high", "value"))
    cal = 1.96 * math.sqrt(alpha * (1 - alpha) / n_calibration) if n_calibration else 0.0
    if op == "<=":
        past, test = value - t, value - low
    else:
        past, test = t - value, high - value
    test = test if math.isfinite(test) else 0.0
    return past > math.hypot(test, cal) + 1e-12


def check_calibration_size(n_calibration: int, alpha: float, dataset: str = "") -> None:
    """Refuse, before anything is trained, a validation split too small to certify ``alpha``."""
    from orcal.metrics.conformal import min_calibration_images

    need = min_calibration_images(alpha)
    if n_calibration < need:
        where = f" of {dataset}" if dataset else ""
        raise ValueError(f"--conformal {alpha}: the validation split{where} (the calibration set) has "
                         f"{n_calibration} image(s), fewer than min_calibration_images({alpha}) = {need} "
                         f"(n >= 1/alpha - 1); give the dataset a larger validation split (e.g. --option "
                         f"val_fraction=...) or a larger alpha")


def _image_values(per_image: torch.Tensor) -> torch.Tensor:
    """``(N,)``: an image's value, the mean over its structures."""
    return per_image.double().reshape(per_image.shape[0], -1).mean(1)


def summarize(per_seed: Mapping[str, Sequence[Mapping[str, torch.Tensor]]], n_boot: int = 1000,
              fraction: float = 0.6, seed: int = 0, groups: Sequence | None = None) -> dict[str, Any]:
    """Rows' conformal columns over seeds, with the experiment's bootstrap and paired comparisons.

    ``per_seed[row]`` holds, per seed (same order for every row), ``{column: (N, C)}`` per-image values on the
    same test images. Returns ``{"rows": {row: {column: summary}}, "samples": {row: {column: (n_boot,)}}}``,
    a summary as :func:`orcal.metrics.seed_summary` gives it (``value`` the mean over seeds of the test-set
    mean, ``seed_std``, ``seeds``, and the bootstrap ``mean``/``std``/``low``/``high`` of the seed mean, every
    row and seed resampled with the same draws of images or ``groups``).
    """
    from orcal.metrics.pooled import bootstrap_weights, summarize_samples

    rows: dict[str, dict[str, dict]] = {}
    samples: dict[str, dict[str, torch.Tensor]] = {}
    weights = None
    for row, seeds in per_seed.items():
        rows[row], samples[row] = {}, {}
        for key in columns():
            if not all(key in s for s in seeds):
                continue
            values = torch.stack([_image_values(s[key]) for s in seeds])  # (S, N)
            if weights is None or weights.shape[1] != values.shape[1]:
                weights = bootstrap_weights(values.shape[1], n_boot, fraction, None, seed, groups)
            boot = (weights @ values.T / weights.sum(1, keepdim=True)).mean(1)  # (n_boot,): the seed mean
            per = values.mean(1).numpy()
            summary = summarize_samples(boot, float(per.mean()))
            summary.update({"seed_std": float(per.std(ddof=1)) if per.size > 1 else math.nan,
                            "seeds": per.tolist()})
            rows[row][key], samples[row][key] = summary, boot
    return {"rows": rows, "samples": samples}


def leads(summary: Mapping[str, Any], alpha: float, n_calibration: int | None = None) -> dict[str, dict[str, Any]]:
    """Per kind, of the trained rows (and apart, the ``+ TS`` rows) that do not miss the kind's guarantee
    beyond the noise (:func:`misses`), the one with the smallest ``cost`` and its paired difference to the runner-up:
    ``{kind: {"best", "runner_up", "diff", "low", "high", "seed_diffs", "exceeds_noise", "meets", "fails"}}``
    (keys ``"<kind>+ts"`` for the ``+ TS`` rows)."""
    from orcal.heads import unscaled
    from orcal.metrics.comparison import exceeds_noise

    rows, samples = summary["rows"], summary["samples"]
    by_key = columns()
    out: dict[str, dict[str, Any]] = {}
    for kind in KINDS:
        for is_scaled in (False, True):
            family = [r for r in rows if unscaled(r)[1] == is_scaled and kind.certified in rows[r]
                      and kind.cost in rows[r] and math.isfinite(rows[r][kind.cost]["value"])]
            if not family:
                continue
            ok = [r for r in family
                  if not misses(by_key[kind.certified], rows[r][kind.certified], alpha, n_calibration)]
            entry: dict[str, Any] = {"meets": ok, "fails": [r for r in family if r not in ok]}
            ranked = sorted(ok, key=lambda r: rows[r][kind.cost]["value"],
                            reverse=by_key[kind.cost].better == "higher")
            if ranked:
                entry["best"] = ranked[0]
            if len(ranked) > 1:
                a, b = ranked[0], ranked[1]
                d = summary_difference(rows[a][kind.cost], rows[b][kind.cost], samples[a][kind.cost],
                                       samples[b][kind.cost])
                entry.update({"runner_up": b, **d, "exceeds_noise": exceeds_noise(d)})
            out[kind.name + ("+ts" if is_scaled else "")] = entry
    return out


def summary_difference(a: Mapping[str, Any], b: Mapping[str, Any], boot_a: torch.Tensor, boot_b: torch.Tensor
                       ) -> dict[str, Any]:
    """``a - b`` as :func:`orcal.metrics.paired_difference` gives it: ``diff`` (mean over seeds),
    ``seed_diffs`` and the paired bootstrap ``low``/``high`` (the same resampled images for both)."""
    from orcal.metrics.pooled import summarize_samples

    seeds = (np.asarray(a["seeds"]) - np.asarray(b["seeds"])).tolist()
    s = summarize_samples(boot_a - boot_b, float(np.mean(seeds)))
    return {"diff": s["value"], "low": s["low"], "high": s["high"], "seed_diffs": seeds}
