"""The experiment's conformal columns (SPEC §12): calibrated on the validation split, measured per test image,
bootstrapped, tabulated, resumed and named in the findings."""

from __future__ import annotations

import argparse
import csv
import io
import json
import math

import pytest
import torch

from orcal.experiment import DatasetSpec, ExperimentConfig, run_experiment
from orcal.experiment.conformal import KINDS, Batch, ConformalEvaluation, columns, leads, misses, summarize


def _well_specified(n: int, R: int, seed: int, shape=(12, 12)) -> tuple[torch.Tensor, torch.Tensor]:
    """Images whose raters vote foreground independently with the predicted probability: p is the truth."""
    g = torch.Generator().manual_seed(seed)
    centre = torch.rand(n, 1, 1, generator=g) * 0.6 + 0.2
    ramp = torch.linspace(-1, 1, shape[1]).view(1, 1, -1)
    p = torch.sigmoid(6 * (centre - 0.5) + 3 * ramp + 0.5 * torch.randn(n, *shape, generator=g)).clamp(0, 1)
    masks = (torch.rand(n, R, *shape, generator=g) < p[:, None]).to(torch.uint8)
    return p, masks


def test_well_specified_model_meets_alpha_and_the_nominal_interval_covers():
    alpha = 0.1
    evaluation = ConformalEvaluation()
    p, m = _well_specified(300, 3, seed=0)
    for i in range(0, 300, 50):  # batches: the calibrators stream
        evaluation.calibrate(Batch.of(p[i:i + 50], m[i:i + 50]))
    evaluation.fit(alpha)
    p, m = _well_specified(400, 3, seed=1)
    evaluation.measure(Batch.of(p, m))
    values = evaluation.result()["values"]
    assert set(values) == set(columns())
    assert all(math.isfinite(v) for v in values.values())
    assert abs(values["fnr"] - alpha) < 0.02  # risk control is tight: the FNR sits at alpha, not far below
    assert 0 < values["mask_fraction"] < 1
    assert values["volume_coverage/after"] >= 1 - alpha - 0.03
    # the predicted volume distribution is right here, so the nominal interval already covers about 1 - alpha
    assert abs(values["volume_coverage/before"] - (1 - alpha)) < 0.05
    assert values["set_miscoverage"] <= alpha + 0.02 and 0 <= values["uncertain_fraction"] < 1
    per_image = evaluation.per_image()
    assert per_image["fnr"].shape == (400, 1) and evaluation.n_calibration == 300


def test_valid_mask_counts_only_valid_voxels():
    p, m = _well_specified(40, 3, seed=2)
    valid = torch.ones(40, 12, 12, dtype=torch.bool)
    valid[:, :, 6:] = False
    padded = torch.where(valid, p, torch.ones_like(p))  # padding predicted foreground, no rater there
    ev = ConformalEvaluation()
    ev.calibrate(Batch.of(p, m, valid))
    ev.fit(0.2)
    lam = float(ev.fitted["risk"]["threshold"][0])
    ev.measure(Batch.of(padded, m, valid))
    inside = ((p >= lam) & valid).flatten(1).sum(1) / valid.flatten(1).sum(1)
    assert torch.allclose(ev.per_image()["mask_fraction"][:, 0], inside.double())


def _per_seed(values_by_row: dict[str, list[float]], n: int = 40, noise: float = 0.0, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for row, means in values_by_row.items():
        out[row] = [{key: (torch.full((n, 1), mean) + noise * torch.randn(n, 1, generator=g)).double()
                     for key in columns()} for mean in means]
    return out


def test_summary_leads_and_misses():
    clear = summarize(_per_seed({"soft": [0.30, 0.31], "ordinal/expected": [0.20, 0.21]}, noise=0.01), n_boot=200)
    rows = clear["rows"]
    assert rows["soft"]["mask_fraction"]["seeds"] == pytest.approx([0.30, 0.31], abs=0.01)
    assert rows["soft"]["mask_fraction"]["low"] < rows["soft"]["mask_fraction"]["high"]
    # every column is 0.2-0.3: the FNR (target <= 0.5) is met, the coverage (target >= 0.5) missed by both
    found = leads(clear, alpha=0.5)
    assert found["risk"]["best"] == "ordinal/expected" and found["risk"]["runner_up"] == "soft"
    assert found["risk"]["exceeds_noise"] and found["risk"]["diff"] < 0
    assert found["volume"]["fails"] == ["soft", "ordinal/expected"] and "best" not in found["volume"]
    # two rows within the noise of each other are not ranked
    close = summarize(_per_seed({"soft": [0.30, 0.20], "ordinal/expected": [0.21, 0.29]}, noise=0.2), n_boot=200)
    assert not leads(close, alpha=0.5)["risk"]["exceeds_noise"]
    # a test FNR a little above alpha is no miss; a whole interval above it is
    fnr = columns()["fnr"]
    assert not misses(fnr, {"value": 0.12, "low": 0.08, "high": 0.15}, 0.1)
    assert misses(fnr, {"value": 0.2, "low": 0.15, "high": 0.25}, 0.1)
    # one calibration set of n images moves the test risk by about sqrt(alpha (1 - alpha) / n) (SPEC §12.6):
    # 0.137 [0.110, 0.170] is past 0.1 beyond the test bootstrap, not beyond both noises with 90 images
    # (1.96 x 0.032 = 0.062 in quadrature with 0.027); with 2000 calibration images it is
    past = {"value": 0.137, "low": 0.110, "high": 0.170}
    assert misses(fnr, past, 0.1) and not misses(fnr, past, 0.1, n_calibration=90)
    assert misses(fnr, past, 0.1, n_calibration=2000)
    coverage = columns()["volume_coverage/after"]  # ">= 1 - alpha": the same rule on the other side
    low_cover = {"value": 0.82, "low": 0.74, "high": 0.884}
    assert misses(coverage, low_cover, 0.1) and not misses(coverage, low_cover, 0.1, n_calibration=90)
    assert misses(coverage, {"value": 0.6, "low": 0.55, "high": 0.65}, 0.1, n_calibration=90)


def test_registry_lists_each_column_once_with_a_direction_or_a_bound():
    keys = [c.key for kind in KINDS for c in kind.columns]
    assert len(keys) == len(set(keys))
    for kind in KINDS:
        assert kind.certified in keys and kind.cost in keys
        assert columns()[kind.certified].bound is not None and columns()[kind.cost].better in ("lower", "higher")
    for c in columns().values():
        assert c.better in ("lower", "higher", None) and (c.better is not None or c.bound is not None), c.key


def _cfg(out, **kw) -> ExperimentConfig:
    opts = {"n": 24, "R": 3, "shape": (16, 16), "test_fraction": 0.34, "val_fraction": 0.34}
    settings = dict(out=str(out), methods=("median", "ordinal"), arch="unet-small", encoder="none", epochs=1,
                    batch_size=4, max_steps=1, n_boot=20, progress=False, device="cpu")
    settings.update(kw)
    return ExperimentConfig(datasets=[DatasetSpec("synthetic", options=opts, label="tiny")], **settings)


@pytest.fixture
def trainings(monkeypatch):
    """Counts the runs trained (the experiment imports ``train`` when a run starts)."""
    import orcal.training.loop

    calls = []
    original = orcal.training.loop.train

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(orcal.training.loop, "train", counting)
    return calls


def test_experiment_conformal_table_and_resume(tmp_path, trainings):
    out = tmp_path / "exp"
    plain = run_experiment(_cfg(out), log=lambda *a: None)
    assert "conformal" not in plain and len(trainings) == 2
    assert not (out / "conformal.csv").exists()

    logged: list[str] = []
    results = run_experiment(_cfg(out, conformal=0.2), log=logged.append)
    # recorded without conformal results: evaluated again from the kept weights, never reported empty
    assert len(trainings) == 2
    assert sum("recorded without conformal results" in line and "evaluated it again from its checkpoint" in line
               for line in logged) == 2
    assert results["runs"] == plain["runs"]  # the same model: the other tables are unchanged
    entry = results["conformal"]["tiny"]
    assert entry["alpha"] == 0.2 and entry["n_calibration"] == 8
    assert entry["n_calibration_units"] == 8  # synthetic images share no patient: each its own unit
    rows = {"median", "ordinal/majority", "ordinal/expected"}
    assert set(entry["rows"]) == rows | {f"{r}+ts" for r in rows}  # + TS rows calibrated too
    for row, by_column in entry["rows"].items():
        assert set(by_column) == set(columns()), row
        for key, s in by_column.items():
            assert math.isfinite(s["value"]) and math.isfinite(s["low"]) and math.isfinite(s["high"]), (row, key)
        assert 0 <= by_column["fnr"]["value"] <= 1 and by_column["volume_width/after"]["value"] > 0
    table = (out / "conformal_tiny.md").read_text()
    assert table.splitlines()[0].startswith("| Method | FNR (≤ 0.2) | mask size")
    assert "before → after" in table and "| ORC (expected) + TS |" in table and "n/a" not in table
    report = (out / "report.md").read_text()
    assert "## Conformal guarantees" in report and "validation split" in report
    assert "Conformal voxel risk control at α = 0.2 on tiny" in results["findings"]
    lines = list(csv.DictReader(io.StringIO((out / "conformal.csv").read_text())))
    assert len(lines) == 6 * len(columns()) and {ln["alpha"] for ln in lines} == {"0.2"}
    saved = json.loads((out / "results.json").read_text())
    assert "conformal.csv" in saved["files"] and saved["settings"]["conformal"] == 0.2

    logged.clear()
    again = run_experiment(_cfg(out, conformal=0.2), log=logged.append)  # reused: nothing evaluated again
    assert len(trainings) == 2 and again["conformal"]["tiny"]["rows"] == entry["rows"]
    assert not any("again" in line for line in logged)
    run_experiment(_cfg(out), log=lambda *a: None)  # a record with conformal results serves a run without
    assert len(trainings) == 2
    logged.clear()
    run_experiment(_cfg(out, conformal=0.25), log=logged.append)  # another alpha: evaluated again
    assert len(trainings) == 2 and any("recorded at alpha 0.2, not 0.25" in line for line in logged)

    # weights that are not the recorded model's (or none): trained again
    record = out / "runs" / "tiny" / "seed0" / "median.json"
    changed = json.loads(record.read_text())
    changed["readouts"]["sigmoid"]["summary"]["mr_ece"]["value"] += 0.01
    record.write_text(json.dumps(changed))
    for path in (out / "runs" / "tiny" / "seed0" / "checkpoints" / "ordinal").glob("*.pt"):
        path.unlink()
    logged.clear()
    run_experiment(_cfg(out, conformal=0.3), log=logged.append)
    assert len(trainings) == 4 and sum("training it again" in line for line in logged) == 2


def test_conformal_refuses_a_validation_split_too_small_before_training(tmp_path, trainings):
    with pytest.raises(ValueError, match=r"min_calibration_images\(0.05\) = 19"):
        run_experiment(_cfg(tmp_path / "small", conformal=0.05), log=lambda *a: None)
    assert not trainings


def test_command_line_conformal_flag(tmp_path):
    from orcal.commands import experiment

    def build(argv):
        parser = argparse.ArgumentParser()
        experiment.configure(parser)
        return experiment.build_config(parser.parse_args(argv))

    assert build(["--dataset", "synthetic", "--conformal", "0.1"]).conformal == 0.1
    assert build(["--preset", "structures3d", "--conformal", "0.1"]).conformal == 0.1
    assert build(["--dataset", "synthetic"]).conformal is None
    for bad in ("0", "1", "1.5", "-0.1", "nan"):
        with pytest.raises(ValueError, match="--conformal"):
            build(["--dataset", "synthetic", "--conformal", bad])


def _entry(values_by_row, noise, alpha=0.5, fnr=None):
    per_seed = _per_seed(values_by_row, noise=noise)
    for row, value in (fnr or {}).items():  # the row misses every guarantee bounded by alpha
        for s in per_seed[row]:
            for key in ("fnr", "set_miscoverage"):
                s[key] = torch.full_like(s[key], value)
    summary = summarize(per_seed, n_boot=200)
    return {"alpha": alpha, "n_calibration": 30, "spacing_known": True, "rows": summary["rows"],
            "leads": leads(summary, alpha)}


def test_conformal_table_and_findings_never_rank_within_the_noise():
    from orcal.experiment.findings import _conformal
    from orcal.experiment.tables import conformal_table

    clear = _entry({"soft": [0.30, 0.31], "ordinal/expected": [0.20, 0.21], "median": [0.1, 0.1]}, noise=0.01,
                   fnr={"median": 0.9})  # median's masks are smallest, but it misses FNR <= 0.5 everywhere
    table = conformal_table(clear)
    assert "| interval width (mL) ↓, before → after |" in table.splitlines()[0] + " |"
    median = next(ln for ln in table.splitlines() if ln.startswith("| Median Consensus |"))
    assert "†" in median.split("|")[2] and "**" not in median
    expected = next(ln for ln in table.splitlines() if ln.startswith("| ORC (expected) |"))
    assert expected.split("|")[3].strip().startswith("**0.20")  # the smallest mask of the rows meeting FNR
    text = " ".join(_conformal("D", clear))
    assert "**ORC (expected)** has the smallest mask size" in text and "larger than the bootstrap" in text
    assert "Median Consensus misses it beyond the noise" in text

    close = _entry({"soft": [0.30, 0.20], "ordinal/expected": [0.21, 0.29]}, noise=0.2)
    text = " ".join(_conformal("D", close))
    assert "none has a smaller mask size (fraction of voxels) than the others beyond the noise" in text
    assert "**" not in text


def test_findings_call_an_exact_tie_a_tie():
    from orcal.experiment.findings import _conformal

    tie = _entry({"soft": [0.0, 0.0], "ordinal/expected": [0.0, 0.0], "median": [0.2, 0.2]}, noise=0.0)
    text = " ".join(_conformal("D", tie))
    assert "2 tie at the smallest" in text and "differ by" not in text
