"""The examples in examples/ run as users run them, on tiny generated data, with the real packages."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(name: str, *args: str) -> str:
    done = subprocess.run([sys.executable, str(EXAMPLES / f"{name}.py"), *args], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
def test_monai_3d_example_runs(tmp_path):
    pytest.importorskip("monai")
    pytest.importorskip("nibabel")
    out = _run("monai_3d", "--out", str(tmp_path), "--epochs", "2")
    lines = [line for line in out.splitlines() if line.startswith("epoch")]
    assert len(lines) == 2 and all("val MR-ECE" in line for line in lines)
    result = _load("monai_3d").main(["--out", str(tmp_path / "again"), "--epochs", "1"])
    torch.testing.assert_close(torch.as_tensor(result["affine"])[0].diag()[:3].abs().double(),
                               torch.tensor([0.8, 0.8, 1.5], dtype=torch.float64))  # the files' spacing kept


@pytest.mark.slow
def test_lightning_example_logs_the_pooled_mr_ece(tmp_path):
    pytest.importorskip("lightning")
    pytest.importorskip("torchmetrics")
    out = _run("lightning_module", "--out", str(tmp_path / "script"), "--epochs", "2")
    assert "best checkpoint" in out
    result = _load("lightning_module").main(["--out", str(tmp_path), "--epochs", "3"])
    assert len(result["epochs"]) == 3
    assert result["best_score"] == pytest.approx(min(result["epochs"]))
    assert Path(result["best_path"]).is_file()
    # the last epoch's logged value is MultiRaterCalibration over the whole validation set, pooled
    from orcal.metrics import MultiRaterCalibration

    module = result["module"].eval()
    pooled = MultiRaterCalibration(kind="ordinal", readout="expected")
    with torch.no_grad():
        for image, masks in result["val"]:
            pooled.update(module(image), masks)
    assert result["epochs"][-1] == pytest.approx(pooled.compute()["mr_ece"], rel=1e-4)
