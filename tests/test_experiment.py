"""The experiment driver, its tables and report, and the experiment / demo commands."""

from __future__ import annotations

import argparse
import csv
import io
import json
import math

import pytest

from orcal import report
from orcal.experiment import DatasetSpec, ExperimentConfig, plan_runs, preset_config, run_experiment


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
    t1 = report.metric_table(HAND_MADE, "mr_ece")
    assert t1.best == {"A": {"ordinal/expected"}, "B": {"soft", "ordinal/majority"}}  # lower is better; a tie
    md = t1.to_markdown()
    assert _row(md, "ORC (expected)")[0] == "**0.0500 ± 0.0100**"
    assert _row(md, "Median Consensus") == ["0.3000 ± 0.0100", "0.1200 ± 0.0100"]
    assert _row(md, "Soft Consensus")[1].startswith("**") and _row(md, "ORC (majority)")[1].startswith("**")
    t2 = report.metric_table(HAND_MADE, "auc")
    assert t2.best == {"A": {"ordinal/majority"}, "B": {"soft"}}  # higher is better
    rows = list(csv.DictReader(io.StringIO(t2.to_csv())))
    best = {(r["key"], col) for r in rows for col in ("A", "B") if r[f"{col}_best"] == "1"}
    assert best == {("ordinal/majority", "A"), ("soft", "B")}
    assert float(next(r for r in rows if r["key"] == "soft")["B_mean"]) == 0.75


def test_dataset_table_marks_the_best_of_each_metric():
    md = report.dataset_table(HAND_MADE, "B", ("mr_ece", "auc"))
    assert md.splitlines()[0] == "| Method | MR-ECE ↓ | AUC ↑ |"
    assert _row(md, "Soft Consensus") == ["**0.1100 ± 0.0100**", "**0.7500 ± 0.0100**"]
    assert _row(md, "Median Consensus") == ["0.1200 ± 0.0100", "0.7000 ± 0.0100"]
    with pytest.raises(ValueError, match="dataset"):
        report.dataset_table(HAND_MADE, "C")


def test_table_rows_in_paper_order_and_missing_cells():
    runs = {"A": {"ordinal/majority": _summary(0.2, 0.9), "random": _summary(0.3, 0.8),
                  "staple": {"mr_ece": {"mean": math.nan, "std": math.nan}}}}
    table = report.metric_table(runs, "mr_ece")
    assert table.rows == ["random", "staple", "ordinal/majority"]
    assert table.cell_text("staple", "A") == "n/a"
    assert table.best["A"] == {"ordinal/majority"}
    assert "| STAPLE | n/a |" in table.to_markdown()


def test_metric_table_rejects_bad_input():
    with pytest.raises(TypeError, match="runs"):
        report.metric_table([1, 2], "mr_ece")
    with pytest.raises(ValueError, match="metric"):
        report.metric_table(HAND_MADE, "")


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
    from orcal.experiment_runs import run_files as _run_files

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
    assert set(saved["runs"]["tiny"]) == {"median", "ordinal/majority", "ordinal/expected"}
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
    lidc = build_config(_experiment_args(["--preset", "lidc", "--root", "/somewhere", "--crop", "48"]))
    assert lidc.datasets[0].name == "lidc_slices" and lidc.datasets[0].root == "/somewhere"
    assert lidc.datasets[0].options["crop"] == 48
    paper = build_config(_experiment_args(["--preset", "paper", "--root", "/p", "--encoder-weights", "none",
                                           "--sigma", "2"]))
    assert paper.encoder_weights is None and paper.fusion_options == {"sigma": 2.0}
    assert [d.key for d in paper.datasets] == ["CoCaHis", "REFUGE-DISC", "REFUGE-CUP", "LongCIU"]
    assert paper.datasets[1].root == "/p/refuge" and paper.datasets[2].task == "cup"
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
    assert (tmp_path / "demo" / "report.md").is_file()
