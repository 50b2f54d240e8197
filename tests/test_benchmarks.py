"""Smoke test of the benchmark suite: it runs on minuscule sizes and writes its table (no timing asserted)."""

from __future__ import annotations

import json

import pytest

from benchmarks.suite import Size, markdown, run_suite


def test_suite_runs_and_writes(tmp_path):
    pytest.importorskip("torchmetrics")
    rows, meta = run_suite(device="cpu", quick=True, providers=("cpp", "torch", "torchmetrics"), raters=(2,),
                           sizes=[Size("tiny", 1, (4, 6))], repeats=1, budget_s=0.0, out_dir=tmp_path,
                           staple=False, progress=False)
    ops = {r.op for r in rows}
    assert ops == {"loss", "stats", "readout"}
    assert all(not r.error for r in rows), [r.error for r in rows if r.error]
    assert all(r.median_ms > 0 and r.runs >= 1 for r in rows)
    metric = {r.provider: r.extra["value"] for r in rows if r.op == "stats"}
    assert set(metric) == {"cpp", "torch", "torchmetrics"}
    assert abs(metric["cpp"] - metric["torchmetrics"]) < 1e-6  # the same MR-ECE as expanded pairs
    saved = json.loads((tmp_path / f"{meta['device_name']}-quick.json").read_text())
    assert len(saved["rows"]) == len(rows)
    assert "| loss |" in markdown(rows, meta)
    assert (tmp_path / f"{meta['device_name']}-quick.md").exists()
