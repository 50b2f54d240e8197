"""Smoke test of the benchmark suite: it runs on minuscule sizes and writes its table (no timing asserted)."""

from __future__ import annotations

import json

import pytest

from benchmarks.suite import Size, markdown, run_suite


def test_suite_runs_and_writes(tmp_path):
    pytest.importorskip("torchmetrics")
    rows, meta = run_suite(device="cpu", quick=True, providers=("cpp", "torch", "torchmetrics", "cross_entropy",
                                                                "bce", "auroc"),
                           raters=(2,), sizes=[Size("tiny", 1, (4, 6))], repeats=1, budget_s=0.0, out_dir=tmp_path,
                           staple=False, progress=False)
    ops = {r.op for r in rows}
    assert ops == {"loss", "stats", "readout"}
    assert all(not r.error for r in rows), [r.error for r in rows if r.error]
    assert all(r.median_ms > 0 and r.runs >= 1 for r in rows)
    assert {r.provider for r in rows if r.op == "loss"} == {"cpp", "torch", "cross_entropy", "bce"}
    metric = {r.provider: r.extra["values"] for r in rows if r.op == "stats"}
    assert set(metric) == {"cpp", "torch", "torchmetrics", "auroc"}
    assert abs(metric["cpp"]["mr_ece"] - metric["torchmetrics"]["mr_ece"]) < 1e-6  # MR-ECE = ECE of expanded pairs
    assert abs(metric["cpp"]["auc"] - metric["auroc"]["auc"]) < 0.05  # binned (4096) against exact
    saved = json.loads((tmp_path / f"{meta['device_name']}-quick.json").read_text())
    assert len(saved["rows"]) == len(rows)
    text = markdown(rows, meta)
    assert "| loss |" in text and "fresh logits leaf" in text and "spread ms" in text
    assert (tmp_path / f"{meta['device_name']}-quick.md").exists()


def test_training_step_share_names_every_loss():
    from benchmarks.peers import training_step_share

    out = training_step_share("cpu", quick=True, repeats=1)
    assert any(name.startswith("unet3d") for name in out)
    for entry in out.values():
        assert set(entry["losses"]) == {"orcal", "eager reference", "F.cross_entropy"}
        for t in entry["losses"].values():
            assert t["step_ms"] > 0 and 0 < t["share_of_step"]


def test_spread_over_fresh_processes(tmp_path):
    rows, _ = run_suite(device="cpu", quick=True, ops=("loss",), providers=("cpp",), raters=(2,),
                        sizes=[Size("tiny", 1, (4, 6))], repeats=1, budget_s=0.0, out_dir=None, staple=False,
                        progress=False, processes=2)
    (row,) = rows
    assert row.spread_ms is not None and 0 < row.spread_ms[0] <= row.spread_ms[1]
    assert len(row.extra["process_medians_ms"]) == 2 and row.peak_extra_mb >= 0
