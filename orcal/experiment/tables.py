"""The experiment's tables: methods as rows, the test-set value ± its spread and the bootstrap interval.

The experiment driver (:mod:`orcal.experiment.driver`) produces, per dataset and per table row, the summary of
every metric over seeds (:func:`orcal.metrics.seed_summary`: ``{metric: {"value", "seed_std", "seeds",
"mean", "std", "low", "high"}}``). This module lays those out as the paper's tables (methods as rows,
datasets as columns, the best value marked) in Markdown and CSV, and as the report's smaller tables
(sweep, selection, paired comparisons, volumes).

Rows are keyed ``"<method>"`` for the baselines and ``"ordinal/<readout>"`` for the ordinal method, whose
two readouts (SPEC §2) are reported as two rows; a temperature-scaled row adds
:data:`~orcal.heads.TS_SUFFIX` (:mod:`orcal.heads` writes and reads the keys).
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orcal.heads import parse_row
from orcal.metrics.comparison import exceeds_noise
from orcal.metrics.registry import higher_is_better as metric_higher_is_better
from orcal.metrics.registry import label as metric_label

Summary = Mapping[str, Mapping[str, float]]       # {metric: {"mean", "std", ...}}
Runs = Mapping[str, Mapping[str, Summary]]        # {dataset: {row: Summary}}

#: Added to the label of a temperature-scaled row.
TS_LABEL = " + TS"

#: How the tables mark the best rows: the trained rows and the temperature-scaled rows are ranked apart.
BEST = "best in bold, the trained rows and the + TS rows ranked apart)"


def row_label(row: str) -> str:
    """Display label of a table row key: the strategy's label (:mod:`orcal.fusion`), with the readout of an
    ordinal head (``"ordinal/expected"`` -> ``"ORC (expected)"``) and `` + TS`` for temperature scaling."""
    from orcal import fusion

    method, readout, scaled = parse_row(row)
    if method not in fusion.names():
        return row
    label = fusion.get(method).label
    label = f"{label} ({readout.replace('_', '-')})" if readout else label
    return label + (TS_LABEL if scaled else "")


def sort_rows(rows: Sequence[str]) -> list[str]:
    """Rows in the order strategies were registered (the paper's order for the built-ins, ORC last, then
    strategies added since); a method's readouts in the order given; unknown rows last; the temperature-scaled
    rows after all the others, in the same order."""
    from orcal import fusion

    order = {name: i for i, name in enumerate(fusion.names())}
    return sorted(rows, key=lambda r: (parse_row(r).scaled, order.get(parse_row(r).method, len(order))))


def is_finite(x) -> bool:
    """A number that is neither None, NaN nor infinite."""
    return x is not None and isinstance(x, (int, float)) and math.isfinite(x)


@dataclass
class Table:
    """One metric laid out with rows (methods) and columns (datasets).

    ``cells[(row, col)]`` is ``(centre, spread, low, high)``: the test-set value (averaged over seeds), its
    spread (the standard deviation over seeds, or of the bootstrap with one seed) and the bootstrap interval.
    ``best[col]`` holds the rows whose centre, rounded to the displayed ``digits``, is the best of the column
    (several rows when they tie at the displayed precision). ``n_seeds`` says which spread the cells hold.
    """

    metric: str
    rows: list[str]
    columns: list[str]
    cells: dict[tuple[str, str], tuple[float, ...]]
    higher_is_better: bool
    digits: int = 4
    title: str = ""
    best: dict[str, set[str]] = field(default_factory=dict)
    n_seeds: int = 1
    #: ``{(row, col): bound}``: the binned AUC's error bound (SPEC §9), printed beside the AUC
    bounds: dict[tuple[str, str], float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.best:
            self.best = self._find_best()

    def _find_best(self) -> dict[str, set[str]]:
        """The best rows of each column, the trained rows and the ``+ TS`` rows ranked apart."""
        best: dict[str, set[str]] = {}
        for col in self.columns:
            best[col] = set()
            for is_scaled in (False, True):
                values = {r: round(self.cells[(r, col)][0], self.digits) for r in self.rows
                          if (r, col) in self.cells and is_finite(self.cells[(r, col)][0])
                          and parse_row(r).scaled == is_scaled}
                if values:
                    target = max(values.values()) if self.higher_is_better else min(values.values())
                    best[col] |= {r for r, v in values.items() if v == target}
        return best

    def cell_text(self, row: str, col: str, interval: bool = True) -> str:
        """``value ± spread [low, high]`` at the table's precision, ``n/a`` where the cell is missing or
        undefined."""
        if (row, col) not in self.cells or not is_finite(self.cells[(row, col)][0]):
            return "n/a"
        centre, spread, *bounds = self.cells[(row, col)]
        d = self.digits
        text = f"{centre:.{d}f}"
        if is_finite(spread):
            text += f" ± {spread:.{d}f}"
        if interval and len(bounds) == 2 and all(is_finite(b) for b in bounds):
            text += f" [{bounds[0]:.{d}f}, {bounds[1]:.{d}f}]"
        if is_finite(self.bounds.get((row, col))):
            text += f" (bound {self.bounds[(row, col)]:.{d}f})"
        return text

    def legend(self, interval: bool = True) -> str:
        """What a cell shows."""
        bound = "" if not self.bounds else ("; (bound b): the binned AUC is within b of the exact AUC — b is half "
                                            "the fraction of positive–negative pairs whose scores share one of the "
                                            "AUC's score bins (SPEC §9)")
        if self.n_seeds > 1:
            text = f"mean over {self.n_seeds} seeds of the test-set value ± std over seeds"
            return text + (" [bootstrap 2.5–97.5 % of the seed mean]" if interval else "") + bound
        return "test-set value ± bootstrap std" + (" [bootstrap 2.5–97.5 %]" if interval else "") + bound

    def to_markdown(self) -> str:
        """A Markdown table; the best value of each column is bold."""
        arrow = "↑" if self.higher_is_better else "↓"
        head = f"| Method | {' | '.join(self.columns)} |"
        lines = []
        if self.title:
            lines += [f"**{self.title}** ({metric_label(self.metric)} {arrow}, {self.legend()}; {BEST}", ""]
        lines += [head, "|---|" + "---|" * len(self.columns)]
        for row in self.rows:
            cells = []
            for col in self.columns:
                text = self.cell_text(row, col)
                cells.append(f"**{text}**" if row in self.best.get(col, ()) else text)
            lines.append(f"| {row_label(row)} | {' | '.join(cells)} |")
        return "\n".join(lines) + "\n"

    def to_csv(self) -> str:
        """CSV with ``method``, ``key`` and, per dataset, ``<dataset>_value``, ``_spread``, ``_low``, ``_high``
        and ``_best`` (1 for the best value of the column)."""
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        header = ["method", "key"]
        for col in self.columns:
            header += [f"{col}_{k}" for k in ("value", "spread", "low", "high", "best")]
        writer.writerow(header)
        for row in self.rows:
            line = [row_label(row), row]
            for col in self.columns:
                cell = tuple(self.cells.get((row, col), ())) + (math.nan,) * 4
                line += [_num(x) for x in cell[:4]] + [int(row in self.best.get(col, ()))]
            writer.writerow(line)
        return buf.getvalue()


def _num(x) -> str:
    return "" if not is_finite(x) else repr(float(x))


def _cell(s: Mapping[str, Any], stat: str) -> tuple[float, float, float, float]:
    """``(centre, spread, low, high)`` of one summary: the ``stat`` (``"value"``, else the bootstrap
    ``"mean"``), the std over seeds when there are several, else the bootstrap std."""
    centre = s.get(stat, s.get("mean", math.nan))
    spread = s.get("seed_std") if is_finite(s.get("seed_std")) else s.get("std", math.nan)
    return tuple(float(x) if is_finite(x) else math.nan for x in (centre, spread, s.get("low"), s.get("high")))


def metric_results_table(runs: Runs, metric: str, digits: int = 4, title: str = "",
                         higher_is_better: bool | None = None, stat: str = "value") -> Table:
    """Build the table of ``metric`` from ``runs`` (``{dataset: {row: {metric: summary}}}``, summaries as
    :func:`orcal.metrics.seed_summary` or :func:`orcal.bootstrap` give them).

    ``stat`` picks the centre value: ``"value"``, the test-set value (averaged over seeds; the bootstrap mean
    where a summary has none), or ``"mean"``, the bootstrap mean.
    """
    if not isinstance(runs, Mapping):
        raise TypeError(f"runs must be a mapping {{dataset: {{row: summary}}}}, got {type(runs).__name__}")
    if not isinstance(metric, str) or not metric:
        raise ValueError(f"metric must be a metric name such as 'mr_ece', got {metric!r}")
    if higher_is_better is None:
        higher_is_better = metric_higher_is_better(metric)
    columns = list(runs)
    rows: list[str] = []
    cells: dict[tuple[str, str], tuple[float, ...]] = {}
    n_seeds = 1
    bounds: dict[tuple[str, str], float] = {}
    for col, by_row in runs.items():
        for row, summary in by_row.items():
            if row not in rows:
                rows.append(row)
            if metric in summary:
                cells[(row, col)] = _cell(summary[metric], stat)
                n_seeds = max(n_seeds, len(summary[metric].get("seeds") or ()))
            if metric == "auc" and is_finite((summary.get("auc_error_bound") or {}).get("value")):
                bounds[(row, col)] = float(summary["auc_error_bound"]["value"])
    return Table(metric=metric, rows=sort_rows(rows), columns=columns, cells=cells,
                 higher_is_better=bool(higher_is_better), digits=int(digits), title=title, n_seeds=n_seeds,
                 bounds=bounds)


def dataset_table(runs: Runs, dataset: str, metrics: Sequence[str] = ("mr_ece", "auc", "dice"),
                  digits: int = 4) -> str:
    """One dataset's results as a Markdown table: methods as rows, ``metrics`` as columns (value ± spread as
    in :class:`Table`, without the interval), the best value of each column in bold."""
    if dataset not in runs:
        raise ValueError(f"dataset {dataset!r} is not in the results; have: {', '.join(runs)}")
    tables = [metric_results_table({dataset: runs[dataset]}, m, digits=digits) for m in metrics]
    heads = [f"{metric_label(m)} {'↑' if t.higher_is_better else '↓'}" for m, t in zip(metrics, tables)]
    lines = [f"| Method | {' | '.join(heads)} |", "|---|" + "---|" * len(metrics)]
    for row in sort_rows(list(runs[dataset])):
        cells = []
        for t in tables:
            text = t.cell_text(row, dataset, interval=False)
            cells.append(f"**{text}**" if row in t.best.get(dataset, ()) else text)
        lines.append(f"| {row_label(row)} | {' | '.join(cells)} |")
    lines += ["", f"({tables[0].legend(interval=False)}; {BEST}"]
    return "\n".join(lines) + "\n"


def structure_columns(by_row: Mapping[str, Mapping[str, Any]], metric: str) -> list[str]:
    """``metric``'s per-structure keys in one dataset's rows, then its macro average (SPEC §11); empty
    for a dataset of one structure."""
    keys = {k for summary in by_row.values() for k in summary if k.startswith(f"{metric}/")}
    per = sorted((k for k in keys if not k.endswith("/macro")), key=lambda k: int(k.partition("/")[2]))
    return [*per, f"{metric}/macro"] if per else []


def metrics_csv(runs: Runs) -> str:
    """Every metric of every row and dataset in long form: dataset, method, metric, value (test set, mean over
    seeds), std over seeds, bootstrap mean, std, 2.5 % and 97.5 % percentiles."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    keys = ("value", "seed_std", "mean", "std", "low", "high")
    writer.writerow(["dataset", "method", "key", "metric", *keys])
    for col, by_row in runs.items():
        for row in sort_rows(list(by_row)):
            for metric, s in by_row[row].items():
                writer.writerow([col, row_label(row), row, metric] + [_num(s.get(k, math.nan)) for k in keys])
    return buf.getvalue()


#: The report's tables: (file name, metric, title).
TABLES = (("table1_mr_ece", "mr_ece", "Table 1: calibration"), ("table2_auc", "auc", "Table 2: discrimination"),
          ("table3_dice", "dice", "Dice against the majority label"))


def write_tables(runs: Runs, out_dir: str | Path, digits: int = 4) -> dict[str, Path]:
    """Write Table 1 (MR-ECE), Table 2 (AUC) and a Dice table as Markdown and CSV, plus every metric in
    ``metrics.csv``. Returns the written paths by name."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for name, metric, title in TABLES:
        table = metric_results_table(runs, metric, digits=digits, title=title)
        for ext, text in (("md", table.to_markdown()), ("csv", table.to_csv())):
            path = out / f"{name}.{ext}"
            path.write_text(text, encoding="utf-8")
            paths[f"{name}.{ext}"] = path
    path = out / "metrics.csv"
    path.write_text(metrics_csv(runs), encoding="utf-8")
    paths["metrics.csv"] = path
    return paths


def sweep_table(sweep: Mapping[float, Mapping[str, Summary]], digits: int = 4) -> str:
    """Markdown table of the RPS-weight sweep (first seed): one row per weight and readout, the test-set
    MR-ECE, AUC and Dice ± bootstrap std."""
    lines = ["| RPS weight λ | readout | MR-ECE ↓ | AUC ↑ | Dice ↑ |", "|---|---|---|---|---|"]
    weights = sorted(float(w) for w in sweep)
    for w, key in zip(weights, sweep_keys(sweep, weights)):
        for readout in sorted(sweep[key]):
            s = sweep[key][readout]
            cells = []
            for metric in ("mr_ece", "auc", "dice"):
                centre, spread, _, _ = _cell(s.get(metric, {}), "value")
                cells.append("n/a" if not is_finite(centre) else f"{centre:.{digits}f} ± {spread:.{digits}f}")
            lines.append(f"| {w:g} | {readout} | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


def selection_table(selection: Mapping[str, Mapping[str, Any]], runs: Mapping[str, Summary]) -> str:
    """Markdown table of the settings chosen on the validation split: per row, each candidate's validation
    MR-ECE, the chosen one in bold, and the chosen run's test MR-ECE."""
    lines = ["| Method | setting | validation MR-ECE per candidate | chosen | test MR-ECE |", "|---|---|---|---|---|"]
    for row in sort_rows([r for r in selection if not parse_row(r).scaled]):
        c = selection[row]
        if not c.get("candidates"):
            continue
        names = {"rps_weight": "λ", "sigma": "σ"}
        chosen = f"{c['value']:g}"
        cand = ", ".join(f"**{k}: {v:.4f}**" if k == chosen else f"{k}: {v:.4f}"
                         for k, v in c["candidates"].items() if is_finite(v))
        test = runs.get(row, {}).get("mr_ece", {}).get("value")
        lines.append(f"| {row_label(row)} | {names.get(c['parameter'], c['parameter'])} | {cand} | "
                     f"{c['value']:g} | {'n/a' if not is_finite(test) else f'{test:.4f}'} |")
    return "\n".join(lines) + "\n" if len(lines) > 2 else ""


def comparison_table(comparison: Mapping[str, Any], metrics: Sequence[str] = ("mr_ece", "auc"), digits: int = 4
                     ) -> str:
    """Markdown table of every row against the reference row: the test-set difference (mean over seeds), each
    seed's difference and the paired bootstrap interval, per metric; ``*`` marks a difference larger than the
    noise (:func:`orcal.metrics.exceeds_noise`)."""
    ref, paired = comparison.get("reference"), comparison.get("paired", {})
    if not ref or not paired:
        return ""
    heads = [f"Δ {metric_label(m)} (row − ref) [95 % paired]" for m in metrics]
    lines = [f"Reference: {row_label(ref)}.", "", f"| Method | {' | '.join(heads)} |", "|---|" + "---|" * len(metrics)]
    for row in sort_rows(list(paired)):
        cells = []
        for m in metrics:
            d = paired[row].get(m)
            if not d or not is_finite(d.get("diff")):
                cells.append("n/a")
                continue
            seeds = d.get("seed_diffs") or []
            per_seed = f" (seeds: {', '.join(f'{x:+.{digits}f}' for x in seeds)})" if len(seeds) > 1 else ""
            star = " *" if exceeds_noise(d) else ""
            cells.append(f"{d['diff']:+.{digits}f} [{d['low']:+.{digits}f}, {d['high']:+.{digits}f}]{per_seed}{star}")
        lines.append(f"| {row_label(row)} | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


def volume_table(by_row: Mapping[str, Mapping[str, float]], digits: int = 3) -> str:
    """Volume CRPS, coverage of the 90 % interval, error of the mean and predicted sd per row (pooled over
    structures; each structure's CRPS too, where there are several)."""
    structures = sorted({k.partition("/")[2] for v in by_row.values() for k in v
                         if k.startswith("volume_crps/") and not k.endswith("/macro")}, key=int)
    heads = ["CRPS ↓", "90 % coverage", "mean error ↓", "predicted sd"] + [f"CRPS {c} ↓" for c in structures]
    keys = ["volume_crps", "volume_coverage", "volume_error", "volume_sd"] + [f"volume_crps/{c}" for c in structures]
    lines = [f"| Method | {' | '.join(heads)} |", "|---|" + "---|" * len(heads)]
    for row in sort_rows(list(by_row)):
        cells = [f"{float(v):.{digits}f}" if is_finite(v := by_row[row].get(k)) else "n/a" for k in keys]
        lines.append(f"| {row_label(row)} | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


def sweep_keys(sweep: Mapping, weights: Sequence[float]) -> list:
    """The sweep's own keys in the order of ``weights`` (keys may be floats or their strings)."""
    by_value = {float(k): k for k in sweep}
    return [by_value[w] for w in weights]


def _conformal_cell(s: Mapping[str, Any] | None, digits: int) -> str:
    if not s or not is_finite(s.get("value")):
        return "n/a"
    centre, spread, low, high = _cell(s, "value")
    text = f"{centre:.{digits}f}" + (f" ± {spread:.{digits}f}" if is_finite(spread) else "")
    return text + (f" [{low:.{digits}f}, {high:.{digits}f}]" if is_finite(low) and is_finite(high) else "")


def conformal_table(entry: Mapping[str, Any], digits: int = 4) -> str:
    """Markdown table of one dataset's conformal columns (SPEC §12; ``results["conformal"][dataset]``): a row
    per method, a column per header of :data:`orcal.metrics.conformal_evaluation.KINDS` (stages such as before →
    after in one cell). Of the rows that do not miss a kind's guarantee, the smallest cost is bold; † marks a
    row that misses it beyond the test and calibration noise (:func:`orcal.experiment.conformal.misses`)."""
    from orcal.experiment.conformal import KINDS, misses

    alpha, rows = float(entry["alpha"]), entry.get("rows", {})
    n_cal = entry.get("n_calibration_units", entry.get("n_calibration"))
    lead = entry.get("leads", {})
    unit = "mL" if entry.get("spacing_known") else "thousands of voxels"
    groups: list[tuple[Any, list]] = []  # (kind, columns sharing one header)
    for kind in KINDS:
        for column in kind.columns:
            if groups and groups[-1][0] is kind and groups[-1][1][0].header == column.header:
                groups[-1][1].append(column)
            else:
                groups.append((kind, [column]))
    heads = []
    for _, cols in groups:
        c = cols[0]
        mark = {"lower": " ↓", "higher": " ↑"}.get(c.better or "", "")
        if c.bound is not None:
            mark = f" ({'≤' if c.bound[0] == '<=' else '≥'} {c.bound[1](alpha):g})"
        stages = f", {' → '.join(x.stage for x in cols)}" if cols[0].stage else ""
        heads.append(f"{c.header}{f' ({unit})' if c.unit == 'volume' else ''}{mark}{stages}")
    lines = [f"| Method | {' | '.join(heads)} |", "|---|" + "---|" * len(heads)]
    for row in sort_rows(list(rows)):
        cells = []
        for kind, cols in groups:
            texts = []
            for c in cols:
                s = rows[row].get(c.key)
                text = _conformal_cell(s, digits)
                best = lead.get(kind.name + ("+ts" if parse_row(row).scaled else ""), {}).get("best")
                if c.key == kind.cost and row == best and text != "n/a":
                    text = f"**{text}**"
                if c.key == kind.certified and s and is_finite(s.get("value")) and misses(c, s, alpha, n_cal):
                    text += " †"
                texts.append(text)
            cells.append(" → ".join(texts))
        lines.append(f"| {row_label(row)} | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


def conformal_csv(conformal: Mapping[str, Mapping[str, Any]]) -> str:
    """Every conformal column of every dataset and row in long form: dataset, method, key, column, alpha,
    value (test set, mean over seeds), std over seeds, bootstrap mean, std, 2.5 % and 97.5 % percentiles."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    keys = ("value", "seed_std", "mean", "std", "low", "high")
    writer.writerow(["dataset", "method", "key", "column", "alpha", *keys])
    for col, entry in conformal.items():
        for row in sort_rows(list(entry.get("rows", {}))):
            for column, s in entry["rows"][row].items():
                writer.writerow([col, row_label(row), row, column, _num(entry["alpha"])]
                                + [_num(s.get(k, math.nan)) for k in keys])
    return buf.getvalue()
