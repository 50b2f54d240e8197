"""Reliability diagrams and confidence-vs-agreement plots (matplotlib, Agg backend, written to files).

Every function takes ``{method name: data}`` so that several methods are overlaid, writes the figure to
``path`` (the format follows the extension: ``.png``, ``.pdf``, ``.svg``) and returns that path.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from orcal.metrics.pooled import bin_table
from orcal.metrics.registry import label as metric_label
from orcal.stats import CalibrationStats

__all__ = ["confidence_vs_agreement", "draw_reliability", "plot_qualitative", "plot_sweep", "reliability_diagram"]


def _pyplot():
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
    plt = _pyplot()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(5.6, 6.4), sharex=True,
                                      gridspec_kw={"height_ratios": [3, 1.2], "hspace": 0.06})
    draw_reliability(tables, top, bottom, title=title)
    return _save(fig, path)


def reliability_per_structure(methods: Mapping[str, Any], path: str | os.PathLike, title: str | None = None) -> str:
    """One reliability panel per structure (SPEC §11), side by side: ``methods`` maps a name to
    :class:`~orcal.stats.CalibrationStats` of several structures (the same number for every method)."""
    _check_methods(methods, "reliability_per_structure")
    counts = {getattr(st, "num_structures", 1) for st in methods.values()}
    if len(counts) != 1 or next(iter(counts)) < 2:
        raise ValueError(f"reliability_per_structure needs statistics of several structures, the same number for "
                         f"every method; got {sorted(counts)}")
    C = counts.pop()
    plt = _pyplot()
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
    plt = _pyplot()
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


def plot_sweep(sweep: Mapping[float, Mapping[str, Mapping]], path: str | Path, title: str = "") -> Path:
    """MR-ECE and AUC (test-set value ± bootstrap std, as in the tables) against the RPS weight, one line per
    readout.

    ``sweep`` is ``{rps_weight: {readout: {metric: summary}}}``.
    """
    plt = _pyplot()
    weights = sorted(float(w) for w in sweep)
    readouts = sorted({r for by in sweep.values() for r in by})
    fig, axes = plt.subplots(1, 2, figsize=(8, 3))
    for ax, metric in zip(axes, ("mr_ece", "auc")):
        for readout in readouts:
            cells = [sweep[w].get(readout, {}).get(metric, {}) for w in sweep_keys(sweep, weights)]
            mean = [c.get("value", math.nan) for c in cells]
            std = [c.get("std", math.nan) for c in cells]
            ax.errorbar(weights, mean, yerr=std, marker="o", capsize=3, label=f"ORC ({readout})")
        ax.set_xlabel("RPS weight λ")
        ax.set_ylabel(metric_label(metric))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return path


def sweep_keys(sweep: Mapping, weights: Sequence[float]) -> list:
    """The sweep's own keys in the order of ``weights`` (keys may be floats or their strings)."""
    by_value = {float(k): k for k in sweep}
    return [by_value[w] for w in weights]
