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
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

#: Row order of the tables: the paper's order, the ordinal method last.
ROW_ORDER = ("random", "median", "soft", "soft_gaussian", "simple", "staple", "svls",
             "ordinal/majority", "ordinal/expected")

#: Human-readable row labels (the paper's names for the baselines).
ROW_LABELS = {
    "random": "Random Sampling",
    "median": "Median Consensus",
    "soft": "Soft Consensus",
    "soft_gaussian": "Soft Consensus-G",
    "simple": "SIMPLE",
    "staple": "STAPLE",
    "svls": "SVLS",
    "ordinal/majority": "ORC (majority)",
    "ordinal/expected": "ORC (expected)",
}

#: Metrics where a larger value is better; every other metric is better when smaller.
HIGHER_IS_BETTER = frozenset({"auc", "dice"})

#: Display names of the metrics.
METRIC_LABELS = {
    "mr_ece": "MR-ECE", "mr_ece_l2": "MR-ECE (l2)", "mr_mce": "MR-MCE", "auc": "AUC", "brier": "Brier",
    "nll": "NLL", "dice": "Dice",
}

Summary = Mapping[str, Mapping[str, float]]       # {metric: {"mean", "std", ...}}
Runs = Mapping[str, Mapping[str, Summary]]        # {dataset: {row: Summary}}


def row_label(row: str) -> str:
    """Display label of a table row key (``"ordinal/expected"`` -> ``"ORC (expected)"``)."""
    if row in ROW_LABELS:
        return ROW_LABELS[row]
    if row.startswith("ordinal/"):
        return f"ORC ({row.split('/', 1)[1]})"
    return row


def sort_rows(rows: Sequence[str]) -> list[str]:
    """Rows in the paper's order; unknown rows keep their given order after the known ones."""
    known = [r for r in ROW_ORDER if r in rows]
    return known + [r for r in rows if r not in ROW_ORDER]


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
            lines += [f"**{self.title}** ({METRIC_LABELS.get(self.metric, self.metric)} {arrow}, "
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
        higher_is_better = metric in HIGHER_IS_BETTER
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
    heads = [f"{METRIC_LABELS.get(m, m)} {'↑' if t.higher_is_better else '↓'}" for m, t in zip(metrics, tables)]
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


def write_tables(runs: Runs, out_dir: str | Path, digits: int = 4) -> dict[str, Path]:
    """Write Table 1 (MR-ECE), Table 2 (AUC) and a Dice table as Markdown and CSV, plus every metric in
    ``metrics.csv``. Returns the written paths by name."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for name, metric, title in (("table1_mr_ece", "mr_ece", "Table 1: calibration"),
                                ("table2_auc", "auc", "Table 2: discrimination"),
                                ("table3_dice", "dice", "Dice against the majority label")):
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

def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def plot_qualitative(image: np.ndarray, votes: np.ndarray, num_raters: int, maps: Mapping[str, np.ndarray],
                     path: str | Path, title: str = "") -> Path:
    """One test case side by side: the image, the rater agreement ``k / R`` and each method's probability.

    ``image`` is ``(C, H, W)`` or ``(H, W)`` (first channel shown, or RGB when C = 3), ``votes`` the vote
    count ``k`` ``(H, W)``, ``maps`` ``{label: p (H, W)}``.
    """
    plt = _pyplot()
    image = np.asarray(image, dtype=np.float32)
    if image.ndim == 3:
        image = np.moveaxis(image[:3], 0, -1) if image.shape[0] == 3 else image[0]
    if image.ndim != 2 and not (image.ndim == 3 and image.shape[-1] == 3):
        raise ValueError(f"image must be 2D (or 3 channels), got shape {image.shape}")
    panels = [("image", image, "gray"), (f"agreement k/R (R={num_raters})",
                                         np.asarray(votes, np.float32) / max(int(num_raters), 1), "viridis")]
    panels += [(label, np.asarray(p, np.float32), "viridis") for label, p in maps.items()]
    cols = min(len(panels), 6)
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.4 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    im = None
    for ax, (label, arr, cmap) in zip(axes.ravel(), panels):
        if cmap == "gray":
            lo, hi = float(np.min(arr)), float(np.max(arr))
            ax.imshow(arr if arr.ndim == 2 else np.clip((arr - lo) / max(hi - lo, 1e-8), 0, 1), cmap=cmap)
        else:
            im = ax.imshow(arr, cmap=cmap, vmin=0.0, vmax=1.0)
        ax.set_title(label, fontsize=8)
    if im is not None:
        fig.colorbar(im, ax=axes.ravel().tolist(), fraction=0.02, pad=0.01)
    if title:
        fig.suptitle(title, fontsize=9)
    path = Path(path)
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_sweep(sweep: Mapping[float, Mapping[str, Summary]], path: str | Path, title: str = "") -> Path:
    """MR-ECE and AUC (bootstrap mean ± std) against the RPS weight, one line per readout.

    ``sweep`` is ``{rps_weight: {readout: {metric: summary}}}``.
    """
    plt = _pyplot()
    weights = sorted(float(w) for w in sweep)
    readouts = sorted({r for by in sweep.values() for r in by})
    fig, axes = plt.subplots(1, 2, figsize=(8, 3))
    for ax, metric in zip(axes, ("mr_ece", "auc")):
        for readout in readouts:
            mean = [sweep[w].get(readout, {}).get(metric, {}).get("mean", math.nan) for w in _keys(sweep, weights)]
            std = [sweep[w].get(readout, {}).get(metric, {}).get("std", math.nan) for w in _keys(sweep, weights)]
            ax.errorbar(weights, mean, yerr=std, marker="o", capsize=3, label=f"ORC ({readout})")
        ax.set_xlabel("RPS weight λ")
        ax.set_ylabel(METRIC_LABELS[metric])
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return path


def _keys(sweep: Mapping, weights: Sequence[float]) -> list:
    """The sweep's own keys in the order of ``weights`` (keys may be floats or their strings)."""
    by_value = {float(k): k for k in sweep}
    return [by_value[w] for w in weights]


def sweep_table(sweep: Mapping[float, Mapping[str, Summary]], digits: int = 4) -> str:
    """Markdown table of the RPS-weight sweep: one row per weight and readout, MR-ECE and AUC."""
    lines = ["| RPS weight λ | readout | MR-ECE ↓ | AUC ↑ | Dice ↑ |", "|---|---|---|---|---|"]
    weights = sorted(float(w) for w in sweep)
    for w, key in zip(weights, _keys(sweep, weights)):
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
