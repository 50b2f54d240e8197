"""Plots: files are written for every accepted input form; bad input is a clear error."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from orcal import plots, reference
from orcal.metrics import MultiRaterCalibration


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
