"""The bootstrap over groups of images (SPEC §5): patients, cases or volumes resampled whole."""

from __future__ import annotations

import math

import pytest
import torch

import orcal
from orcal.metrics import comparison
from orcal.metrics.pooled import bootstrap, bootstrap_samples, group_index


def _correlated(groups: int = 20, per: int = 8, seed: int = 0):
    """Statistics of ``groups`` x ``per`` images whose miscalibration is shared within a group (a patient's
    slices), and the group id of each image."""
    g = torch.Generator().manual_seed(seed)
    n = groups * per
    k = torch.randint(0, 4, (n, 16, 16), generator=g, dtype=torch.uint8)
    shift = (torch.rand(groups, generator=g) - 0.5).repeat_interleave(per)[:, None, None] * 0.6
    p = (k / 3 + shift + 0.05 * torch.rand(n, 16, 16, generator=g)).clamp(0, 1)
    return orcal.calibration_stats(p, k, num_raters=3), [f"patient-{i // per}" for i in range(n)]


def _width(summary: dict) -> float:
    return summary["high"] - summary["low"]


def test_group_bootstrap_is_wider_for_correlated_images():
    stats, groups = _correlated()
    by_image = bootstrap(stats, n_boot=300, seed=1)["mr_ece"]
    by_group = bootstrap(stats, n_boot=300, seed=1, groups=groups)["mr_ece"]
    assert by_group["value"] == by_image["value"]  # the full-sample value does not depend on the units
    assert _width(by_group) > 1.5 * _width(by_image)


def test_one_image_per_group_is_the_image_bootstrap():
    stats, _ = _correlated(groups=30, per=1)
    ids = [f"case-{i:02d}" for i in range(30)]
    a = bootstrap_samples(stats, n_boot=50, seed=4)
    b = bootstrap_samples(stats, n_boot=50, seed=4, groups=ids)
    for key in a:
        torch.testing.assert_close(a[key], b[key], equal_nan=True)


def test_groups_numbered_by_first_appearance_and_checked():
    assert group_index(["b", "a", "b", "c"], 4).tolist() == [0, 1, 0, 2]
    assert group_index(None, 3) is None
    with pytest.raises(ValueError, match="one id per image"):
        group_index(["a", "b"], 3)


def test_group_resample_draws_whole_groups():
    # two groups: one all-foreground and well calibrated, one where every prediction is off by 0.5;
    # a resample of one group (count=1) holds one of them whole, so MR-ECE is 0 or 0.5, never between
    k = torch.tensor([3, 3, 0, 0], dtype=torch.uint8)[:, None, None].expand(4, 4, 4).contiguous()
    p = torch.tensor([1.0, 1.0, 0.5, 0.5])[:, None, None].expand(4, 4, 4).contiguous()
    stats = orcal.calibration_stats(p, k, num_raters=3)
    samples = bootstrap_samples(stats, n_boot=40, count=1, seed=0, groups=["x", "x", "y", "y"])["mr_ece"]
    assert set(samples.round(decimals=6).tolist()) == {0.0, 0.5}


def test_paired_difference_by_group_is_wider():
    _, groups = _correlated()
    # b: the same labels, predictions shifted per group by a different amount
    g = torch.Generator().manual_seed(7)
    k = torch.randint(0, 4, (160, 16, 16), generator=g, dtype=torch.uint8)
    shift = (torch.rand(20, generator=g) - 0.5).repeat_interleave(8)[:, None, None] * 0.6
    a = orcal.calibration_stats((k / 3 + 0.02).clamp(0, 1), k, num_raters=3)
    b = orcal.calibration_stats((k / 3 + shift).clamp(0, 1), k, num_raters=3)
    image = comparison.paired_difference([a], [b], n_boot=300, seed=2)["mr_ece"]
    group = comparison.paired_difference([a], [b], n_boot=300, seed=2, groups=groups)["mr_ece"]
    assert math.isclose(image["diff"], group["diff"])
    assert _width(group) > 1.5 * _width(image)
    summary = comparison.seed_summary([b], n_boot=300, seed=2, groups=groups)["mr_ece"]
    assert _width(summary) > _width(comparison.seed_summary([b], n_boot=300, seed=2)["mr_ece"])


def test_case_groups_of_evaluate():
    from orcal.evaluate import case_groups

    ids = ["LIDC-IDRI-0001/nodule-1/slice-3", "LIDC-IDRI-0001/nodule-2/slice-1", "LIDC-IDRI-0002/nodule-1/slice-1"]
    assert case_groups(ids, "image") is None
    assert case_groups(ids, "auto") is None  # a rater folder names no groups
    assert case_groups(ids, "auto", dict(zip(ids, "aab"))) == ["a", "a", "b"]
    assert case_groups(ids, r"^(LIDC-IDRI-\d+)") == ["LIDC-IDRI-0001", "LIDC-IDRI-0001", "LIDC-IDRI-0002"]
    with pytest.raises(ValueError, match="does not match case"):
        case_groups(ids + ["other"], r"^(LIDC-IDRI-\d+)")
    with pytest.raises(ValueError, match="regular expression"):
        case_groups(ids, "(")


def test_experiment_groups_follow_the_statistics_rows():
    from types import SimpleNamespace

    from orcal.experiment.data import test_groups

    class Data(list):
        ids = ["a", "b", "c"]
        groups = ["p1", "p1", "p2"]

    data = Data([0, 1, 2])
    assert test_groups(data, SimpleNamespace(bootstrap_by="group")) == ["p1", "p1", "p2"]
    assert test_groups(data, SimpleNamespace(bootstrap_by="group"), order=["c", "a", "b"]) == ["p2", "p1", "p1"]
    assert test_groups(data, SimpleNamespace(bootstrap_by="image")) is None
    assert test_groups([0, 1], SimpleNamespace(bootstrap_by="group")) is None  # no groups known


def test_evaluate_resamples_the_groups_it_is_given(tmp_path):
    pytest.importorskip("nibabel")
    from test_evaluate import make_folder

    from orcal.evaluate import evaluate

    pred, raters, _ = make_folder(tmp_path, n=6)
    image = evaluate(pred, tmp_path / "a", raters=raters, n_boot=50, progress=False)
    group = evaluate(pred, tmp_path / "b", raters=raters, n_boot=50, progress=False, group_by=r"^case")
    assert image["bootstrap_units"] == {"by": "image", "n": 6}  # a rater folder names no groups
    assert group["bootstrap_units"] == {"by": "group", "n": 1}  # every case id matches "case": one group
    assert group["metrics"] == image["metrics"]
    # one group drawn whole: every resample is the whole test set, so the interval has no width
    ece = group["bootstrap"]["mr_ece"]
    assert ece["low"] == pytest.approx(ece["high"]) == pytest.approx(image["metrics"]["mr_ece"])
    assert image["bootstrap"]["mr_ece"]["high"] > image["bootstrap"]["mr_ece"]["low"]
    assert "the 1 groups" in (tmp_path / "b" / "metrics.md").read_text()
