"""Plots: files are written for every accepted input form; bad input is a clear error."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from orcal.metrics import MultiRaterCalibration, plots
from orcal.ops import reference


def _result(seed: int, gamma: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    p = torch.rand(2, 16, 16, generator=g)
    masks = (torch.rand(2, 3, 16, 16, generator=g) < p[:, None]).to(torch.uint8)
    metric = MultiRaterCalibration(n_bins=10)
    metric.update(p ** gamma, masks)
    return metric.compute(), reference.calibration_stats(p ** gamma, masks.sum(1), 3, n_bins=10)


def _is_png(path) -> bool:
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_reliability_diagram_accepts_stats_tables_and_results(tmp_path):
    a, st = _result(0)
    b, _ = _result(1, gamma=0.6)
    out = plots.reliability_diagram({"stats": st, "table": b["bins"], "result": a}, tmp_path / "sub" / "rel.png",
                                    title="reliability")
    assert out == str(tmp_path / "sub" / "rel.png") and _is_png(out)
    svg = plots.reliability_diagram({"one": st}, tmp_path / "rel.svg")
    assert open(svg).read(200).lstrip().startswith("<?xml")


def test_pair_counts_are_one_step_line_per_method_with_gaps_at_empty_bins():
    """Nine methods' counts as side-by-side bars were 135 slivers; each method is now one step line in its
    curve's colour, broken (not dropped to the axis) at an empty bin."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import StepPatch

    edges = np.linspace(0, 1, 16)
    tables = {f"m{i}": {"count": np.arange(1, 16) * 10 ** (i % 3), "confidence": (edges[:-1] + edges[1:]) / 2,
                        "accuracy": (edges[:-1] + edges[1:]) / 2} for i in range(9)}
    tables["m0"]["count"][5:8] = 0
    fig, (top, bottom) = plt.subplots(2, 1)
    plots.draw_reliability(tables, top, bottom)
    steps = [p for p in bottom.patches if isinstance(p, StepPatch)]
    assert len(bottom.patches) == len(steps) == 9 + 1  # m0 is two runs of non-empty bins
    colors = {tuple(line.get_color()) if not isinstance(line.get_color(), str) else line.get_color()
              for line in top.lines[1:]}
    assert {tuple(p.get_edgecolor()[:3]) for p in steps} == {matplotlib.colors.to_rgb(c) for c in colors}
    first = [p for p in steps if np.allclose(p.get_edgecolor()[:3], matplotlib.colors.to_rgb(top.lines[1].get_color()))]
    assert sorted(len(p.get_data().values) for p in first) == [5, 7]
    assert bottom.get_yscale() == "log"
    plt.close(fig)


def test_ece_in_legend_matches_metric():
    a, _ = _result(2)
    assert plots._ece(a["bins"]) == pytest.approx(a["mr_ece"], rel=1e-9)


def test_confidence_vs_agreement(tmp_path):
    a, _ = _result(3)
    b, _ = _result(4, gamma=2.0)
    out = plots.confidence_vs_agreement({"a": a, "b": b["agreement"]}, tmp_path / "cva.png")
    assert _is_png(out)
    table = {"agreement": np.array([0.0, 1.0]), "confidence": np.array([0.1, 0.8])}
    assert _is_png(plots.confidence_vs_agreement({"plain": table}, tmp_path / "plain.png"))


def test_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="non-empty"):
        plots.reliability_diagram({}, tmp_path / "x.png")
    with pytest.raises(TypeError, match="'m'"):
        plots.reliability_diagram({"m": [1, 2, 3]}, tmp_path / "x.png")
    with pytest.raises(TypeError, match="'m'"):
        plots.confidence_vs_agreement({"m": {"confidence": [0.1]}}, tmp_path / "x.png")
