"""The experiment's conformal columns (SPEC §12): each row's guarantees against a random rater, calibrated on
the validation split and measured on the test split.

``orcal experiment --conformal ALPHA`` fits, for every row (each method and readout, the ``+ TS`` rows too),
the calibrators of :mod:`orcal.metrics.conformal` on the validation images (the calibration set: images are
the exchangeable units) and reports on the test images, per image, the quantities of :data:`KINDS`. The
per-image values are kept, so that the rows are bootstrapped, averaged over seeds and compared on the same
resampled images as the other tables (:func:`orcal.metrics.pooled.bootstrap_weights`, SPEC §5.1).

:data:`KINDS` is the one list of what is reported: each :class:`ConformalKind` names its calibrator (how it is
made, fed and fitted) and its :class:`Column` entries (how each is computed per image, which way is better,
the bound the guarantee sets). Another kind of conformal set is one more entry.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import torch

from orcal.metrics.volume import VolumeStats, volume_stats

__all__ = ["KINDS", "Batch", "Column", "ConformalEvaluation", "ConformalKind", "check_calibration_size", "columns",
           "summarize"]


@dataclass
class Batch:
    """One batch of a split as the calibrators see it: ``probs`` ``(B, *S)`` (or ``(B, C, *S)`` with
    ``num_structures``), rater ``masks`` ``(B, R, *S)`` with every voxel outside ``valid`` cleared, ``valid``
    ``(B, *S)`` bool or None, ``spacing`` ``(B, ndim)`` or None (1 mm voxels)."""

    probs: torch.Tensor
    masks: torch.Tensor
    valid: torch.Tensor | None = None
    spacing: torch.Tensor | None = None
    num_structures: int | None = None

    @classmethod
    def of(cls, probs: torch.Tensor, masks: torch.Tensor, valid: torch.Tensor | None = None,
           spacing: torch.Tensor | None = None, num_structures: int | None = None) -> Batch:
        """A batch whose raters count only inside ``valid`` (padding holds no rater's foreground)."""
        if valid is not None:
            masks = masks * valid.unsqueeze(1).to(masks.dtype)
        return cls(probs, masks, valid, spacing, num_structures)

    @property
    def per_structure(self) -> torch.Tensor:
        """The probabilities as ``(B, C, *S)``."""
        return self.probs if self.num_structures is not None else self.probs.unsqueeze(1)

    @cached_property
    def volume(self) -> VolumeStats:
        """The batch's :func:`~orcal.metrics.volume.volume_stats` (computed once for every column)."""
        return volume_stats(self.probs, self.masks, self.spacing, self.valid, num_structures=self.num_structures)


@dataclass(frozen=True)
class Column:
    """One reported quantity.

    ``per_image(calibrator, alpha, batch)`` gives its value per image and structure, ``(B, C)``; the table
    shows the mean over images (and structures). ``better`` is ``"lower"``, ``"higher"`` or None (a rate
    whose target is ``bound``: ``("<=", alpha -> value)`` or ``(">=", ...)``). Columns sharing a ``header``
    are shown in one cell as ``stage`` → ``stage`` (e.g. before → after recalibration).
    """

    key: str
    header: str
    per_image: Callable[[Any, float, Batch], torch.Tensor]
    better: str | None = None
    bound: tuple[str, Callable[[float], float]] | None = None
    stage: str | None = None
    unit: str = ""


@dataclass(frozen=True)
class ConformalKind:
    """One kind of conformal set, ``label`` as the findings name it. ``make(num_structures)`` builds its
    calibrator, ``update(calibrator, batch)`` feeds it a calibration batch, ``fit(calibrator, alpha)`` fits it
    and returns what it fitted (json-able); ``certified`` is the column the guarantee is about and ``cost`` the
    column to keep small."""

    name: str
    label: str
    make: Callable[[int | None], Any]
    update: Callable[[Any, Batch], None]
    fit: Callable[[Any, float], dict[str, list[float]]]
    columns: tuple[Column, ...]
    certified: str
    cost: str


# --- voxel risk control: the mask p >= lambda misses at most alpha of a random rater's foreground ----------------

def _risk_make(num_structures: int | None):
    from orcal.metrics.conformal import ConformalRiskControl

    return ConformalRiskControl(num_structures)


def _risk_fit(crc, alpha: float) -> dict[str, list[float]]:
    return {"threshold": crc.fit(alpha).tolist()}


def _fnr(crc, alpha: float, batch: Batch) -> torch.Tensor:
    """Each image's FNR against a random rater at the fitted threshold: the calibrated loss itself (the
    threshold is a grid point)."""
    from orcal.metrics.conformal import fnr_curves

    return _at_threshold(crc, fnr_curves(batch.probs, batch.masks, batch.num_structures, crc.grid.numel()))


def _at_threshold(calibrator, curves: torch.Tensor) -> torch.Tensor:
    """Each image's value of its loss curves ``(B, C, G)`` at the calibrator's fitted thresholds (grid points)."""
    j = (calibrator.thresholds * (curves.shape[2] - 1)).round().long()
    return curves.gather(2, j.view(1, -1, 1).expand(curves.shape[0], -1, 1))[..., 0]


def _mask_fraction(crc, alpha: float, batch: Batch) -> torch.Tensor:
    """Each image's fraction of (valid) voxels in the thresholded mask: the price of the guarantee."""
    p = batch.per_structure.double()
    return _fraction(p >= crc.thresholds.view(1, -1, *([1] * (p.ndim - 2))), batch)


def _fraction(inside: torch.Tensor, batch: Batch) -> torch.Tensor:
    """The fraction of each image's (valid) voxels in ``inside`` ``(B, *S)`` or ``(B, C, *S)``, as ``(B, C)``."""
    if inside.ndim == batch.per_structure.ndim - 1:
        inside = inside.unsqueeze(1)
    if batch.valid is None:
        return inside.flatten(2).double().mean(2)
    valid = batch.valid.unsqueeze(1).expand_as(inside)
    return (inside & valid).flatten(2).sum(2).double() / valid.flatten(2).sum(2).clamp_min(1)


# --- volume intervals: mu ± q sigma holds a random rater's volume with probability >= 1 - alpha -------------------

def _volume_make(num_structures: int | None):
    from orcal.metrics.conformal import ConformalVolume

    return ConformalVolume(num_structures, rater="random")


def _volume_fit(cv, alpha: float) -> dict[str, list[float]]:
    return {"quantile": cv.fit(alpha).tolist(),
            "nominal_z": [math.sqrt(2) * float(torch.erfinv(torch.tensor(1 - alpha, dtype=torch.float64)))]}


def _intervals(cv, alpha: float, batch: Batch, stage: str) -> tuple[torch.Tensor, torch.Tensor]:
    from orcal.metrics.conformal import nominal_volume_intervals

    return cv.intervals(batch.volume) if stage == "after" else nominal_volume_intervals(batch.volume, alpha)


def _coverage(stage: str) -> Callable[[Any, float, Batch], torch.Tensor]:
    def per_image(cv, alpha: float, batch: Batch) -> torch.Tensor:
        """Each image's fraction of raters whose volume lies in the interval (a random rater's coverage)."""
        low, high = _intervals(cv, alpha, batch, stage)
        s = batch.volume
        y = (s.raters * (s.voxel_volume / 1000.0)[:, None]).view(*low.shape, -1)  # mL, (B, C, R)
        return ((y >= low[..., None]) & (y <= high[..., None])).double().mean(2)
    return per_image


def _width(stage: str) -> Callable[[Any, float, Batch], torch.Tensor]:
    def per_image(cv, alpha: float, batch: Batch) -> torch.Tensor:
        """Each image's interval width (mL)."""
        low, high = _intervals(cv, alpha, batch, stage)
        return high - low
    return per_image


# --- voxel sets: {0, 1}, {1}, {0} or {} per voxel; a random rater's label falls outside at most alpha ----------------

def _sets_make(num_structures: int | None):
    from orcal.metrics.conformal_sets import ConformalVoxelSets

    return ConformalVoxelSets(num_structures)


def _set_miscoverage(sets, alpha: float, batch: Batch) -> torch.Tensor:
    """Each image's fraction of (valid voxel, rater) pairs whose label is outside the voxel's set at the fitted
    threshold: the calibrated loss itself (the threshold is a grid point)."""
    from orcal.metrics.conformal_sets import voxel_set_curves

    return _at_threshold(sets, voxel_set_curves(batch.probs, batch.masks, batch.num_structures, batch.valid,
                                                sets.grid.numel()))


def _uncertain_fraction(sets, alpha: float, batch: Batch) -> torch.Tensor:
    """Each image's fraction of (valid) voxels whose set holds both labels: the uncertainty mask's size."""
    return _fraction(sets.predict(batch.probs).uncertain, batch)


def _at_most_alpha(alpha: float) -> float:
    return alpha


def _at_least_one_minus_alpha(alpha: float) -> float:
    return 1 - alpha


#: Every kind of conformal set the experiment reports, with its columns (the one list: tables, findings and
#: the per-run files read it).
KINDS: tuple[ConformalKind, ...] = (
    ConformalKind(
        "risk", "voxel risk control", _risk_make,
        lambda crc, b: crc.update(b.probs, b.masks), _risk_fit,
        (Column("fnr", "FNR", _fnr, None, ("<=", _at_most_alpha)),
         Column("mask_fraction", "mask size (fraction of voxels)", _mask_fraction, "lower")),
        certified="fnr", cost="mask_fraction"),
    ConformalKind(
        "volume", "volume intervals", _volume_make,
        lambda cv, b: cv.update_stats(b.volume), _volume_fit,
        (Column("volume_coverage/before", "volume coverage", _coverage("before"), None,
                (">=", _at_least_one_minus_alpha), "before"),
         Column("volume_coverage/after", "volume coverage", _coverage("after"), None,
                (">=", _at_least_one_minus_alpha), "after"),
         Column("volume_width/before", "interval width", _width("before"), "lower", None, "before", "volume"),
         Column("volume_width/after", "interval width", _width("after"), "lower", None, "after", "volume")),
        certified="volume_coverage/after", cost="volume_width/after"),
    ConformalKind(
        "sets", "voxel sets", _sets_make,
        lambda sets, b: sets.update(b.probs, b.masks, b.valid), _risk_fit,
        (Column("set_miscoverage", "set miscoverage", _set_miscoverage, None, ("<=", _at_most_alpha)),
         Column("uncertain_fraction", "uncertain voxels (fraction)", _uncertain_fraction, "lower")),
        certified="set_miscoverage", cost="uncertain_fraction"),
)


def columns() -> dict[str, Column]:
    """Every column of :data:`KINDS` by key, in order."""
    return {c.key: c for kind in KINDS for c in kind.columns}


def misses(column: Column, summary: Mapping[str, float], alpha: float) -> bool:
    """Whether a row's ``summary`` of ``column`` misses its bound at ``alpha`` beyond the noise: its whole
    bootstrap interval lies on the wrong side (the test-set value where there is no interval). The guarantee
    holds in expectation over calibration and test sets, so a test value a little past the bound is no miss."""
    if column.bound is None:
        return False
    op, target = column.bound
    t = target(alpha)
    low, high, value = (summary.get(k, math.nan) for k in ("low", "high", "value"))
    if op == "<=":
        edge = low if math.isfinite(low) else value
        return edge > t + 1e-12
    edge = high if math.isfinite(high) else value
    return edge < t - 1e-12


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


class ConformalEvaluation:
    """The calibrators of every kind for one row: :meth:`calibrate` on validation batches, :meth:`fit`, then
    :meth:`measure` on test batches (per-image values kept in test order), :meth:`result`."""

    def __init__(self, num_structures: int | None = None) -> None:
        self.num_structures = num_structures
        self.calibrators = {kind.name: kind.make(num_structures) for kind in KINDS}
        self.alpha: float | None = None
        self.fitted: dict[str, dict[str, list[float]]] = {}
        self.n_calibration = 0
        self._values: dict[str, list[torch.Tensor]] = {key: [] for key in columns()}

    def calibrate(self, batch: Batch) -> None:
        """Add calibration (validation) images."""
        for kind in KINDS:
            kind.update(self.calibrators[kind.name], batch)
        self.n_calibration += batch.probs.shape[0]

    def fit(self, alpha: float) -> None:
        """Fit every calibrator at level ``alpha``."""
        self.alpha = float(alpha)
        self.fitted = {kind.name: kind.fit(self.calibrators[kind.name], self.alpha) for kind in KINDS}

    def measure(self, batch: Batch) -> None:
        """Every column's values on test images."""
        if self.alpha is None:
            raise RuntimeError("ConformalEvaluation: call fit(alpha) before measure()")
        for kind in KINDS:
            for column in kind.columns:
                value = column.per_image(self.calibrators[kind.name], self.alpha, batch)
                self._values[column.key].append(value.double().reshape(batch.probs.shape[0], -1).cpu())

    def per_image(self) -> dict[str, torch.Tensor]:
        """``{column: (N, C)}`` in the order the test images were measured."""
        return {key: torch.cat(v) for key, v in self._values.items() if v}

    def result(self) -> dict[str, Any]:
        """What the run's record keeps: ``alpha``, ``n_calibration``, the fitted parameters and each column's
        test-set value (mean over images and structures); the per-image values are :meth:`per_image`."""
        return {"alpha": self.alpha, "n_calibration": self.n_calibration, "fitted": self.fitted,
                "values": {key: float(v.mean()) for key, v in self.per_image().items()}}


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


def leads(summary: Mapping[str, Any], alpha: float) -> dict[str, dict[str, Any]]:
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
            ok = [r for r in family if not misses(by_key[kind.certified], rows[r][kind.certified], alpha)]
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
