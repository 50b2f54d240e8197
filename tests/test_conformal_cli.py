"""`orcal evaluate --conformal --save-conformal` and `orcal predict --conformal`: the voxel sets on files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_evaluate import make_folder

from orcal.cli import main
from orcal.metrics import ConformalRiskControl, ConformalVoxelSets, load_conformal


def _split(tmp_path, n=10):
    pred, raters, data = make_folder(tmp_path, n=n)
    cal = tmp_path / "cal"
    cal.mkdir()
    for f in sorted(pred.iterdir()):
        if f.name[len("case")] in "012345":  # cases 0-5 calibrate, 6-9 are evaluated
            f.rename(cal / f.name)
    return pred, raters, data, cal


@pytest.mark.parametrize("suffix", [".json", ".pt"])
def test_evaluate_reports_and_saves_the_voxel_sets(tmp_path, capsys, suffix):
    pred, raters, data, cal = _split(tmp_path)
    out, saved = tmp_path / "out", tmp_path / f"conformal{suffix}"
    assert main(["evaluate", "--pred", str(pred), "--raters", str(raters), "--out", str(out), "--bootstrap", "0",
                 "--quiet", "--conformal", "0.2", "--calibration", str(cal), "--save-conformal", str(saved)]) == 0
    assert "voxel sets (threshold" in capsys.readouterr().out
    c = json.loads((out / "metrics.json").read_text())["conformal"]
    fitted, values = c["fitted"], c["values"]
    sets = ConformalVoxelSets()
    for case in sorted(data)[:6]:
        p, m = (torch.from_numpy(a)[None] for a in data[case])
        sets.update(p, m.bool())
    t = float(sets.fit(0.2)[0])
    assert fitted["sets"]["threshold"] == [t] and c["saved"] == str(saved)
    test = [data[case] for case in sorted(data)[6:]]
    miss = [np.mean([np.where(m, p < t, 1 - p.astype(np.float64) < t).mean() for m in ms.astype(bool)])
            for p, ms in test]
    assert values["set_miscoverage"] == pytest.approx(float(np.mean(miss)), rel=1e-9)
    unsure = [((p >= t) & (1 - p.astype(np.float64) >= t)).mean() for p, _ in test]
    assert values["uncertain_fraction"] == pytest.approx(float(np.mean(unsure)), rel=1e-9)
    assert values["uncertain_fraction"] > 0
    loaded = load_conformal(saved)
    assert set(loaded) == {"risk", "volume", "sets"}
    assert float(loaded["sets"].thresholds[0]) == t
    assert float(loaded["risk"].thresholds[0]) == fitted["risk"]["threshold"][0]
    assert float(loaded["volume"].quantiles[0]) == pytest.approx(fitted["volume"]["quantile"][0], rel=1e-12)


def test_evaluate_save_conformal_needs_conformal(tmp_path, capsys):
    pred, raters, _ = make_folder(tmp_path, n=3)
    assert main(["evaluate", "--pred", str(pred), "--raters", str(raters), "--out", str(tmp_path / "o"),
                 "--quiet", "--save-conformal", str(tmp_path / "c.json")]) == 2
    assert "--save-conformal" in capsys.readouterr().err


SYNTH = ["--dataset", "synthetic", "--option", "n=16", "--option", "shape=(16,16)", "--option", "R=3"]


def test_predict_writes_the_conformal_and_uncertainty_masks(tmp_path, capsys):
    assert main(["train", *SYNTH, "--arch", "unet-small", "--epochs", "1", "--max-steps", "2", "--out",
                 str(tmp_path / "run"), "--quiet", "--device", "cpu"]) == 0
    for split in ("train", "test"):
        assert main(["predict", str(tmp_path / "run"), *SYNTH, "--split", split, "--out", str(tmp_path / split),
                     "--quiet", "--readout", "expected"]) == 0
    saved = tmp_path / "conformal.json"
    assert main(["evaluate", "--pred", str(tmp_path / "test" / "expected"), *SYNTH, "--split", "test",
                 "--calibration-split", "train", "--calibration", str(tmp_path / "train" / "expected"),
                 "--conformal", "0.3", "--save-conformal", str(saved), "--out", str(tmp_path / "eval"),
                 "--bootstrap", "0", "--quiet"]) == 0
    fitted = load_conformal(saved)
    out = tmp_path / "pred"
    assert main(["predict", str(tmp_path / "run"), *SYNTH, "--split", "test", "--out", str(out), "--quiet",
                 "--conformal", str(saved), "--conformal-readout", "expected"]) == 0
    files = sorted((out / "expected").glob("*.npy"))
    assert files
    for f in files:
        p = torch.from_numpy(np.load(f))[None]
        mask = np.load(out / "expected_conformal" / f.name)
        unsure = np.load(out / "expected_uncertain" / f.name)
        assert mask.dtype == unsure.dtype == np.uint8
        assert np.array_equal(mask.astype(bool), fitted["risk"].predict(p)[0].numpy())
        assert np.array_equal(unsure.astype(bool), fitted["sets"].predict(p).uncertain[0].numpy())
    capsys.readouterr()
    args = ["predict", str(tmp_path / "run"), *SYNTH, "--split", "test", "--out", str(tmp_path / "o"), "--quiet"]
    assert main([*args, "--conformal", str(saved)]) == 2  # two readouts written: which one was calibrated?
    assert "--conformal-readout" in capsys.readouterr().err
    assert main([*args, "--conformal", str(tmp_path / "missing.json")]) == 2
    assert "--conformal" in capsys.readouterr().err
    two = ConformalRiskControl(num_structures=2)
    two.update(torch.rand(4, 2, 4, 4), torch.randint(0, 3, (4, 2, 4, 4)))
    two.fit(0.5)
    from orcal.metrics import save_conformal

    save_conformal(tmp_path / "two.json", {"risk": two})
    assert main([*args, "--readout", "expected", "--conformal", str(tmp_path / "two.json")]) == 2
    assert "num_structures=2" in capsys.readouterr().err
