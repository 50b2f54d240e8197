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
    structures = meta["extras"]["Several structures (benchmarks.bench_structures)"]
    assert "error" not in structures and structures["loss fwd+bwd"]["max_abs_diff"] < 1e-5
    assert all(structures[op]["one call ms"] > 0 for op in ("loss fwd+bwd", "calibration_stats"))
    text = markdown(rows, meta)
    assert "| loss |" in text and "fresh logits leaf" in text and "spread ms" in text
    assert "| loss fwd+bwd |" in text
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


def test_monai_peer_runs_with_the_real_monai():
    """The MONAI peer is MONAI's ECE per image on y = k / R, averaged: the mean of per-image MR-ECEs."""
    pytest.importorskip("monai.metrics")
    import torch

    from benchmarks.peers import peer_available, stats_peer
    from orcal.metrics import MultiRaterCalibration

    reason = peer_available("monai_ece")
    if reason:
        pytest.skip(reason)
    g = torch.Generator().manual_seed(0)
    p = torch.rand(3, 10, 12, generator=g)
    masks = (torch.rand(3, 4, 10, 12, generator=g) < p[:, None]).to(torch.uint8)
    per_image = []
    for i in range(3):
        metric = MultiRaterCalibration(agreement=False)
        metric.update(p[i:i + 1], masks[i:i + 1])
        per_image.append(metric.compute()["mr_ece"])
    assert stats_peer("monai_ece", 4)(p, masks) == pytest.approx(sum(per_image) / 3, abs=1e-6)


def test_sass_hot_loop_is_the_longest_backward_branch():
    """benchmarks.sass counts the instructions of the voxel loop: the longest backward branch, not the
    branch-to-self after EXIT nor a short inner retry loop; NOPs are left out."""
    from benchmarks.sass import hot_loop

    listing = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   LDG.E R2, desc[UR4][R4.64] ;
        /*0020*/                   FADD R3, R2, R2 ;
        /*0030*/                   ATOMS.CAS R5, [R6], R7, R8 ;
        /*0040*/               @P1 BRA 0x30 ;
        /*0050*/                   NOP ;
        /*0060*/               @P0 BRA 0x10 ;
        /*0070*/                   EXIT ;
        /*0080*/                   BRA 0x80 ;
    """.strip("\n").splitlines()
    body = hot_loop(listing)
    assert [line.split("*/")[0].strip() + "*/" for line in body] == \
        ["/*0010*/", "/*0020*/", "/*0030*/", "/*0040*/", "/*0060*/"]
    assert len(hot_loop(listing[:4])) == 4  # no loop: the whole kernel
