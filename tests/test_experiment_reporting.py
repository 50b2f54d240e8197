"""What the experiment's report says beside its numbers: the metrics' floor (oracle rows), the binned AUC's
bound, the trained and + TS rows ranked apart, the λ grid, the targets of STAPLE and SIMPLE."""

from __future__ import annotations

import argparse
import math

import pytest
import torch

import orcal
from orcal.experiment import tables
from orcal.experiment.config import SELECTION_GRIDS
from orcal.experiment.oracle import majority_tail, oracle_stats, oracle_table
from orcal.metrics.pooled import calibration_metrics


def _summary(mr_ece: float, auc: float, bound: float = 0.002) -> dict:
    return {"mr_ece": {"value": mr_ece, "std": 0.01}, "auc": {"value": auc, "std": 0.01},
            "auc_error_bound": {"value": bound, "std": 0.0}, "dice": {"value": 0.5, "std": 0.01}}


def test_majority_tail_is_the_binomial_tail():
    assert majority_tail(3).tolist() == pytest.approx([0.0, 7 / 27, 20 / 27, 1.0])
    # R = 4: m = 3, so a tie of two votes is background; at rate 1/2 a majority has probability 5/16
    assert majority_tail(4)[2].item() == pytest.approx(5 / 16)
    assert majority_tail(4, majority=2)[2].item() == pytest.approx(11 / 16)


def test_oracle_floor_rows():
    g = torch.Generator().manual_seed(0)
    items = [{"masks": (torch.rand(4, 12, 12, generator=g) < torch.rand(1, 12, 12, generator=g)).to(torch.uint8)}
             for _ in range(5)]
    stats = oracle_stats(items)
    expected = calibration_metrics(stats["oracle/expected"])
    majority = calibration_metrics(stats["oracle/majority"])
    assert expected["mr_ece"] == pytest.approx(0.0, abs=1e-6)  # k/R is MR-ECE's perfect predictor
    assert majority["mr_ece"] > 0.01  # P(k >= m) is not the fraction of raters: a floor by construction
    assert stats["oracle/expected"].n_images == 5
    text = oracle_table({row: {m: {"value": v} for m, v in calibration_metrics(st).items()}
                         for row, st in stats.items()})
    assert "MR-ECE's floor" in text and "0.0000" in text
    assert oracle_stats([{"masks": torch.zeros(2, 4, 4, dtype=torch.uint8), "num_structures": 2}]) is None


def test_trained_and_scaled_rows_ranked_apart():
    runs = {"D": {"soft": _summary(0.02, 0.90), "median": _summary(0.05, 0.95),
                  "soft+ts": _summary(0.01, 0.90), "median+ts": _summary(0.03, 0.95)}}
    table = tables.metric_results_table(runs, "mr_ece", title="Table 1")
    assert table.best == {"D": {"soft", "soft+ts"}}  # the best trained row and the best + TS row
    assert "ranked apart" in table.to_markdown()


def test_auc_bound_printed_beside_the_auc():
    runs = {"D": {"soft": _summary(0.02, 0.90, bound=0.0021), "median": _summary(0.05, 0.95, bound=0.0)}}
    auc = tables.metric_results_table(runs, "auc", title="Table 2")
    assert auc.cell_text("soft", "D").endswith("(bound 0.0021)")
    assert "half the fraction of positive–negative pairs" in auc.to_markdown()
    assert "bound" not in tables.metric_results_table(runs, "mr_ece").cell_text("soft", "D")


def test_compare_rows_headline_and_families():
    from types import SimpleNamespace

    from orcal.experiment.selection import compare_rows

    g = torch.Generator().manual_seed(1)
    k = torch.randint(0, 4, (16, 8, 8), generator=g, dtype=torch.uint8)

    def stats(noise):
        return [orcal.calibration_stats((k / 3 + noise * torch.rand(16, 8, 8, generator=g)).clamp(0, 1), k,
                                        num_raters=3)]

    rows = {"soft": stats(0.3), "ordinal/majority": stats(0.5), "ordinal/expected": stats(0.2),
            "soft+ts": stats(0.05)}
    cfg = SimpleNamespace(n_boot=30, fraction=0.6, seed=0)
    out = compare_rows(rows, cfg, groups=[i // 4 for i in range(16)])
    assert out["reference"] == "ordinal/majority"  # the paper's readout is ORC's headline row
    assert out["leads"]["mr_ece"]["best"] == "ordinal/expected"  # ranked among the trained rows only
    assert "leads_ts" in out and "mr_ece" not in out["leads_ts"]  # one + TS row: nothing to rank


def test_lambda_grid_and_hard_targets():
    from orcal.commands import experiment

    assert SELECTION_GRIDS["rps_weight"] == (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
    parser = argparse.ArgumentParser()
    experiment.configure(parser)
    cfg = experiment.build_config(parser.parse_args(["--dataset", "synthetic", "--hard-targets",
                                                     "--bootstrap-by", "image"]))
    assert cfg.fusion_options == {"hard": True} and cfg.bootstrap_by == "image"
    assert "hard" not in experiment.build_config(parser.parse_args(["--dataset", "synthetic"])).fusion_options
    from orcal.training.objective import fusion_options

    assert fusion_options("staple", {"hard": True}) == {"hard": True}
    assert fusion_options("simple", {"hard": True}) == {"hard": True}
    assert fusion_options("soft", {"hard": True}) == {}
    with pytest.raises(ValueError, match="bootstrap_by"):
        orcal.experiment.ExperimentConfig(datasets=cfg.datasets, bootstrap_by="patient")


def test_report_states_the_choices():
    from orcal.experiment.report import _targets_text

    assert "soft targets" in _targets_text({})
    assert "hard targets" in _targets_text({"fusion_options": {"hard": True}})
    assert not math.isnan(majority_tail(5)[3].item())
