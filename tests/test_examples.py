"""The examples in examples/ run as users run them, on tiny generated data, with the real packages."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_monai_3d_example_runs_as_a_script(tmp_path):
    pytest.importorskip("monai")
    pytest.importorskip("nibabel")
    start = time.perf_counter()
    done = subprocess.run([sys.executable, str(EXAMPLES / "monai_3d.py"), "--out", str(tmp_path), "--epochs", "3"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("epoch")]
    assert len(lines) == 3 and all("val MR-ECE" in line for line in lines)
    assert time.perf_counter() - start < 120  # a minute on an idle 2-core CPU; CI shares its cores


@pytest.mark.slow
def test_monai_3d_example_keeps_the_spacing(tmp_path):
    pytest.importorskip("monai")
    pytest.importorskip("nibabel")
    result = _load("monai_3d").main(["--out", str(tmp_path), "--epochs", "2", "--cases", "3"])
    torch.testing.assert_close(torch.as_tensor(result["affine"])[0].diag()[:3].abs().double(),
                               torch.tensor([0.8, 0.8, 1.5], dtype=torch.float64))
    # the best epoch is the lowest MR-ECE, and its probability map is saved on the image's grid
    assert result["best"]["mr_ece"] == min(h["mr_ece"] for h in result["history"])
    assert (tmp_path / "best_model.pt").is_file()
    import nibabel as nib

    saved = list(tmp_path.glob("*_prob.nii.gz"))
    assert len(saved) == 1
    img = nib.load(str(saved[0]))
    np_affine = torch.as_tensor(img.affine).diag()[:3].abs()
    torch.testing.assert_close(np_affine, torch.tensor([0.8, 0.8, 1.5], dtype=torch.float64))
    data = torch.as_tensor(img.get_fdata())
    assert 0 <= float(data.min()) and float(data.max()) <= 1


@pytest.mark.slow
def test_lightning_example_logs_the_pooled_mr_ece(tmp_path):
    pytest.importorskip("lightning")
    pytest.importorskip("torchmetrics")
    result = _load("lightning_module").main(["--out", str(tmp_path), "--epochs", "3"])
    assert len(result["epochs"]) == 3 and result["mode"] == "min"
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
