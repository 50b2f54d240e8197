"""Reliability diagrams and confidence-vs-agreement plots (matplotlib, Agg backend, written to files).

Every function takes ``{method name: data}`` so that several methods are overlaid, writes the figure to
``path`` (the format follows the extension: ``.png``, ``.pdf``, ``.svg``) and returns that path.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from orcal.metrics.pooled import bin_table
from orcal.ops.stats import CalibrationStats

__all__ = ["confidence_vs_agreement", "draw_reliability", "reliability_diagram", "reliability_per_structure"]


def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: never needs a display
    import matplotlib.pyplot as plt

    return plt


def _as_bin_table(name: str, data: Any) -> dict[str, np.ndarray]:
    """A bin table (``orcal.metrics.bin_table``) from statistics, a table, or a ``compute()`` result."""
    if isinstance(data, CalibrationStats):
        return bin_table(data)
    if isinstance(data, Mapping) and "bins" in data:
        data = data["bins"]
    if isinstance(data, Mapping) and {"count", "confidence", "accuracy"} <= set(data):
        table = {key: np.asarray(value) for key, value in data.items()}
        if "lower" not in table:
            edges = np.linspace(0, 1, len(table["count"]) + 1)
            table["lower"], table["upper"] = edges[:-1], edges[1:]
        return table
    raise TypeError(f"method {name!r}: expected CalibrationStats, a bin table (count, confidence, accuracy) "
                    f"or a MultiRaterCalibration.compute() result; got {type(data).__name__}")


def _ece(table: dict[str, np.ndarray]) -> float:
    count = table["count"].astype(np.float64)
    total = count.sum()
    if total == 0:
        return float("nan")
    gap = np.abs(np.nan_to_num(table["confidence"]) - np.nan_to_num(table["accuracy"]))
    return float((count * gap).sum() / total)


def _check_methods(methods: Mapping[str, Any], what: str) -> None:
    if not isinstance(methods, Mapping) or not methods:
        raise ValueError(f"{what} needs a non-empty dict {{method name: data}}, got {methods!r}")


def _save(fig, path: str | os.PathLike) -> str:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return str(path)


def reliability_diagram(methods: Mapping[str, Any], path: str | os.PathLike, title: str | None = None) -> str:
    """Reliability diagram of the voxel–rater pairs, one curve per method, with the pair counts below.

    Top panel: observed fraction of positive pairs against mean predicted probability in each non-empty bin,
    with the diagonal of perfect calibration; the legend gives each method's MR-ECE. Bottom panel: pairs per
    bin (log scale), one step line per method in its curve's colour.

    Args:
        methods: ``{name: CalibrationStats | bin table | MultiRaterCalibration.compute() result}``.
        path: output file.
        title: figure title.

    Returns:
        ``path`` as a string.
    """
    _check_methods(methods, "reliability_diagram")
    tables = {name: _as_bin_table(name, data) for name, data in methods.items()}  # errors before a figure opens
    plt = pyplot()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(5.6, 6.4), sharex=True,
                                      gridspec_kw={"height_ratios": [3, 1.2], "hspace": 0.06})
    draw_reliability(tables, top, bottom, title=title)
    return _save(fig, path)


def reliability_per_structure(methods: Mapping[str, Any], path: str | os.PathLike, title: str | None = None) -> str:
    """One reliability panel per structure (SPEC §11), side by side: ``methods`` maps a name to
    :class:`~orcal.ops.stats.CalibrationStats` of several structures (the same number for every method)."""
    _check_methods(methods, "reliability_per_structure")
    counts = {getattr(st, "num_structures", 1) for st in methods.values()}
    if len(counts) != 1 or next(iter(counts)) < 2:
        raise ValueError(f"reliability_per_structure needs statistics of several structures, the same number for "
                         f"every method; got {sorted(counts)}")
    C = counts.pop()
    plt = pyplot()
    fig, axes = plt.subplots(2, C, figsize=(4.2 * C, 5.6), sharex=True, squeeze=False,
                             gridspec_kw={"height_ratios": [3, 1.2], "hspace": 0.06})
    for c in range(C):
        draw_reliability({name: st.structure(c) for name, st in methods.items()}, axes[0, c], axes[1, c],
                         title=f"structure {c + 1}")
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def draw_reliability(methods: Mapping[str, Any], ax, counts_ax=None, title: str | None = None) -> None:
    """Draw the reliability curves of ``methods`` on the matplotlib axes ``ax`` and, when given, the pairs per
    bin on ``counts_ax`` (the panels of :func:`reliability_diagram`, for figures of the caller's own)."""
    _check_methods(methods, "reliability_diagram")
    tables = {name: _as_bin_table(name, data) for name, data in methods.items()}
    from matplotlib import colormaps

    ax.plot([0, 1], [0, 1], color="0.55", linestyle="--", linewidth=1, label="perfect calibration")
    colors = colormaps["tab10"].colors
    for i, (name, table) in enumerate(tables.items()):
        color = colors[i % len(colors)]
        nonempty = table["count"] > 0
        ax.plot(table["confidence"][nonempty], table["accuracy"][nonempty], marker="o", markersize=4,
                linewidth=1.6, color=color, label=f"{name}  (MR-ECE {_ece(table):.4f})")
        if counts_ax is not None:  # one step line per method: side-by-side bars of many methods cannot be read
            edges = np.append(table["lower"], table["upper"][-1])
            counts = table["count"].astype(np.float64)
            # an empty bin is a gap (log scale): one line per run of non-empty bins, no drop to the baseline
            change = np.flatnonzero(np.diff(np.concatenate([[0], nonempty.astype(np.int8), [0]])))
            for start, stop in zip(change[::2], change[1::2]):
                counts_ax.stairs(counts[start:stop], edges[start:stop + 1], baseline=None, color=color,
                                 linewidth=1.4, alpha=0.9)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("observed fraction of positive pairs")
    ax.grid(True, color="0.92")
    ax.legend(loc="upper left", fontsize=8, frameon=False)
    if title:
        ax.set_title(title)
    if counts_ax is None:
        ax.set_xlabel("predicted probability")
        return
    counts_ax.set_yscale("log")
    counts = np.concatenate([t["count"][t["count"] > 0] for t in tables.values()])
    if counts.size:  # whole decades, so that bar heights are not read against a truncated axis
        counts_ax.set_ylim(10 ** np.floor(np.log10(counts.min())), 10 ** np.ceil(np.log10(counts.max() * 1.05)))
    counts_ax.set_xlabel("predicted probability")
    counts_ax.set_ylabel("pairs per bin")
    counts_ax.set_axisbelow(True)
    counts_ax.grid(True, axis="y", which="major", color="0.92")


def _as_agreement(name: str, data: Any) -> dict[str, np.ndarray]:
    if isinstance(data, Mapping) and "agreement" in data and isinstance(data["agreement"], Mapping):
        data = data["agreement"]
    if isinstance(data, Mapping) and {"agreement", "confidence"} <= set(data):
        return {key: np.asarray(value) for key, value in data.items()}
    raise TypeError(f"method {name!r}: expected a table with 'agreement' and 'confidence' (as "
                    f"MultiRaterCalibration.compute()['agreement']), got {type(data).__name__}")


def confidence_vs_agreement(methods: Mapping[str, Any], path: str | os.PathLike, title: str | None = None) -> str:
    """Mean predicted probability at each rater agreement level ``k / R``, against the ideal diagonal.

    A model that predicts the fraction of raters voting foreground lies on the diagonal; marker areas grow
    with the number of voxels at that level.

    Args:
        methods: ``{name: agreement table | MultiRaterCalibration.compute() result}``.
        path: output file.
        title: figure title.

    Returns:
        ``path`` as a string.
    """
    _check_methods(methods, "confidence_vs_agreement")
    tables = {name: _as_agreement(name, data) for name, data in methods.items()}
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 4.8))
    ax.plot([0, 1], [0, 1], color="0.55", linestyle="--", linewidth=1, label="ideal (p = k / R)")
    colors = plt.get_cmap("tab10").colors
    for i, (name, table) in enumerate(tables.items()):
        color = colors[i % len(colors)]
        x, y = table["agreement"], table["confidence"]
        ax.plot(x, y, color=color, linewidth=1.6, label=name)
        if "count" in table and len(table["count"]):
            share = table["count"] / max(table["count"].sum(), 1)
            ax.scatter(x, y, s=20 + 180 * np.sqrt(share), color=color, alpha=0.8, zorder=3, linewidths=0)
    ax.set_xlim(-0.03, 1.03)
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("rater agreement k / R")
    ax.set_ylabel("mean predicted probability")
    ax.grid(True, color="0.92")
    ax.legend(loc="upper left", fontsize=8, frameon=False)
    if title:
        ax.set_title(title)
    return _save(fig, path)
