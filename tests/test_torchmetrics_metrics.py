"""orcal's torchmetrics classes with the real torchmetrics: pooled values, the forward idiom, collections, plots."""

from __future__ import annotations

import pytest
import torch

torchmetrics = pytest.importorskip("torchmetrics")

from orcal.metrics import (  # noqa: E402
    MultiRaterAUROC,
    MultiRaterBrier,
    MultiRaterCalibration,
    MultiRaterCalibrationMetric,
    MultiRaterDice,
    MultiRaterECE,
)

SCALAR_CLASSES = {MultiRaterECE: "mr_ece", MultiRaterAUROC: "auc", MultiRaterBrier: "brier", MultiRaterDice: "dice"}


def _batches(n=3, B=2, R=3, shape=(12, 10), seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        p = torch.rand(B, 1, *shape, generator=g) ** (1 + i)  # batches differ in calibration and size of pool
        masks = (torch.rand(B, R, *shape, generator=g) < p.clamp(0.05, 0.95)).to(torch.uint8)
        out.append((p, masks))
    return out


def _reference(batches, **options):
    ref = MultiRaterCalibration(**options)
    for p, m in batches:
        ref.update(p, m)
    return ref.compute()


@pytest.mark.parametrize("cls", list(SCALAR_CLASSES))
def test_scalar_metric_is_pooled_and_says_which_way_is_better(cls):
    key = SCALAR_CLASSES[cls]
    batches = _batches()
    metric = cls()
    per_batch = [float(metric(p, m)) for p, m in batches]  # the forward idiom
    pooled = float(metric.compute())
    assert pooled == pytest.approx(_reference(batches)[key], rel=1e-5, abs=1e-7)
    for (p, m), value in zip(batches, per_batch):  # forward returns the batch's own value
        assert value == pytest.approx(_reference([(p, m)])[key], rel=1e-5, abs=1e-7)
    if key == "mr_ece":  # pooled, not a mean of batch values
        assert pooled != pytest.approx(sum(per_batch) / len(per_batch), rel=1e-3)
    assert metric.higher_is_better is (key in ("auc", "dice"))
    assert metric.compute().ndim == 0
    metric.reset()
    assert int(metric.counts.sum()) == 0


def test_ece_norms_and_vote_count_targets():
    batches = _batches()
    ref = _reference(batches)
    for norm, key in (("l1", "mr_ece"), ("l2", "mr_ece_l2"), ("max", "mr_mce")):
        metric = MultiRaterECE(norm=norm, num_raters=3)
        for p, m in batches:
            metric.update(p, m.sum(1, keepdim=True))  # channel-first k, as MONAI and nnU-Net hold it
        assert float(metric.compute()) == pytest.approx(ref[key], rel=1e-5), norm
    with pytest.raises(ValueError, match="norm"):
        MultiRaterECE(norm="l3")
    logits = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    ordinal = MultiRaterECE(kind="ordinal", readout="expected", num_raters=3)
    ordinal.update(logits, batches[0][1][:, :, :8, :8].sum(1))
    direct = MultiRaterCalibration(kind="ordinal", readout="expected")
    direct.update(logits, batches[0][1][:, :, :8, :8])
    assert float(ordinal.compute()) == pytest.approx(direct.compute()["mr_ece"], rel=1e-5)


def test_collection_shares_one_statistics_state():
    batches = _batches()
    collection = torchmetrics.MetricCollection({"ece": MultiRaterECE(), "auc": MultiRaterAUROC(),
                                                "brier": MultiRaterBrier(), "dice": MultiRaterDice()})
    for p, m in batches:
        collection.update(p, m)
    assert len(collection.compute_groups) == 1  # one calibration_stats call per batch for all four
    values = collection.compute()
    ref = _reference(batches)
    for name, key in (("ece", "mr_ece"), ("auc", "auc"), ("brier", "brier"), ("dice", "dice")):
        assert float(values[name]) == pytest.approx(ref[key], rel=1e-5), name


def test_dict_metric_for_log_dict():
    batches = _batches()
    metric = MultiRaterCalibrationMetric()
    for p, m in batches:
        metric.update(p, m)
    values = metric.compute()
    ref = _reference(batches)
    assert metric.higher_is_better is None
    for key in ("mr_ece", "mr_ece_l2", "mr_mce", "auc", "brier", "nll", "dice"):
        assert float(values[key]) == pytest.approx(ref[key], rel=1e-5, abs=1e-7), key


def test_plot_draws_the_reliability_diagram(tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    metric = MultiRaterECE()
    for p, m in _batches():
        metric.update(p, m)
    fig, ax = metric.plot()
    curve = [line for line in ax.get_lines() if "MR-ECE" in str(line.get_label())]
    assert len(curve) == 1
    assert f"MR-ECE {float(metric.compute()):.4f}" in curve[0].get_label()  # the legend shows the metric
    fig.savefig(tmp_path / "reliability.png")
    assert (tmp_path / "reliability.png").stat().st_size > 0
    fig2, ax = metric.plot([metric.compute(), metric.compute()])  # torchmetrics' plot of values
    assert ax is not None
    import matplotlib.pyplot as plt

    plt.close(fig)
    plt.close(fig2)


@pytest.mark.cuda
def test_states_and_values_stay_on_the_gpu():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    batches = _batches()
    metric = MultiRaterECE().to("cuda")
    for p, m in batches:
        value = metric(p.cuda(), m.cuda())
    assert metric.counts.device.type == "cuda" and value.device.type == "cuda"
    assert metric.compute().device.type == "cuda"
    assert float(metric.compute()) == pytest.approx(_reference(batches)["mr_ece"], rel=1e-5)


def test_several_structures_as_torchmetrics_averages():
    """num_structures with torchmetrics' average convention: micro pools the pairs, macro averages the
    structures, none gives one value per structure (SPEC §11)."""
    import orcal

    g = torch.Generator().manual_seed(4)
    C, R = 3, 3
    logits = torch.randn(4, C * (R + 1), 6, 7, generator=g)
    labels = torch.randint(0, C + 1, (4, R, 6, 7), generator=g)
    want = orcal.calibration_metrics(orcal.calibration_stats(logits, labels, kind="ordinal", num_structures=C))
    metrics = {avg: MultiRaterECE(kind="ordinal", num_structures=C, average=avg) for avg in ("micro", "macro", "none")}
    for m in metrics.values():
        m.update(logits[:2], labels[:2])
        m.update(logits[2:], labels[2:])
    assert float(metrics["micro"].compute()) == pytest.approx(want["mr_ece"], rel=1e-5)
    assert float(metrics["macro"].compute()) == pytest.approx(want["mr_ece/macro"], rel=1e-5)
    per = metrics["none"].compute()
    assert per.shape == (C,) and per.tolist() == pytest.approx([want[f"mr_ece/{c}"] for c in (1, 2, 3)], rel=1e-5)
    every = MultiRaterCalibrationMetric(kind="ordinal", num_structures=C)
    every.update(logits, labels)
    assert float(every.compute()["auc/2"]) == pytest.approx(want["auc/2"], rel=1e-5)
    with pytest.raises(ValueError, match="average"):
        MultiRaterECE(num_structures=C, average="weighted")
