"""orcal evaluate: end to end on tiny folders, against the metric, and its error messages."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from orcal.cli import main
from orcal.evaluate import evaluate, find_predictions, load_prediction
from orcal.metrics import pooled, registry
from orcal.ops import reference

SHAPE = (12, 10)


def _write_png(path, arr):
    from PIL import Image

    Image.fromarray(arr).save(path)


def make_folder(tmp_path, n=4, R=3, seed=0):
    """Rater folders (PNG 0/255) and predictions in three formats; returns (pred dir, raters dir, data)."""
    rng = np.random.default_rng(seed)
    pred, raters = tmp_path / "pred", tmp_path / "raters"
    pred.mkdir()
    data = {}
    for i in range(n):
        case = f"case{i}"
        p = (rng.integers(0, 256, SHAPE) / 255.0).astype(np.float32)  # exact in 8 bits
        masks = (rng.random((R, *SHAPE)) < p).astype(np.uint8)
        (raters / case).mkdir(parents=True)
        for r in range(R):
            _write_png(raters / case / f"rater{r}.png", masks[r] * 255)
        if i % 3 == 0:
            _write_png(pred / f"{case}_prob.png", np.round(p * 255).astype(np.uint8))
        elif i % 3 == 1:
            np.save(pred / f"{case}.npy", p)
        else:
            import nibabel as nib

            nib.save(nib.Nifti1Image(p, np.eye(4)), str(pred / f"{case}.nii.gz"))
        data[case] = (p, masks)
    return pred, raters, data


def test_end_to_end_writes_every_output(tmp_path):
    pred, raters, data = make_folder(tmp_path)
    out = tmp_path / "out"
    rc = main(["evaluate", "--pred", str(pred), "--raters", str(raters), "--rater-glob", "rater*",
               "--out", str(out), "--bootstrap", "50", "--bins", "10", "--exact-auc", "--no-progress"])
    assert rc == 0
    for name in ("metrics.json", "per_image.csv", "metrics.md", "reliability.png", "agreement.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    report = json.loads((out / "metrics.json").read_text())
    p = torch.from_numpy(np.stack([data[c][0] for c in sorted(data)]))
    k = torch.from_numpy(np.stack([data[c][1].sum(0) for c in sorted(data)])).to(torch.uint8)
    st = reference.calibration_stats(p, k, 3, n_bins=10)
    expected = pooled.calibration_metrics(st)
    for key in ("mr_ece", "mr_mce", "brier", "nll", "dice"):
        assert report["metrics"][key] == pytest.approx(expected[key], rel=1e-6), key
    assert report["metrics"]["auc"] == pytest.approx(pooled.auc_exact(p, k, 3), abs=1e-9)
    assert report["n_images"] == 4 and report["n_pairs"] == 4 * 3 * 120
    assert set(report["bootstrap"]["mr_ece"]) == {"mean", "std", "low", "high", "value"}
    rows = list(csv.DictReader(open(out / "per_image.csv")))
    assert [r["case"] for r in rows] == sorted(data)
    per = registry.metrics_from_totals(st)
    assert float(rows[1]["mr_ece"]) == pytest.approx(float(per["mr_ece"][1]), rel=1e-5)
    md = (out / "metrics.md").read_text()
    assert "| MR-ECE |" in md and "95% CI" in md


def test_few_images_warn_about_the_bootstrap_interval(tmp_path, capsys):
    """A 95 % interval from 2 images is no confidence interval: the printout and both reports say so."""
    from orcal.evaluate import MIN_BOOTSTRAP_IMAGES

    pred, raters, _ = make_folder(tmp_path, n=2)
    out = tmp_path / "out"
    assert main(["evaluate", "--pred", str(pred), "--raters", str(raters), "--out", str(out), "--bootstrap", "20",
                 "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "warning: the 95 % intervals come from only 2 images" in printed
    assert f"below {MIN_BOOTSTRAP_IMAGES} images" in printed
    assert "only 2 images" in json.loads((out / "metrics.json").read_text())["warnings"][0]
    assert "**Warning:** the 95 % intervals come from only 2 images" in (out / "metrics.md").read_text()
    # no bootstrap, no warning; enough images, no warning
    assert evaluate(pred, tmp_path / "a", raters=raters, n_boot=0, progress=False)["warnings"] == []
    (tmp_path / "many").mkdir()
    pred, raters, _ = make_folder(tmp_path / "many", n=MIN_BOOTSTRAP_IMAGES)
    report = evaluate(pred, tmp_path / "b", raters=raters, n_boot=20, progress=False)
    assert report["warnings"] == [] and "Warning" not in (tmp_path / "b" / "metrics.md").read_text()


def test_python_api_without_bootstrap_and_with_logits(tmp_path):
    pred, raters, data = make_folder(tmp_path, n=2)
    logits = tmp_path / "logits"
    logits.mkdir()
    for case, (p, _) in data.items():
        np.save(logits / f"{case}.npy", np.log(np.clip(p, 1e-6, 1 - 1e-6) / np.clip(1 - p, 1e-6, 1)))
    # 16 bins: no k / 255 lies on an inner bin edge, so the sigmoid's rounding cannot move a voxel's bin
    a = evaluate(pred, tmp_path / "a", raters=raters, n_boot=0, n_bins=16, progress=False)
    b = evaluate(logits, tmp_path / "b", raters=raters, n_boot=0, n_bins=16, kind="logit", progress=False)
    assert a["bootstrap"] is None
    assert a["metrics"]["mr_ece"] == pytest.approx(b["metrics"]["mr_ece"], abs=1e-5)


def test_dataset_source(tmp_path):
    from orcal.data import load_dataset

    options = {"n": 10, "R": 3, "shape": (16, 16), "seed": 1}
    ds = load_dataset("synthetic", split="test", **options)
    pred = tmp_path / "pred"
    pred.mkdir()
    for i in range(len(ds)):
        item = ds[i]
        np.save(pred / f"{item['id']}.npy", item["masks"].float().mean(0).numpy())
    report = evaluate(pred, tmp_path / "out", dataset="synthetic", split="test", n_boot=20, progress=False,
                      dataset_options=options)
    assert report["n_images"] == len(ds)
    assert report["metrics"]["mr_ece"] == pytest.approx(0.0, abs=1e-6)  # k / R is perfectly calibrated
    with pytest.raises(ValueError, match="no prediction"):  # every split: the other cases lack one
        evaluate(pred, tmp_path / "out", dataset="synthetic", progress=False, dataset_options=options)
    report = evaluate(pred, tmp_path / "out", dataset="synthetic", allow_missing=True, n_boot=0, progress=False,
                      dataset_options=options)
    assert report["n_images"] == len(ds)


def test_errors_name_the_file(tmp_path, capsys):
    pred, raters, data = make_folder(tmp_path, n=2)
    np.save(pred / "stranger.npy", np.zeros(SHAPE, np.float32))
    with pytest.raises(ValueError, match="stranger.npy"):
        evaluate(pred, tmp_path / "out", raters=raters, progress=False)
    (pred / "stranger.npy").unlink()
    np.save(pred / "case1.npy", np.zeros((5, 5), np.float32))
    with pytest.raises(ValueError, match=r"case1\.npy.*shape"):
        evaluate(pred, tmp_path / "out", raters=raters, progress=False)
    np.save(pred / "case1.npy", np.full(SHAPE, 1.5, np.float32))
    with pytest.raises(ValueError, match=r"case1\.npy.*\[0, 1\]"):
        evaluate(pred, tmp_path / "out", raters=raters, progress=False)
    bad = np.zeros(SHAPE, np.float32)
    bad[0, 0] = np.nan
    np.save(pred / "case1.npy", bad)
    with pytest.raises(ValueError, match="case1.npy"):
        load_prediction(pred / "case1.npy")
    rc = main(["evaluate", "--pred", str(pred), "--raters", str(raters), "--out", str(tmp_path / "o")])
    assert rc == 2 and "case1.npy" in capsys.readouterr().err
    with pytest.raises(ValueError, match="exactly one"):
        evaluate(pred, tmp_path / "out", progress=False)
    with pytest.raises(FileNotFoundError, match="--pred"):
        find_predictions(tmp_path / "nowhere")
    np.save(pred / "case0.npy", np.zeros(SHAPE, np.float32))  # beside case0_prob.png
    with pytest.raises(ValueError, match="two predictions"):
        find_predictions(pred)


def test_conformal_calibration_on_separate_cases(tmp_path, capsys):
    from orcal.metrics import ConformalRiskControl, ConformalVolume

    pred, raters, data = make_folder(tmp_path, n=10)
    cal = tmp_path / "cal"
    cal.mkdir()
    for f in sorted(pred.iterdir()):
        if f.name[len("case")] in "012345":  # cases 0-5 calibrate, 6-9 are evaluated
            f.rename(cal / f.name)
    out = tmp_path / "out"
    assert main(["evaluate", "--pred", str(pred), "--raters", str(raters), "--out", str(out), "--bootstrap", "0",
                 "--no-progress", "--conformal", "0.2", "--calibration", str(cal)]) == 0
    c = json.loads((out / "metrics.json").read_text())["conformal"]
    printed = capsys.readouterr().out
    assert "voxel risk control (threshold" in printed and "volume intervals (quantile" in printed
    crc, vol = ConformalRiskControl(), ConformalVolume()
    for case in sorted(data)[:6]:
        p, m = (torch.from_numpy(a)[None] for a in data[case])
        crc.update(p, m.bool())
        vol.update(p, m.bool())
    fitted, values = c["fitted"], c["values"]
    assert c["n_calibration"] == 6 and fitted["risk"]["threshold"] == [float(crc.fit(0.2)[0])]
    assert fitted["volume"]["quantile"][0] == pytest.approx(float(vol.fit(0.2)[0]), rel=1e-12)
    test = [data[case] for case in sorted(data)[6:]]
    t = fitted["risk"]["threshold"][0]
    fnr = [np.mean([1 - (m & (p >= t)).sum() / m.sum() for m in ms.astype(bool)]) for p, ms in test]
    assert values["fnr"] == pytest.approx(float(np.mean(fnr)), rel=1e-9)
    assert 0 <= values["volume_coverage/after"] <= 1 and values["volume_width/after"] > 0
    with pytest.raises(ValueError, match="disjoint"):
        evaluate(pred, tmp_path / "o2", raters=raters, n_boot=0, progress=False, conformal=0.2, calibration=pred,
                 allow_missing=True)
    with pytest.raises(ValueError, match="go together"):
        evaluate(pred, tmp_path / "o3", raters=raters, n_boot=0, progress=False, conformal=0.2)
    with pytest.raises(ValueError, match="at least 9 calibration images"):
        evaluate(pred, tmp_path / "o4", raters=raters, n_boot=0, progress=False, conformal=0.1, calibration=cal)
