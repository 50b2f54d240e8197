"""Smoke test of the benchmark suite: it runs on minuscule sizes and writes its table (no timing asserted)."""

from __future__ import annotations

import json

import pytest

from benchmarks.report import markdown
from benchmarks.suite import OPS, PROVIDERS, Size, run_suite


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
    text = markdown(rows, meta, OPS, PROVIDERS)
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


# An installed orcal, seen from `cwd`: its folder alone on the path, and no folder that holds the suite (an editable
# install in compat mode puts the checkout's root on the path through a .pth file).
_INSTALLED = """import sys
from pathlib import Path
sys.path[:] = [sys.argv[1]] + [p for p in sys.path[1:] if not (Path(p or '.') / 'benchmarks' / 'suite.py').exists()]
from orcal.cli import main
sys.exit(main(['bench', *sys.argv[2:]]))
"""


def _orcal_bench(cwd, *args: str, checkout: bool = False):
    import os
    import subprocess
    import sys
    from pathlib import Path

    lib = Path(cwd) / "lib"
    lib.mkdir(exist_ok=True)
    (lib / "orcal").symlink_to(Path(__file__).resolve().parents[1] / "orcal")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)
    command = [sys.executable, "-m", "orcal", "bench", *args] if checkout else \
        [sys.executable, "-c", _INSTALLED, str(lib), *args]
    if checkout:
        env["PYTHONPATH"] = str(lib)
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_orcal_bench_outside_a_checkout_says_how_to_run_the_suite(tmp_path):
    done = _orcal_bench(tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "python -m benchmarks" in done.stderr and "Traceback" not in done.stderr


def test_orcal_bench_finds_the_suite_where_python_does(tmp_path):
    """From a checkout's root (``python -m`` puts it first on the path) the command has the suite's options,
    found without editing sys.path."""
    import shutil
    from pathlib import Path

    shutil.copytree(Path(__file__).resolve().parents[1] / "benchmarks", tmp_path / "benchmarks",
                    ignore=shutil.ignore_patterns("results", "__pycache__"))
    done = _orcal_bench(tmp_path, "--help", checkout=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "--providers" in done.stdout

def test_no_import_circle_between_benchmark_modules():
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "benchmarks"
    graph = {}
    for path in root.glob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("benchmarks"):
                names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        graph[path.stem] = {n.split(".")[1] for n in names if n.count(".") >= 1} & {p.stem for p in root.glob("*.py")}

    def reaches(start, target, seen=()):
        return any(n == target or (n not in seen and reaches(n, target, (*seen, n))) for n in graph[start])

    circles = sorted(m for m in graph if reaches(m, m))
    assert not circles, {m: sorted(graph[m]) for m in circles}
