"""The experiment's figures: per dataset the reliability diagrams, the confidence-vs-agreement plot and one
test case side by side, and the RPS-weight sweep (matplotlib, Agg backend, written to files).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from orcal.experiment.tables import sweep_keys
from orcal.metrics import plots
from orcal.metrics.plots import pyplot
from orcal.metrics.registry import label as metric_label


def plot_qualitative(image: np.ndarray, votes: np.ndarray, num_raters: int, maps: Mapping[str, np.ndarray],
                     path: str | Path, title: str = "") -> Path:
    """One test case side by side: the image, the rater agreement ``k / R`` and each method's probability.

    ``image`` is ``(C, H, W)`` or ``(H, W)`` (first channel shown, or RGB when C = 3), ``votes`` the vote
    count ``k`` ``(H, W)``, ``maps`` ``{label: p (H, W)}``.
    """
    plt = pyplot()
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
    plt = pyplot()
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


def plot_dataset(key: str, name: str, fig_dir: Path, stats_by_row: dict, agreement_by_row: dict,
                 maps: dict, case: dict) -> dict[str, str]:
    """Reliability diagram, confidence-vs-agreement plot and qualitative figure of one dataset."""
    figures: dict[str, str] = {}
    rel = fig_dir.parent
    if stats_by_row:
        path = fig_dir / f"reliability_{name}.png"
        plots.reliability_diagram(stats_by_row, path, title=f"{key}: reliability (voxel–rater pairs, test set)")
        figures[f"{key}: reliability diagram"] = str(path.relative_to(rel))
    if stats_by_row and all(getattr(st, "num_structures", 1) > 1 for st in stats_by_row.values()):
        path = fig_dir / f"reliability_structures_{name}.png"
        plots.reliability_per_structure(stats_by_row, path, title=f"{key}: reliability per structure (test set)")
        figures[f"{key}: reliability diagram per structure"] = str(path.relative_to(rel))
    if agreement_by_row:
        path = fig_dir / f"agreement_{name}.png"
        plots.confidence_vs_agreement(agreement_by_row, path, title=f"{key}: mean confidence per rater agreement")
        figures[f"{key}: confidence against rater agreement"] = str(path.relative_to(rel))
    if maps:
        path = fig_dir / f"qualitative_{name}.png"
        where = case["id"] + ("" if case["slice"] is None else f", slice {case['slice']}")
        plot_qualitative(case["image"], case["votes"], case["num_raters"], maps, path,
                         title=f"{key}: test case {where}")
        figures[f"{key}: one test case, rater agreement and each method's probability"] = str(path.relative_to(rel))
    return figures
