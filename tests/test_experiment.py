"""The experiment driver, its tables and report, and the experiment / demo commands."""

from __future__ import annotations

import argparse
import csv
import io
import json
import math

import pytest

from orcal.experiment import DatasetSpec, ExperimentConfig, cfg_with, plan_runs, preset_config, run_experiment, tables


def _summary(mr_ece: float, auc: float, std: float = 0.01) -> dict:
    return {"mr_ece": {"mean": mr_ece, "std": std, "value": mr_ece},
            "auc": {"mean": auc, "std": std, "value": auc},
            "dice": {"mean": 0.5, "std": std, "value": 0.5}}


HAND_MADE = {
    "A": {"median": _summary(0.30, 0.90), "soft": _summary(0.10, 0.80),
          "ordinal/majority": _summary(0.20, 0.95), "ordinal/expected": _summary(0.05, 0.85)},
    "B": {"median": _summary(0.12, 0.70), "soft": _summary(0.11, 0.75),
          "ordinal/majority": _summary(0.11, 0.60), "ordinal/expected": _summary(0.40, 0.74)},
}


def _row(markdown: str, label: str) -> list[str]:
    line = next(ln for ln in markdown.splitlines() if ln.startswith(f"| {label} |"))
    return [c.strip() for c in line.strip("|").split("|")][1:]


def test_best_value_marked_in_markdown_and_csv():
    t1 = tables.metric_results_table(HAND_MADE, "mr_ece")
    assert t1.best == {"A": {"ordinal/expected"}, "B": {"soft", "ordinal/majority"}}  # lower is better; a tie
    md = t1.to_markdown()
    assert _row(md, "ORC (expected)")[0] == "**0.0500 ± 0.0100**"
    assert _row(md, "Median Consensus") == ["0.3000 ± 0.0100", "0.1200 ± 0.0100"]
    assert _row(md, "Soft Consensus")[1].startswith("**") and _row(md, "ORC (majority)")[1].startswith("**")
    t2 = tables.metric_results_table(HAND_MADE, "auc")
    assert t2.best == {"A": {"ordinal/majority"}, "B": {"soft"}}  # higher is better
    rows = list(csv.DictReader(io.StringIO(t2.to_csv())))
    best = {(r["key"], col) for r in rows for col in ("A", "B") if r[f"{col}_best"] == "1"}
    assert best == {("ordinal/majority", "A"), ("soft", "B")}
    assert float(next(r for r in rows if r["key"] == "soft")["B_value"]) == 0.75


def test_dataset_table_marks_the_best_of_each_metric():
    md = tables.dataset_table(HAND_MADE, "B", ("mr_ece", "auc"))
    assert md.splitlines()[0] == "| Method | MR-ECE ↓ | AUC ↑ |"
    assert _row(md, "Soft Consensus") == ["**0.1100 ± 0.0100**", "**0.7500 ± 0.0100**"]
    assert _row(md, "Median Consensus") == ["0.1200 ± 0.0100", "0.7000 ± 0.0100"]
    with pytest.raises(ValueError, match="dataset"):
        tables.dataset_table(HAND_MADE, "C")


def test_table_rows_in_paper_order_and_missing_cells():
    runs = {"A": {"ordinal/majority": _summary(0.2, 0.9), "random": _summary(0.3, 0.8),
                  "staple": {"mr_ece": {"mean": math.nan, "std": math.nan}}}}
    table = tables.metric_results_table(runs, "mr_ece")
    assert table.rows == ["random", "staple", "ordinal/majority"]
    assert table.cell_text("staple", "A") == "n/a"
    assert table.best["A"] == {"ordinal/majority"}
    assert "| STAPLE | n/a |" in table.to_markdown()


def test_metric_table_rejects_bad_input():
    with pytest.raises(TypeError, match="runs"):
        tables.metric_results_table([1, 2], "mr_ece")
    with pytest.raises(ValueError, match="metric"):
        tables.metric_results_table(HAND_MADE, "")


def test_config_validation_and_plan():
    spec = DatasetSpec("synthetic")
    with pytest.raises(ValueError, match="methods"):
        ExperimentConfig(datasets=[spec], methods=("soft", "nope"))
    with pytest.raises(ValueError, match="datasets"):
        ExperimentConfig(datasets=[])
    with pytest.raises(ValueError, match="RPS"):
        ExperimentConfig(datasets=[spec], rps_weights=(-1.0,))
    with pytest.raises(ValueError, match="dataset"):
        DatasetSpec.parse("no_such_dataset")
    with pytest.raises(ValueError, match="preset"):
        preset_config("nope")
    cfg = ExperimentConfig(datasets=[spec], methods=("soft", "ordinal"), rps_weight=1.0, rps_weights=(0, 1, 2))
    main, sweep = plan_runs(cfg)
    assert [r.key for r in main] == ["soft", "ordinal"]
    assert sweep[1.0] is main[1]  # the main ordinal run is reused by the sweep
    assert [sweep[w].key for w in (0.0, 2.0)] == ["ordinal@0", "ordinal@2"]
    assert DatasetSpec.parse("refuge:cup", "/data").key == "refuge:cup"
    from pathlib import Path

    from orcal.experiment import Run
    from orcal.experiment.runs import run_files as _run_files

    files = [_run_files(Path("d"), Run("ordinal", w, f"ordinal@{w:g}")) for w in (0.0, 0.5, 2.0)]
    for kind in ("json", "stats", "case"):
        assert len({f[kind] for f in files}) == 3, kind  # weights that differ after a dot never share a file


def _tiny(out, **kw) -> ExperimentConfig:
    opts = {"n": 12, "R": 3, "shape": (16, 16), "test_fraction": 0.34, "val_fraction": 0.1}
    settings = dict(out=str(out), methods=("median", "ordinal"), arch="unet-small", encoder="none", epochs=1,
                    batch_size=4, max_steps=1, n_boot=20, rps_weights=(0.5, 1.0), progress=False, device="cpu")
    settings.update(kw)
    return ExperimentConfig(datasets=[DatasetSpec("synthetic", options=opts, label="tiny")], **settings)


def test_tiny_experiment_end_to_end_and_resume(tmp_path, monkeypatch):
    out = tmp_path / "exp"
    results = run_experiment(_tiny(out), log=lambda *a: None)
    for name in ("table1_mr_ece.md", "table1_mr_ece.csv", "table2_auc.md", "table2_auc.csv", "table3_dice.csv",
                 "metrics.csv", "results.json", "report.md", "sweep_tiny.md", "summary_tiny.md"):
        assert (out / name).is_file(), name
    for fig in ("reliability_tiny.png", "agreement_tiny.png", "qualitative_tiny.png", "sweep_tiny.png"):
        assert (out / "figures" / fig).stat().st_size > 1000, fig
    saved = json.loads((out / "results.json").read_text())
    base = {"median", "ordinal/majority", "ordinal/expected"}
    assert set(saved["runs"]["tiny"]) == base | {f"{r}+ts" for r in base}  # temperature scaling is on by default
    for summary in saved["runs"]["tiny"].values():
        assert 0.0 <= summary["mr_ece"]["mean"] <= 1.0 and summary["mr_ece"]["std"] >= 0.0
        assert set(summary["auc"]) >= {"mean", "std", "low", "high", "value"}
    assert set(saved["sweeps"]["tiny"]) == {"0.5", "1"}
    table1 = (out / "table1_mr_ece.md").read_text()
    assert "ORC (majority)" in table1 and "ORC (expected)" in table1 and "**" in table1
    assert "Table 1" in (out / "report.md").read_text()

    # a rerun reuses every finished run: training is never called
    import orcal.training.loop

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(orcal.training.loop, "train", no_training)
    again = run_experiment(_tiny(out), log=lambda *a: None)
    assert again["runs"] == results["runs"]
    # --force, or a changed setting, trains again
    with pytest.raises(AssertionError, match="trained again"):
        run_experiment(_tiny(out, force=True), log=lambda *a: None)
    with pytest.raises(AssertionError, match="trained again"):
        run_experiment(_tiny(out, lr=1e-2), log=lambda *a: None)


def _experiment_args(argv: list[str]) -> argparse.Namespace:
    from orcal.commands import experiment

    parser = argparse.ArgumentParser()
    experiment.configure(parser)
    return parser.parse_args(argv)


def test_command_line_builds_the_config(tmp_path):
    from orcal.commands.experiment import build_config

    cfg = build_config(_experiment_args(["--dataset", "synthetic", "--option", "n=20", "--methods", "soft,ordinal",
                                         "--rps-weights", "0,0.5", "--image-size", "24", "--epochs", "2",
                                         "--out", str(tmp_path)]))
    assert cfg.methods == ("soft", "ordinal") and cfg.rps_weights == (0.0, 0.5) and cfg.epochs == 2
    assert cfg.datasets[0].options == {"n": 20, "shape": (24, 24)}
    ct = build_config(_experiment_args(["--dataset", "curvas:pancreas", "--root", "/ct", "--image-size", "16"]))
    assert ct.patch_size == 16  # a cube for volumes, a square for images: the data's dimensions decide
    ct = build_config(_experiment_args(["--dataset", "curvas:pancreas", "--root", "/ct", "--patch-size", "32,32,16",
                                        "--patches-per-image", "4"]))
    assert ct.patch_size == (32, 32, 16) and ct.train_options == {"patches_per_image": 4}
    lidc = build_config(_experiment_args(["--preset", "lidc", "--root", "/somewhere", "--crop", "48"]))
    assert lidc.datasets[0].name == "lidc_slices" and lidc.datasets[0].root == "/somewhere"
    assert lidc.datasets[0].options["crop"] == 48
    paper = build_config(_experiment_args(["--preset", "paper", "--root", "/p", "--encoder-weights", "none",
                                           "--sigma", "2"]))
    assert paper.encoder_weights is None and paper.fusion_options == {"sigma": 2.0}
    assert [d.key for d in paper.datasets] == ["CoCaHis", "REFUGE-DISC", "REFUGE-CUP", "LongCIU"]
    assert paper.datasets[1].root == "/p/refuge" and paper.datasets[2].task == "cup"
    seeded = build_config(_experiment_args(["--dataset", "synthetic", "--dataset", "lidc", "--name", "A",
                                            "--name", "QUBIQ prostate", "--seeds", "0,1,2", "--select-on-val",
                                            "--no-temperature-scaling"]))
    assert seeded.seed_list == (0, 1, 2) and seeded.select_on_val and not seeded.temperature_scaling
    assert seeded.sigmas == (0.5, 1.0, 2.0) and seeded.rps_weights == (0.25, 0.5, 1, 2, 4, 8, 16)  # default grids
    assert [d.key for d in seeded.datasets] == ["A", "QUBIQ prostate"]
    with pytest.raises(ValueError, match="--name once per --dataset"):
        build_config(_experiment_args(["--dataset", "synthetic", "--dataset", "lidc", "--name", "A"]))
    with pytest.raises(ValueError, match="seeds must be distinct"):
        build_config(_experiment_args(["--dataset", "synthetic", "--seeds", "1,1"]))
    with pytest.raises(ValueError, match="preset"):
        build_config(_experiment_args(["--preset", "lidc", "--dataset", "synthetic"]))
    with pytest.raises(ValueError, match="root"):
        build_config(_experiment_args(["--dataset", "synthetic", "--dataset", "lidc_slices",
                                       "--root", "a", "--root", "b", "--root", "c"]))


def test_demo_command_runs_and_prints_both_tables(tmp_path, capsys):
    from orcal.cli import main

    code = main(["demo", "--out", str(tmp_path / "demo"), "--samples", "12", "--image-size", "16",
                 "--methods", "soft,ordinal", "--epochs", "1", "--max-steps", "1", "--n-boot", "10", "--quiet",
                 "--device", "cpu"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "Table 1" in printed and "Table 2" in printed and "ORC (expected)" in printed
    findings = printed.split("Table 2")[1]  # the findings come after the tables
    assert "has the best MR-ECE" in findings or "no row has a better MR-ECE" in findings
    assert (tmp_path / "demo" / "report.md").is_file()


@pytest.mark.slow
def test_demo_results_are_identical_across_runs(tmp_path, capsys):
    """Two runs of a small demo on one machine give the same numbers, to the last bit (only times differ)."""
    from orcal.cli import main

    def numbers(out):
        results = json.loads((out / "results.json").read_text())
        for key in ("timings", "compute_seconds", "total_seconds", "command"):
            results.pop(key)
        return results

    args = ["--samples", "16", "--image-size", "16", "--methods", "soft,staple,ordinal", "--epochs", "2",
            "--max-steps", "2", "--n-boot", "20", "--quiet", "--device", "cpu"]
    assert main(["demo", "--out", str(tmp_path / "a"), *args]) == 0
    assert main(["demo", "--out", str(tmp_path / "b"), *args]) == 0
    a, b = numbers(tmp_path / "a"), numbers(tmp_path / "b")
    assert a["runs"] and a == b


# --- seeds, the validation selection, temperature scaling and the findings (SPEC §5.1) ----------------------

def _stats(k, p, R=3):
    import orcal

    return orcal.calibration_stats(p, k, num_raters=R)


def test_seed_summary_aggregates_over_seeds():
    import numpy as np
    import torch

    from orcal.metrics import comparison, pooled

    g = torch.Generator().manual_seed(0)
    k = torch.randint(0, 4, (12, 8, 8), generator=g, dtype=torch.uint8)
    seeds = [_stats(k, (k / 3 + s * torch.rand(12, 8, 8, generator=g)).clamp(0, 1)) for s in (0.1, 0.3, 0.2)]
    summary = comparison.seed_summary(seeds, n_boot=50, seed=3)
    values = [pooled.calibration_metrics(s)["mr_ece"] for s in seeds]
    m = summary["mr_ece"]
    assert m["seeds"] == pytest.approx(values) and m["value"] == pytest.approx(np.mean(values))
    assert m["seed_std"] == pytest.approx(np.std(values, ddof=1))
    # the bootstrap of the seed mean: every seed resampled with the same draws, then averaged
    samples = torch.stack([pooled.bootstrap_samples(s, n_boot=50, seed=3)["mr_ece"] for s in seeds]).mean(0)
    assert m["mean"] == pytest.approx(float(samples.mean())) and m["low"] <= m["mean"] <= m["high"]
    # one seed is the bootstrap of SPEC §5, with no seed spread
    one = comparison.seed_summary(seeds[:1], n_boot=50, seed=3)["mr_ece"]
    plain = pooled.bootstrap(seeds[0], n_boot=50, seed=3)["mr_ece"]
    assert {k: one[k] for k in plain} == pytest.approx(plain) and math.isnan(one["seed_std"])
    # the table shows the seed mean ± the seed std and the bootstrap interval
    table = tables.metric_results_table({"d": {"soft": summary}}, "mr_ece", title="T")
    assert table.n_seeds == 3 and "mean over 3 seeds" in table.to_markdown()
    assert table.cell_text("soft", "d") == f"{m['value']:.4f} ± {m['seed_std']:.4f} [{m['low']:.4f}, {m['high']:.4f}]"
    with pytest.raises(ValueError, match="same test images"):
        comparison.seed_summary([seeds[0], _stats(k[:5], k[:5] / 3)])


def test_paired_difference_cancels_the_images_and_judges_the_noise():
    import torch

    from orcal.metrics import comparison

    g = torch.Generator().manual_seed(1)
    k = torch.randint(0, 4, (40, 8, 8), generator=g, dtype=torch.uint8)
    noise = torch.rand(40, 8, 8, generator=g)
    a = [_stats(k, (k / 3 + 0.10 * noise).clamp(0, 1)), _stats(k, (k / 3 + 0.12 * noise).clamp(0, 1))]
    b = [_stats(k, (k / 3 + 0.40 * noise).clamp(0, 1)), _stats(k, (k / 3 + 0.45 * noise).clamp(0, 1))]
    d = comparison.paired_difference(a, b, n_boot=100)["mr_ece"]
    assert d["diff"] < 0 and d["high"] < 0 and all(x < 0 for x in d["seed_diffs"])
    assert comparison.exceeds_noise(d)
    same = comparison.paired_difference(a, a, n_boot=100)["mr_ece"]
    assert same["diff"] == 0 and same["low"] == 0 == same["high"] and not comparison.exceeds_noise(same)
    # seeds that disagree on the sign, or an interval holding 0, are within the noise
    assert not comparison.exceeds_noise({"diff": -0.01, "low": -0.02, "high": -0.005, "seed_diffs": [-0.03, 0.01]})
    assert not comparison.exceeds_noise({"diff": -0.01, "low": -0.02, "high": 0.004, "seed_diffs": [-0.01]})
    with pytest.raises(ValueError, match="same seeds"):
        comparison.paired_difference(a, b[:1], n_boot=10)


def _record(val: dict[str, float], readouts=("sigmoid",)) -> dict:
    return {"readouts": {r: {"val": {"mr_ece": val[r]}} for r in readouts} |
            {f"{r}+ts": {"val": {"mr_ece": val[r] / 2}} for r in readouts}}


def test_selection_takes_the_argmin_of_validation_mr_ece():
    from orcal.experiment import candidate_runs, select_rows

    cfg = ExperimentConfig(datasets=[DatasetSpec("synthetic")], methods=("median", "svls", "ordinal"),
                           select_on_val=True, sigmas=(0.5, 1.0, 2.0), rps_weights=(0.5, 1.0, 2.0))
    cands = candidate_runs(cfg)
    assert [r.sigma for r in cands["svls"]] == [0.5, 1.0, 2.0] and cands["svls"][1].key == "svls"  # σ = 1 is main
    assert [r.rps_weight for r in cands["ordinal"]] == [0.5, 1.0, 2.0] and len(cands["median"]) == 1
    svls_val = {0.5: 0.03, 1.0: 0.02, 2.0: 0.01}
    ordinal_val = {0.5: (0.05, 0.02), 1.0: (0.04, 0.03), 2.0: (0.06, 0.01)}  # (majority, expected)
    records = {"median": _record({"sigmoid": 0.1})}
    records |= {r.key: _record({"sigmoid": svls_val[r.sigma]}) for r in cands["svls"]}
    records |= {r.key: _record(dict(zip(("majority", "expected"), ordinal_val[r.rps_weight])), ("majority", "expected"))
                for r in cands["ordinal"]}
    chosen = select_rows(cfg, cands, records)
    assert chosen["svls"]["value"] == 2.0 and chosen["svls"]["run"] == "svls@sigma=2"
    assert chosen["ordinal/majority"]["value"] == 1.0 and chosen["ordinal/majority"]["run"] == "ordinal"
    assert chosen["ordinal/expected"]["value"] == 2.0 and chosen["ordinal/expected"]["run"] == "ordinal@2"
    assert chosen["ordinal/expected+ts"]["run"] == "ordinal@2"  # a scaled row follows its readout's choice
    assert chosen["median"]["run"] == "median" and chosen["median"]["parameter"] is None
    assert chosen["svls"]["candidates"] == {"0.5": 0.03, "1": 0.02, "2": 0.01}
    # without select_on_val every row is the main run
    fixed = cfg_with(cfg, select_on_val=False)
    plain = select_rows(fixed, candidate_runs(fixed), records)
    assert {c["run"] for c in plain.values()} == {"median", "svls", "ordinal"}


def test_seeds_and_selection_end_to_end(tmp_path):
    out = tmp_path / "seeds"
    cfg = _tiny(out, methods=("svls", "ordinal"), seeds=(0, 1), select_on_val=True, sigmas=(0.5, 1.0),
                rps_weights=(0.5, 1.0))
    results = run_experiment(cfg, log=lambda *a: None)
    saved = json.loads((out / "results.json").read_text())
    first = {p.name for p in (out / "runs" / "tiny" / "seed0").glob("*.json")}
    assert first == {"svls.json", "svls@sigma_0.5.json", "ordinal.json", "ordinal@0.5.json"}
    selection = saved["selection"]["tiny"]
    for row in ("svls", "ordinal/majority", "ordinal/expected"):
        c = selection[row]
        assert c["candidates"][f"{c['value']:g}"] == min(c["candidates"].values())  # the argmin on val
    second = {p.name for p in (out / "runs" / "tiny" / "seed1").glob("*.json")}
    assert second == {f"{safe(selection[r]['run'])}.json" for r in selection}  # only the chosen settings
    row = saved["runs"]["tiny"]["svls"]["mr_ece"]
    assert len(row["seeds"]) == 2 and row["value"] == pytest.approx(sum(row["seeds"]) / 2)
    assert saved["comparisons"]["tiny"]["reference"] == "ordinal/majority"  # the paper's readout heads ORC
    assert saved["oracles"]["tiny"]["oracle/expected"]["mr_ece"]["value"] == pytest.approx(0.0, abs=1e-6)
    assert saved["oracles"]["tiny"]["oracle/majority"]["mr_ece"]["value"] > 0  # the majority readout's floor
    assert saved["datasets"]["tiny"]["bootstrap_units"]["by"] == "image"  # synthetic images share no patient
    assert "The metrics' floor" in (out / "report.md").read_text()
    assert set(saved["comparisons"]["tiny"]["leads"]) == {"mr_ece", "auc", "dice"}
    assert all(len(t) == 2 and all(x > 0 for x in t) for t in saved["temperatures"]["tiny"].values())
    text = (out / "report.md").read_text()
    for part in ("## Findings", "## Paired comparisons", "## Settings chosen on the validation split",
                 "## Fitted temperatures", "mean over 2 seeds", "SVLS + TS", "| 16 × 16 | 1 |"):
        assert part in text, part
    assert "|  |" not in text and "| `` |" not in text  # no empty cells
    assert results["runs"] == saved["runs"]


def safe(key: str) -> str:
    from orcal.experiment.runs import safe_name

    return safe_name(key)


def _findings_results(best_gap: tuple[float, float, float]) -> dict:
    def summary(mr_ece):
        return {"mr_ece": {"value": mr_ece}, "auc": {"value": 0.9}, "dice": {"value": 0.5}}

    diff, low, high = best_gap
    lead = {"best": "soft", "runner_up": "ordinal/expected", "diff": diff, "low": low, "high": high,
            "seed_diffs": [diff, diff]}
    return {"settings": {"seeds": [0, 1], "fraction": 0.6, "arch": "unet-small", "device": "cpu"},
            "runs": {"D": {"soft": summary(0.010), "ordinal/expected": summary(0.012),
                           "ordinal/majority": summary(0.02), "soft+ts": summary(0.009)}},
            "comparisons": {"D": {"reference": "ordinal/expected", "paired": {}, "leads": {"mr_ece": lead}}},
            "temperatures": {"D": {"soft+ts": [1.2, 1.4]}}, "timings": {"D": {"soft": {"steps": 40}}}}


def test_findings_name_the_best_and_say_when_intervals_overlap():
    from orcal.experiment.findings import findings

    overlap = findings(_findings_results((-0.002, -0.005, 0.001)))
    # a lead inside the noise names no winner: the two rows are reported as tied
    assert "has the best" not in overlap and "**" not in overlap.split("Caveats")[0]
    assert ("no row has a better MR-ECE than the others beyond the noise: the two lowest, Soft Consensus (0.0100) "
            "and ORC (expected) (0.0120), differ by 0.0020") in overlap
    assert "interval [-0.0010, 0.0050], which includes 0: within the noise" in overlap
    seeds_disagree = _findings_results((-0.002, -0.003, -0.001))
    seeds_disagree["comparisons"]["D"]["leads"]["mr_ece"]["seed_diffs"] = [-0.002, 0.001]
    assert "has the best" not in findings(seeds_disagree)
    clear = findings(_findings_results((-0.002, -0.003, -0.001)))
    assert "**Soft Consensus** has the best MR-ECE (0.0100)" in clear
    assert "lead over ORC (expected) (0.0120) is 0.0020" in clear
    assert "[0.0010, 0.0030]: larger than the bootstrap and seed noise" in clear
    one_seed = _findings_results((-0.002, -0.003, -0.001))
    one_seed["comparisons"]["D"]["leads"]["mr_ece"]["seed_diffs"] = [-0.002]
    assert "larger than the bootstrap noise (one seed: the seed noise is not measured)" in findings(one_seed)
    assert "lowers the test MR-ECE of 1 of 1 rows; most for Soft Consensus 0.0100 → 0.0090, T = 1.30" in clear
    assert "2 training seeds" in clear and "40 optimiser steps" in clear and "P(k ≥ m)" in clear
    assert "biased upward" in clear


def test_3d_experiment_trains_on_patches_and_evaluates_whole_volumes(tmp_path):
    opts = {"n": 10, "R": 3, "shape": (16, 16, 12), "test_fraction": 0.3, "val_fraction": 0.2}
    cfg = ExperimentConfig(datasets=[DatasetSpec("synthetic", options=opts)], methods=("soft", "ordinal"),
                           arch="unet3d", model_options={"base_channels": 4}, patch_size=8, epochs=1, max_steps=1,
                           batch_size=2, n_boot=10, out=str(tmp_path / "e3"), progress=False, device="cpu",
                           train_options={"patches_per_image": 2})
    results = run_experiment(cfg, log=lambda *a: None)
    key = "Synthetic (R=3)"
    assert results["datasets"][key]["image_shape"] == [16, 16, 12]
    assert results["datasets"][key]["image_size_range"] == [[16, 16], [16, 16], [12, 12]]
    assert all(0 <= s["mr_ece"]["value"] <= 1 for s in results["runs"][key].values())
    run = json.loads((tmp_path / "e3" / "runs" / safe(key) / "seed0" / "soft.json").read_text())
    assert run["steps"] == 1 and run["readouts"]["sigmoid"]["n_images"] == 3  # whole test volumes, one row each


def test_calibration_losses_run_in_an_experiment(tmp_path):
    pytest.importorskip("monai")  # NACL calls MONAI
    out = tmp_path / "losses"
    cfg = _tiny(out, methods=("calibration-losses",), rps_weights=(), temperature_scaling=False, n_boot=5)
    run_experiment(cfg, log=lambda *a: None)
    saved = json.loads((out / "results.json").read_text())
    assert set(saved["runs"]["tiny"]) == {"nacl", "hl1_ace", "label_smoothing", "focal"}
    for name, value in (("nacl", 0.1), ("hl1_ace", 1.0), ("label_smoothing", 0.1), ("focal", 2.0)):
        record = json.loads((out / "runs" / "tiny" / "seed0" / f"{name}.json").read_text())
        assert record["value"] == value and 0 <= saved["runs"]["tiny"][name]["mr_ece"]["mean"] <= 1
    table1 = (out / "table1_mr_ece.md").read_text()
    for label in ("NACL", "hL1-ACE", "Label Smoothing", "Focal"):
        assert f"| {label} |" in table1, label
