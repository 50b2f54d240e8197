"""Which run each table row reports (settings chosen on the validation split) and how the rows compare: seed
summaries, paired differences on the same bootstrap draws (SPEC §5.1) and the lead of the best row."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from orcal.experiment.config import ExperimentConfig, Run
from orcal.experiment.tables import TABLES
from orcal.heads import scaled, unscaled


def select_rows(cfg: ExperimentConfig, candidates: Mapping[str, Sequence[Run]], records: Mapping[str, dict]
                ) -> dict[str, dict[str, Any]]:
    """Which run each table row reports: ``{row: {"run", "readout", "parameter", "value", "candidates"}}``.

    Without ``select_on_val`` every row comes from its method's main run. With it, each row takes, of its
    method's candidate runs, the one whose readout has the lowest validation MR-ECE (``records`` of the first
    seed); a temperature-scaled row follows its readout's choice. ``candidates`` maps each candidate value of
    the setting (as text) to its validation MR-ECE.
    """
    chosen: dict[str, dict[str, Any]] = {}
    for method, runs in candidates.items():
        # the readouts the runs have (the half-tie one only where R is even)
        for readout in (r for r in runs[0].readouts if r in records[runs[0].key]["readouts"]):
            pick, scores = runs[0], {}
            if cfg.select_on_val and len(runs) > 1:
                for run in runs:
                    val = records[run.key]["readouts"][readout].get("val") or {}
                    scores[f"{run.parameter[1]:g}"] = val.get("mr_ece", math.nan)
                finite = {k: v for k, v in scores.items() if v is not None and math.isfinite(v)}
                if not finite:
                    raise ValueError(f"cannot select a setting of {method!r} on the validation split: no run has "
                                     "a validation MR-ECE (is the validation split empty?)")
                pick = next(r for r in runs if f"{r.parameter[1]:g}" == min(finite, key=finite.get))
            parameter = pick.parameter if len(runs) > 1 else None
            entry = {"run": pick.key, "readout": readout, "parameter": parameter and parameter[0],
                     "value": parameter and parameter[1], "candidates": scores}
            for r in (readout, scaled(readout)):
                if r in records[pick.key]["readouts"]:
                    chosen[pick.row(r)] = {**entry, "readout": r}
    return chosen


def compare_rows(stats: Mapping[str, Sequence], cfg: ExperimentConfig, reference_row: str | None = None,
                 groups: Sequence | None = None) -> dict[str, Any]:
    """Seed summaries, paired differences against ``reference_row`` (default ORC's majority readout, the
    paper's, else the first row) and, per table metric, the lead of the best row over the runner-up (the best
    row of another model). The trained rows and the ``+ TS`` rows are ranked apart: ``leads`` ranks the
    trained rows (the paper's), ``leads_ts`` the temperature-scaled ones.

    ``stats`` maps a row to its per-image test statistics, one per seed in the same seed order; ``groups``
    (one id per test image, e.g. its patient) makes the bootstrap resample whole groups (SPEC §5).
    """
    from orcal.metrics import comparison
    from orcal.metrics.registry import higher_is_better

    boot = {"n_boot": int(cfg.n_boot), "fraction": float(cfg.fraction), "seed": int(cfg.seed), "groups": groups}
    samples = {row: comparison.seed_samples(st, **boot) for row, st in stats.items()}  # one bootstrap per row
    rows = {row: comparison.seed_summary(s) for row, s in samples.items()}
    ref = reference_row or next((r for r in rows if r == "ordinal/majority"), next(iter(rows)))
    paired = {row: comparison.paired_difference(s, samples[ref]) for row, s in samples.items() if row != ref}
    leads: dict[bool, dict] = {False: {}, True: {}}
    for is_scaled, family in leads.items():
        for _, metric, _ in TABLES:
            ranked = sorted((r for r in rows
                             if unscaled(r)[1] == is_scaled and math.isfinite(rows[r][metric]["value"])),
                            key=lambda r: rows[r][metric]["value"], reverse=higher_is_better(metric))
            if len(ranked) > 1:
                d = comparison.paired_difference(samples[ranked[0]], samples[ranked[1]])[metric]
                family[metric] = {"best": ranked[0], "runner_up": ranked[1], **d,
                                  "exceeds_noise": comparison.exceeds_noise(d)}
    return {"rows": rows, "reference": ref, "paired": paired, "leads": leads[False], "leads_ts": leads[True]}
