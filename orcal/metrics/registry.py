"""The metrics of SPEC §4 as a table: each entry's key, label, direction and its value from pooled statistics.

Every consumer reads this one table: :func:`orcal.calibration_metrics` and the bootstrap (through
:func:`metrics_from_totals`), :class:`orcal.metrics.MultiRaterCalibration`, ``orcal evaluate`` (its columns)
and the experiment's report (labels, which way is better). Adding a metric is one :func:`register_metric`
call with a function of the statistics::

    >>> import torch
    >>> from orcal.ops import reference
    >>> from orcal.metrics import registry
    >>> st = reference.calibration_stats(torch.tensor([[0.9, 0.2]]), torch.tensor([[2, 0]]), num_raters=2)
    >>> _ = registry.register_metric("pairs", "Pairs", lambda t: t.n.sum(1).double(), higher_is_better=True)
    >>> registry.metrics_from_totals(st)["pairs"]
    tensor([4.], dtype=torch.float64)
    >>> registry.unregister_metric("pairs")
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

import torch

from orcal.ops.stats import CalibrationStats


@dataclass(frozen=True)
class Metric:
    """One metric: ``from_totals(stats) -> (rows,)`` float64 tensor, one value per row of pooled statistics
    (NaN where undefined). ``table=False`` marks a companion value (an error bound) shown beside others."""

    key: str
    label: str
    from_totals: Callable[[CalibrationStats], torch.Tensor]
    higher_is_better: bool = False
    table: bool = True


_METRICS: dict[str, Metric] = {}

#: The registered metrics, ``{key: Metric}`` in registration order: a read-only, live view; change it with
#: :func:`register_metric`.
METRICS: Mapping[str, Metric] = MappingProxyType(_METRICS)


def register_metric(key: str, label: str, from_totals: Callable[[CalibrationStats], torch.Tensor], *,
                    higher_is_better: bool = False, table: bool = True, replace: bool = False) -> Metric:
    """Add a metric computed from pooled :class:`~orcal.ops.stats.CalibrationStats` rows; returns its entry."""
    if not isinstance(key, str) or not key.isidentifier():
        raise ValueError(f"a metric key must be an identifier, got {key!r}")
    if not callable(from_totals):
        raise TypeError(f"from_totals of metric {key!r} must be callable")
    if key in METRICS and not replace:
        raise ValueError(f"metric {key!r} is already registered; pass replace=True to replace it")
    _METRICS[key] = entry = Metric(key, label, from_totals, bool(higher_is_better), bool(table))
    return entry


def unregister_metric(key: str) -> None:
    """Remove a metric added with :func:`register_metric`."""
    if key not in METRICS:
        raise ValueError(f"unknown metric {key!r}; registered: {', '.join(METRICS)}")
    del _METRICS[key]


def keys() -> tuple[str, ...]:
    """Every registered metric, in registration order."""
    return tuple(METRICS)


def split_structure(key: str) -> tuple[str, str | None]:
    """``"mr_ece/2"`` -> ``("mr_ece", "2")``, ``"mr_ece/macro"`` -> ``("mr_ece", "macro")`` (SPEC §11);
    a plain key -> ``(key, None)``."""
    base, _, structure = key.partition("/")
    return base, structure or None


def label(key: str) -> str:
    """Display label of ``key`` (the key itself for a name not in the table); a structure's key as
    ``"MR-ECE (structure 2)"`` or ``"MR-ECE (macro)"``."""
    base, structure = split_structure(key)
    text = METRICS[base].label if base in METRICS else base
    if structure is None:
        return text
    return f"{text} ({'macro' if structure == 'macro' else f'structure {structure}'})"


def higher_is_better(key: str) -> bool:
    base = split_structure(key)[0]
    return base in METRICS and METRICS[base].higher_is_better


def metrics_from_totals(st: CalibrationStats) -> dict[str, torch.Tensor]:
    """Every registered metric, one value per row of ``st`` (each row a pooled set of images)."""
    return {key: m.from_totals(st) for key, m in METRICS.items()}


# --- the metrics of SPEC §4 ---------------------------------------------------------------------------------

def safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``num / den`` with NaN where ``den`` is 0 (an undefined metric, e.g. AUC without positives)."""
    den = den.to(torch.float64)
    return torch.where(den > 0, num.to(torch.float64) / den.clamp_min(1e-300), torch.nan)


def _pairs(st: CalibrationStats) -> torch.Tensor:
    return st.n.double().sum(1)


def _bin_gap(st: CalibrationStats) -> tuple[torch.Tensor, torch.Tensor]:
    """Per bin: ``|confidence mass - positives|`` and that gap per pair (0 in empty bins)."""
    n = st.n.double()
    gap = (st.s - st.a.double()).abs()
    return gap, torch.where(n > 0, gap / n.clamp_min(1), 0.0)


def auc_counts(pos: torch.Tensor, neg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row of score-ordered pair counts ``(rows, bins)``: the wins (a positive above a negative, ties
    counted one half), the pairs sharing a bin, and all positive-negative pairs."""
    pos, neg = pos.double(), neg.double()
    neg_below = torch.cumsum(neg, 1) - neg
    return (pos * (neg_below + 0.5 * neg)).sum(1), (pos * neg).sum(1), pos.sum(1) * neg.sum(1)


def _mr_ece(st):
    return safe_div(_bin_gap(st)[0].sum(1), _pairs(st))


def _mr_ece_l2(st):
    per_bin = _bin_gap(st)[1]
    return torch.sqrt(safe_div((st.n.double() * per_bin ** 2).sum(1), _pairs(st)))


def _mr_mce(st):
    return torch.where(_pairs(st) > 0, _bin_gap(st)[1].amax(1), torch.nan)


def _auc(st):
    wins, _, total = auc_counts(st.pos, st.neg)
    return safe_div(wins, total)


def _auc_error_bound(st):
    # Pairs that share a score bin are counted one half; the truth for each lies in [0, 1].
    _, shared, total = auc_counts(st.pos, st.neg)
    return safe_div(0.5 * shared, total)


def _dice(st):
    tp, fp, fn = st.tp.double(), st.fp.double(), st.fn.double()
    den = 2 * tp + fp + fn
    return torch.where(den > 0, 2 * tp / den.clamp_min(1), 1.0)


register_metric("mr_ece", "MR-ECE", _mr_ece)
register_metric("mr_ece_l2", "MR-ECE (l2)", _mr_ece_l2)
register_metric("mr_mce", "MR-MCE", _mr_mce)
register_metric("auc", "AUC", _auc, higher_is_better=True)
register_metric("auc_error_bound", "AUC error bound", _auc_error_bound, table=False)
register_metric("brier", "Brier", lambda st: safe_div(st.brier, _pairs(st)))
register_metric("nll", "NLL", lambda st: safe_div(st.nll, _pairs(st)))
register_metric("dice", "Dice", _dice, higher_is_better=True)
