"""Tables, figures and the Markdown report of a multi-rater experiment.

The experiment driver (:mod:`orcal.experiment`) produces, per dataset and per table row, the bootstrap
summary of every metric (``{metric: {"mean", "std", "low", "high", "value"}}``). This module lays those
out as the paper's tables (methods as rows, datasets as columns, ``mean ± std``, the best value marked),
writes them as Markdown and CSV, and draws the figures that do not need the raw statistics.

Rows are keyed ``"<method>"`` for the baselines and ``"ordinal/<readout>"`` for the ordinal method, whose
two readouts (SPEC §2) are reported as two rows.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from orcal.metric_table import higher_is_better as metric_higher_is_better
from orcal.metric_table import label as metric_label
from orcal.plots import plot_qualitative, plot_sweep, sweep_keys  # noqa: F401  (figures live in plots)

Summary = Mapping[str, Mapping[str, float]]       # {metric: {"mean", "std", ...}}
Runs = Mapping[str, Mapping[str, Summary]]        # {dataset: {row: Summary}}


def row_label(row: str) -> str:
    """Display label of a table row key: the strategy's label (:mod:`orcal.fusion`), with the readout of an
    ordinal head (``"ordinal/expected"`` -> ``"ORC (expected)"``)."""
    from orcal import fusion

    method, _, readout = row.partition("/")
    if method not in fusion.names():
        return row
    label = fusion.get(method).label
    return f"{label} ({readout})" if readout else label


def sort_rows(rows: Sequence[str]) -> list[str]:
    """Rows in the order strategies were registered (the paper's order for the built-ins, ORC last, then
    strategies added since); a method's readouts in the order given; unknown rows last."""
    from orcal import fusion

    order = {name: i for i, name in enumerate(fusion.names())}
    return sorted(rows, key=lambda r: order.get(r.partition("/")[0], len(order)))


def _finite(x) -> bool:
    return x is not None and isinstance(x, (int, float)) and math.isfinite(x)


@dataclass
class Table:
    """One metric laid out with rows (methods) and columns (datasets), ``mean ± std`` per cell.

    ``best[col]`` holds the rows whose mean, rounded to the displayed ``digits``, is the best of the column
    (several rows when they tie at the displayed precision).
    """

    metric: str
    rows: list[str]
    columns: list[str]
    cells: dict[tuple[str, str], tuple[float, float]]
    higher_is_better: bool
    digits: int = 4
    title: str = ""
    best: dict[str, set[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.best:
            self.best = self._find_best()

    def _find_best(self) -> dict[str, set[str]]:
        best: dict[str, set[str]] = {}
        for col in self.columns:
            values = {r: round(self.cells[(r, col)][0], self.digits) for r in self.rows
                      if (r, col) in self.cells and _finite(self.cells[(r, col)][0])}
            if not values:
                best[col] = set()
                continue
            target = max(values.values()) if self.higher_is_better else min(values.values())
            best[col] = {r for r, v in values.items() if v == target}
        return best

    def cell_text(self, row: str, col: str) -> str:
        """``mean ± std`` at the table's precision, ``n/a`` where the cell is missing or undefined."""
        if (row, col) not in self.cells or not _finite(self.cells[(row, col)][0]):
            return "n/a"
        mean, std = self.cells[(row, col)]
        text = f"{mean:.{self.digits}f}"
        if _finite(std):
            text += f" ± {std:.{self.digits}f}"
        return text

    def to_markdown(self) -> str:
        """A Markdown table; the best value of each column is bold."""
        arrow = "↑" if self.higher_is_better else "↓"
        head = f"| Method | {' | '.join(self.columns)} |"
        lines = []
        if self.title:
            lines += [f"**{self.title}** ({metric_label(self.metric)} {arrow}, "
                      "bootstrap mean ± std; best in bold)", ""]
        lines += [head, "|---|" + "---|" * len(self.columns)]
        for row in self.rows:
            cells = []
            for col in self.columns:
                text = self.cell_text(row, col)
                cells.append(f"**{text}**" if row in self.best.get(col, ()) else text)
            lines.append(f"| {row_label(row)} | {' | '.join(cells)} |")
        return "\n".join(lines) + "\n"

    def to_csv(self) -> str:
        """CSV with ``method`` and, per dataset, ``<dataset>_mean``, ``<dataset>_std``, ``<dataset>_best``
        (1 for the best value of the column)."""
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        header = ["method", "key"]
        for col in self.columns:
            header += [f"{col}_mean", f"{col}_std", f"{col}_best"]
        writer.writerow(header)
        for row in self.rows:
            line = [row_label(row), row]
            for col in self.columns:
                mean, std = self.cells.get((row, col), (math.nan, math.nan))
                line += [_num(mean), _num(std), int(row in self.best.get(col, ()))]
            writer.writerow(line)
        return buf.getvalue()


def _num(x) -> str:
    return "" if not _finite(x) else repr(float(x))


def metric_table(runs: Runs, metric: str, digits: int = 4, title: str = "",
                 higher_is_better: bool | None = None, stat: str = "mean") -> Table:
    """Build the table of ``metric`` from ``runs`` (``{dataset: {row: {metric: {"mean", "std"}}}}``).

    ``stat`` picks the centre value (``"mean"`` of the bootstrap, or ``"value"`` on the full test set).
    """
    if not isinstance(runs, Mapping):
        raise TypeError(f"runs must be a mapping {{dataset: {{row: summary}}}}, got {type(runs).__name__}")
    if not isinstance(metric, str) or not metric:
        raise ValueError(f"metric must be a metric name such as 'mr_ece', got {metric!r}")
    if higher_is_better is None:
        higher_is_better = metric_higher_is_better(metric)
    columns = list(runs)
    rows: list[str] = []
    cells: dict[tuple[str, str], tuple[float, float]] = {}
    for col, by_row in runs.items():
        for row, summary in by_row.items():
            if row not in rows:
                rows.append(row)
            if metric in summary:
                s = summary[metric]
                cells[(row, col)] = (float(s.get(stat, math.nan)), float(s.get("std", math.nan)))
    return Table(metric=metric, rows=sort_rows(rows), columns=columns, cells=cells,
                 higher_is_better=bool(higher_is_better), digits=int(digits), title=title)


def dataset_table(runs: Runs, dataset: str, metrics: Sequence[str] = ("mr_ece", "auc", "dice"),
                  digits: int = 4) -> str:
    """One dataset's results as a Markdown table: methods as rows, ``metrics`` as columns (mean ± std),
    the best value of each column in bold."""
    if dataset not in runs:
        raise ValueError(f"dataset {dataset!r} is not in the results; have: {', '.join(runs)}")
    tables = [metric_table({dataset: runs[dataset]}, m, digits=digits) for m in metrics]
    heads = [f"{metric_label(m)} {'↑' if t.higher_is_better else '↓'}" for m, t in zip(metrics, tables)]
    lines = [f"| Method | {' | '.join(heads)} |", "|---|" + "---|" * len(metrics)]
    for row in sort_rows(list(runs[dataset])):
        cells = []
        for t in tables:
            text = t.cell_text(row, dataset)
            cells.append(f"**{text}**" if row in t.best.get(dataset, ()) else text)
        lines.append(f"| {row_label(row)} | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


def metrics_csv(runs: Runs) -> str:
    """Every metric of every row and dataset in long form: dataset, method, metric, value (full test set),
    bootstrap mean, std, 2.5 % and 97.5 % percentiles."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["dataset", "method", "key", "metric", "value", "mean", "std", "low", "high"])
    for col, by_row in runs.items():
        for row in sort_rows(list(by_row)):
            for metric, s in by_row[row].items():
                writer.writerow([col, row_label(row), row, metric] +
                                [_num(s.get(k, math.nan)) for k in ("value", "mean", "std", "low", "high")])
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
        table = metric_table(runs, metric, digits=digits, title=title)
        for ext, text in (("md", table.to_markdown()), ("csv", table.to_csv())):
            path = out / f"{name}.{ext}"
            path.write_text(text, encoding="utf-8")
            paths[f"{name}.{ext}"] = path
    path = out / "metrics.csv"
    path.write_text(metrics_csv(runs), encoding="utf-8")
    paths["metrics.csv"] = path
    return paths


# --- figures ---------------------------------------------------------------------------------------------


def sweep_table(sweep: Mapping[float, Mapping[str, Summary]], digits: int = 4) -> str:
    """Markdown table of the RPS-weight sweep: one row per weight and readout, MR-ECE and AUC."""
    lines = ["| RPS weight λ | readout | MR-ECE ↓ | AUC ↑ | Dice ↑ |", "|---|---|---|---|---|"]
    weights = sorted(float(w) for w in sweep)
    for w, key in zip(weights, sweep_keys(sweep, weights)):
        for readout in sorted(sweep[key]):
            s = sweep[key][readout]
            cells = []
            for metric in ("mr_ece", "auc", "dice"):
                m = s.get(metric, {})
                cells.append("n/a" if not _finite(m.get("mean")) else
                             f"{m['mean']:.{digits}f} ± {m.get('std', math.nan):.{digits}f}")
            lines.append(f"| {w:g} | {readout} | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


# --- the report ------------------------------------------------------------------------------------------

def render_report(results: Mapping, tables: Mapping[str, Table], figures: Mapping[str, str],
                  sweeps: Mapping[str, str] | None = None) -> str:
    """The Markdown report: settings, the two tables, Dice, figures, the sweep, timings and hardware.

    ``results`` is the experiment's ``results.json`` content, ``figures`` maps a caption to a path
    relative to the report, ``sweeps`` maps a dataset to its sweep table in Markdown.
    """
    s = results.get("settings", {})
    lines = ["# orcal experiment report", ""]
    lines += ["Multi-annotation strategies against Ordinal Rater Consensus (ORC), evaluated on the held-out "
              "test split with per-image multi-rater statistics and the bootstrap "
              f"({s.get('n_boot', '?')} resamples of {100 * float(s.get('fraction', 0.6)):.0f} % of the test "
              f"images with replacement, seed {s.get('seed', '?')}). MR-ECE uses {s.get('n_bins', 15)} "
              "equal-width bins over voxel–rater pairs; AUC counts every voxel's k positive and R − k negative "
              "pairs. ORC is reported with both readouts: *majority* (the paper's, the probability that a "
              "majority of raters vote foreground) and *expected* (the expected fraction of raters voting "
              "foreground, the quantity MR-ECE scores against).", ""]
    lines += ["## Datasets", "", "| dataset | raters | train | val | test | image size |", "|---|---|---|---|---|---|"]
    for key, d in results.get("datasets", {}).items():
        lines.append(f"| {key} | {d.get('num_raters', '?')} | {d.get('n_train', '?')} | {d.get('n_val', '?')} | "
                     f"{d.get('n_test', '?')} | {d.get('image_shape', '?')} |")
    lines.append("")
    for name in ("table1_mr_ece", "table2_auc", "table3_dice"):
        if name in tables:
            lines += [tables[name].to_markdown(), ""]
    if figures:
        lines += ["## Figures", ""]
        for caption, rel in figures.items():
            lines += [f"**{caption}**", "", f"![{caption}]({rel})", ""]
    if sweeps:
        lines += ["## RPS weight sweep (ordinal method)", ""]
        for key, text in sweeps.items():
            lines += [f"**{key}**", "", text, ""]
    lines += ["## Settings", "", "| setting | value |", "|---|---|"]
    for k, v in s.items():
        lines.append(f"| {k} | `{v}` |")
    lines.append("")
    timing = results.get("timings", {})
    if timing:
        lines += ["## Timings (seconds)", "", "| dataset | method | train | evaluate | epochs | steps |",
                  "|---|---|---|---|---|---|"]
        for ds, by in timing.items():
            for run, t in by.items():
                lines.append(f"| {ds} | {run} | {t.get('train_s', 0):.1f} | {t.get('eval_s', 0):.1f} | "
                             f"{t.get('epochs', '')} | {t.get('steps', '')} |")
        lines.append("")
        compute = results.get("compute_seconds")
        total = results.get("total_seconds")
        if _finite(compute):
            text = f"Training and evaluation, all runs: {compute / 60:.1f} min"
            if _finite(total):
                text += f" (the last invocation, which reuses finished runs, took {total / 60:.1f} min)"
            lines += [text + ".", ""]
    hw = results.get("hardware", {})
    if hw:
        lines += ["## Hardware and software", "", "| | |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in hw.items()]
        lines.append("")
    command = results.get("command")
    if command:
        lines += ["## Reproduce", "", "```bash", command, "```", ""]
    return "\n".join(lines)


# --- the experiment's outputs ---------------------------------------------------------------------------

def write_outputs(results: dict[str, Any], out: Path, datasets: Sequence[tuple[str, Path]],
                  records: Mapping[str, Mapping[str, dict]], cases: Mapping[str, dict], main_runs: Sequence) -> None:
    """An experiment's tables (md, csv), figures, ``report.md`` and ``results.json`` under ``out``.

    ``datasets`` holds (key, folder of its run files); ``main_runs`` the :class:`orcal.experiment.Run` s of the
    tables, ``records`` their records per dataset, ``cases`` the qualitative case per dataset.
    """
    from orcal import plots
    from orcal.experiment_runs import jsonable, load_case_maps, load_run_stats, slug

    paths = write_tables(results["runs"], out)
    tables = {name: metric_table(results["runs"], metric, title=title) for name, metric, title in TABLES}
    figures: dict[str, str] = {}
    fig_dir = out / "figures"
    fig_dir.mkdir(exist_ok=True)
    for key, run_dir in datasets:
        name = slug(key)
        stats_by_row: dict[str, Any] = {}
        agreement_by_row: dict[str, Any] = {}
        maps: dict[str, np.ndarray] = {}
        for run in main_runs:
            stats = load_run_stats(run_dir, run)
            case_maps = load_case_maps(run_dir, run)
            for readout, st in stats.items():
                label = row_label(run.row(readout))
                stats_by_row[label] = st
                agreement = records[key][run.key]["readouts"][readout].get("agreement")
                if agreement:
                    agreement_by_row[label] = {k: np.asarray(v) for k, v in agreement.items()}
                if readout in case_maps:
                    maps[label] = case_maps[readout]
        figures.update(_plot_dataset(key, name, fig_dir, stats_by_row, agreement_by_row, maps, cases[key]))
    for key in results["runs"]:
        text = dataset_table(results["runs"], key, ("mr_ece", "auc", "dice", "brier"))
        (out / f"summary_{slug(key)}.md").write_text(text, encoding="utf-8")
    sweeps_md: dict[str, str] = {}
    for key, sweep in results.get("sweeps", {}).items():
        text = sweep_table(sweep)
        sweeps_md[key] = text
        (out / f"sweep_{slug(key)}.md").write_text(text, encoding="utf-8")
        path = plots.plot_sweep(sweep, fig_dir / f"sweep_{slug(key)}.png", title=key)
        figures[f"{key}: MR-ECE and AUC against the RPS weight"] = str(path.relative_to(out))
    results["files"] = sorted(str(p.relative_to(out)) for p in paths.values())
    results["figures"] = figures
    (out / "results.json").write_text(json.dumps(jsonable(results), indent=1), encoding="utf-8")
    (out / "report.md").write_text(render_report(results, tables, figures, sweeps_md), encoding="utf-8")


def _plot_dataset(key: str, name: str, fig_dir: Path, stats_by_row: dict, agreement_by_row: dict,
                  maps: dict, case: dict) -> dict[str, str]:
    """Reliability diagram, confidence-vs-agreement plot and qualitative figure of one dataset."""
    figures: dict[str, str] = {}
    rel = fig_dir.parent
    from orcal import plots

    if stats_by_row:
        path = fig_dir / f"reliability_{name}.png"
        plots.reliability_diagram(stats_by_row, path, title=f"{key}: reliability (voxel–rater pairs)")
        figures[f"{key}: reliability diagram"] = str(path.relative_to(rel))
    if agreement_by_row:
        path = fig_dir / f"agreement_{name}.png"
        plots.confidence_vs_agreement(agreement_by_row, path, title=f"{key}: mean confidence per rater agreement")
        figures[f"{key}: confidence against rater agreement"] = str(path.relative_to(rel))
    if maps:
        path = fig_dir / f"qualitative_{name}.png"
        where = case["id"] + ("" if case["slice"] is None else f", slice {case['slice']}")
        plots.plot_qualitative(case["image"], case["votes"], case["num_raters"], maps, path,
                                title=f"{key}: test case {where}")
        figures[f"{key}: one test case, rater agreement and each method's probability"] = str(path.relative_to(rel))
    return figures


def __getattr__(name: str):
    # The lists these names held now live in the registries (orcal.fusion, orcal.metric_table).
    from orcal import fusion, metric_table

    if name == "ROW_ORDER":
        return tuple(r for m in fusion.names() for r in (
            [f"{m}/majority", f"{m}/expected"] if fusion.get(m).head == "ordinal" else [m]))
    if name == "ROW_LABELS":
        return {r: row_label(r) for r in __getattr__("ROW_ORDER")}
    if name == "METRIC_LABELS":
        return {key: m.label for key, m in metric_table.METRICS.items()}
    if name == "HIGHER_IS_BETTER":
        return frozenset(key for key, m in metric_table.METRICS.items() if m.higher_is_better)
    raise AttributeError(f"module 'orcal.report' has no attribute {name!r}")
