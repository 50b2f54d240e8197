"""Conformal guarantees measured per image (SPEC §12): the registry of what is reported and the evaluation
that fills it, shared by ``orcal evaluate --conformal`` and ``orcal experiment --conformal``.

:data:`KINDS` is the one list of what is reported: each :class:`ConformalKind` names its calibrator (how it is
made, fed and fitted) and its :class:`Column` entries (how each is computed per image, which way is better,
the bound the guarantee sets). Another kind of conformal set is one more entry. :class:`ConformalEvaluation`
holds one calibrator of every kind: fed calibration images, fitted at a level alpha, then measuring every
column on test images (their per-image values kept, for a bootstrap over images).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch

from orcal.metrics.volume import VolumeStats, volume_stats

__all__ = ["KINDS", "Batch", "Column", "ConformalEvaluation", "ConformalKind", "columns"]

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
