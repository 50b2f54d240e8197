"""The report's opening paragraph, written from the numbers: which row is best on each metric, whether its
lead is larger than the seed and bootstrap noise (:func:`orcal.metrics.exceeds_noise`), where ORC stands,
what temperature scaling did, and the caveats a reader needs.

It reads only an experiment's ``results`` (``results.json``), so it can be regenerated from a saved run.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from orcal.experiment.tables import row_label
from orcal.heads import parse_row, unscaled
from orcal.metrics.comparison import exceeds_noise
from orcal.metrics.registry import higher_is_better
from orcal.metrics.registry import label as metric_label

__all__ = ["FINDINGS_METRICS", "findings"]

#: The metrics the paragraph speaks of, in order.
FINDINGS_METRICS = ("mr_ece", "auc")


def _f(x: float) -> str:
    return f"{x:.4f}"


def _better_by(d: Mapping[str, Any], metric: str | None, higher: bool | None = None) -> dict[str, Any]:
    """A paired difference ``a - b`` turned into how much better ``a`` is (positive when it is better);
    ``higher`` says which way is better where ``metric`` is not a registered metric."""
    sign = 1.0 if (higher_is_better(metric) if higher is None else higher) else -1.0
    low, high = sorted((sign * d["low"], sign * d["high"]))
    return {"diff": sign * d["diff"], "low": low, "high": high,
            "seed_diffs": [sign * x for x in d.get("seed_diffs", [])]}


def _noise(d: Mapping[str, Any]) -> str:
    """Whether the difference ``d`` (as :func:`_better_by` gives it) is larger than the noise, and if not why."""
    interval = f"95 % paired bootstrap interval [{_f(d['low'])}, {_f(d['high'])}]"
    if exceeds_noise(d):
        if len(d.get("seed_diffs", [])) > 1:
            return f"{interval}: larger than the bootstrap and seed noise"
        return f"{interval}: larger than the bootstrap noise (one seed: the seed noise is not measured)"
    if d["low"] <= 0 <= d["high"]:
        return f"{interval}, which includes 0: within the noise, the intervals overlap"
    return f"{interval}, but the seeds disagree on its sign: within the seed noise"


def _lead(ds: str, metric: str, rows: Mapping, comp: Mapping) -> list[str]:
    """The best row on ``metric`` and where the reference row stands, named as a winner only when its lead is
    larger than the noise (a ranking inside the noise can flip with another seed or machine)."""
    lead = comp.get("leads", {}).get(metric)
    if not lead:
        return []
    best, second = lead["best"], lead["runner_up"]
    ahead = _better_by(lead, metric)
    if exceeds_noise(ahead):
        out = [f"On {ds}, **{row_label(best)}** has the best {metric_label(metric)} "
               f"({_f(rows[best][metric]['value'])}); its lead over {row_label(second)} "
               f"({_f(rows[second][metric]['value'])}) is {_f(ahead['diff'])}, {_noise(ahead)}."]
    else:
        extreme = "highest" if higher_is_better(metric) else "lowest"
        out = [f"On {ds}, no row has a better {metric_label(metric)} than the others beyond the noise: the two "
               f"{extreme}, {row_label(best)} ({_f(rows[best][metric]['value'])}) and {row_label(second)} "
               f"({_f(rows[second][metric]['value'])}), differ by {_f(ahead['diff'])}, {_noise(ahead)}."]
    ref = comp.get("reference")
    paired = comp.get("paired", {}).get(best, {}).get(metric)
    if ref and ref not in (best, second) and paired and ref in rows:  # (the runner-up was just compared)
        ahead = _better_by(paired, metric)
        value = _f(rows[ref][metric]["value"])
        if exceeds_noise(ahead):  # ranked among the rows of its family (trained, or + TS), as the leads are
            ranked = sorted((r for r in rows if math.isfinite(rows[r][metric]["value"])
                             and unscaled(r)[1] == unscaled(ref)[1]),
                            key=lambda r: rows[r][metric]["value"], reverse=higher_is_better(metric))
            out.append(f"{row_label(ref)} ranks {ranked.index(ref) + 1} of {len(ranked)} "
                       f"({value}; the best row is ahead of it by {_f(ahead['diff'])}, {_noise(ahead)}).")
        else:
            out.append(f"{row_label(ref)} ({value}) lies within the noise of {row_label(best)}: a difference of "
                       f"{_f(ahead['diff'])}, {_noise(ahead)}.")
    return out


def _temperature(ds: str, rows: Mapping, temperatures: Mapping) -> list[str]:
    pairs = [(unscaled(r)[0], r) for r in rows if unscaled(r)[1] and unscaled(r)[0] in rows]
    if not pairs:
        return []

    def ece(row: str) -> float:
        return rows[row]["mr_ece"]["value"]

    def change(pair: tuple[str, str]) -> str:
        temps = [x for x in temperatures.get(pair[1], []) if x is not None]
        t = f", T = {sum(temps) / len(temps):.2f}" if temps else ""
        return f"{row_label(pair[0])} {_f(ece(pair[0]))} → {_f(ece(pair[1]))}{t}"

    lower = [p for p in pairs if ece(p[1]) < ece(p[0])]
    text = (f"Temperature scaling fitted on the validation split lowers the test MR-ECE of {len(lower)} of "
            f"{len(pairs)} rows")
    if lower:
        text += f"; most for {change(max(lower, key=lambda p: ece(p[0]) - ece(p[1])))}"
    best = min(pairs, key=lambda p: ece(p[1]))
    return [text + f"; the lowest of the + TS rows is {row_label(best[1])} ({change(best)})."]


def _conformal(ds: str, entry: Mapping[str, Any]) -> list[str]:
    """Per kind of conformal set (trained rows): which row meets the guarantee with the smallest sets or
    intervals, and whether that lead is larger than the noise (never a ranking inside it)."""
    from orcal.experiment.conformal import KINDS, columns

    alpha, rows, out = float(entry["alpha"]), entry.get("rows", {}), []
    by_key = columns()
    for kind in KINDS:
        lead = entry.get("leads", {}).get(kind.name)
        if not lead:
            continue
        certified, cost = by_key[kind.certified], by_key[kind.cost]
        op, target = certified.bound
        goal = f"{certified.header} {'≤' if op == '<=' else '≥'} {target(alpha):g}"
        fails = lead.get("fails", [])
        missed = (f"; {', '.join(row_label(r) for r in fails)} miss{'es' if len(fails) == 1 else ''} it beyond the "
                  "noise") if fails else ""
        head = f"Conformal {kind.label} at α = {alpha:g} on {ds} ({goal} guaranteed)"
        if "best" not in lead:
            out.append(f"{head}: every row misses it on the test set beyond the noise.")
            continue
        best = lead["best"]
        value = _f(rows[best][kind.cost]["value"])
        if "runner_up" not in lead:
            out.append(f"{head}: {row_label(best)} alone meets it, with {cost.header} {value}{missed}.")
            continue
        second = lead["runner_up"]
        tied = [r for r in lead["meets"] if rows[r][kind.cost]["value"] == rows[best][kind.cost]["value"]]
        if len(tied) > 1:  # an exact tie (e.g. no uncertain voxel in any row): nothing to rank
            out.append(f"{head}: of the {len(lead['meets'])} rows that meet it, {len(tied)} tie at the "
                       f"{'largest' if cost.better == 'higher' else 'smallest'} {cost.header}, {value}{missed}.")
            continue
        ahead = _better_by(lead, None, higher=cost.better == "higher")
        extreme = "largest" if cost.better == "higher" else "smallest"
        n_ok = len(lead["meets"])
        if exceeds_noise(ahead):
            out.append(f"{head}: of the {n_ok} rows that meet it, **{row_label(best)}** has the {extreme} "
                       f"{cost.header} ({value}); its lead over {row_label(second)} "
                       f"({_f(rows[second][kind.cost]['value'])}) is {_f(ahead['diff'])}, {_noise(ahead)}{missed}.")
        else:
            out.append(f"{head}: of the {n_ok} rows that meet it, none has a {extreme[:-3]}er {cost.header} than "
                       f"the others beyond the noise: the two {extreme}, {row_label(best)} ({value}) and "
                       f"{row_label(second)} ({_f(rows[second][kind.cost]['value'])}), differ by "
                       f"{_f(ahead['diff'])}, {_noise(ahead)}{missed}.")
    return out


def _caveats(results: Mapping[str, Any]) -> str:
    s = results.get("settings", {})
    seeds = s.get("seeds") or [s.get("seed", 0)]
    steps = [t.get("steps") for by in results.get("timings", {}).values() for t in by.values() if t.get("steps")]
    n = max(steps) if steps else s.get("epochs", "?")
    unit = "optimiser step" if steps else "epoch"
    budget = f"{n} {unit}{'' if n == 1 else 's'} per run"
    parts = [f"the budget is small ({budget}, `{s.get('arch', '?')}`, on {s.get('device', '?')})",
             f"{len(seeds)} training seed{'s' if len(seeds) != 1 else ''}"
             + ("" if len(seeds) > 1 else ", so the seed noise is not measured (use --seeds)")]
    if any(parse_row(r).readout == "majority" for by in results.get("runs", {}).values() for r in by):
        floors = [f"{ds} {_f(o['oracle/majority']['mr_ece']['value'])}" for ds, o in results.get("oracles", {}).items()
                  if "oracle/majority" in o]
        parts.append("ORC's majority readout predicts P(k ≥ m), the probability that a majority marks the voxel, "
                     "not the fraction of raters MR-ECE scores against, so its MR-ECE answers another question"
                     + (f"; an oracle that knows each voxel's rate of raters scores with it "
                        f"{', '.join(floors)}" if floors else ""))
    grouped = [ds for ds, d in results.get("datasets", {}).items()
               if (d.get("bootstrap_units") or {}).get("by") == "group"]
    parts.append("the bootstrap intervals come from resamples of "
                 f"{100 * float(s.get('fraction', 0.6)):.0f} % of the test "
                 + (f"patients (cases, volumes: {', '.join(grouped)}), each with all its images, " if grouped
                    else "images, ")
                 + "on which ECE is biased upward, "
                 "so they sit above the test-set value: they compare rows (paired, on the same resamples) rather "
                 "than bound the value")
    if s.get("select_on_val"):
        parts.append(f"σ and λ were chosen by validation MR-ECE on seed {seeds[0]} (the selection table)")
    return "Caveats: " + "; ".join(parts) + "."


def findings(results: Mapping[str, Any]) -> str:
    """The findings paragraph (Markdown) of an experiment's ``results``."""
    sentences: list[str] = []
    for ds, rows in results.get("runs", {}).items():
        comp = results.get("comparisons", {}).get(ds, {})
        for metric in FINDINGS_METRICS:
            sentences += _lead(ds, metric, rows, comp)
        sentences += _temperature(ds, rows, results.get("temperatures", {}).get(ds, {}))
        if ds in results.get("conformal", {}):
            sentences += _conformal(ds, results["conformal"][ds])
    if not sentences:
        return ""
    return " ".join(sentences) + "\n\n" + _caveats(results) + "\n"
