"""MultiRaterCalibration: equals the reference, torchmetrics on expanded pairs, chunking, mixed R, ranks."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

import orcal
from orcal.metrics import MultiRaterCalibration, agreement_table, bootstrap, pooled
from orcal.ops import reference

SCALARS = ("mr_ece", "mr_ece_l2", "mr_mce", "auc", "auc_error_bound", "brier", "nll", "dice")


def make_data(B=3, R=3, shape=(6, 7), seed=0, n_bins=None):
    """Probabilities (optionally away from the edges of ``n_bins`` bins) and rater masks correlated with them."""
    g = torch.Generator().manual_seed(seed)
    if n_bins is None:
        p = torch.rand(B, *shape, generator=g)
    else:  # strictly inside a bin: both binning conventions agree
        bins = torch.randint(n_bins, (B, *shape), generator=g)
        p = (bins + 0.05 + 0.9 * torch.rand(B, *shape, generator=g)) / n_bins
    masks = (torch.rand(B, R, *shape, generator=g) < p[:, None]).to(torch.uint8)
    return p, masks


def expand_pairs(p: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every voxel repeated once per rater with that rater's label."""
    R = masks.shape[1]
    return p[:, None].expand(-1, R, *p.shape[1:]).reshape(-1), masks.reshape(-1)


def test_equals_reference_and_ops():
    p, masks = make_data()
    metric = MultiRaterCalibration(per_image=True)
    metric.update(p, masks)
    out = metric.compute()
    ref = pooled.calibration_metrics(reference.calibration_stats(p, masks.sum(1), 3))
    public = orcal.calibration_metrics(orcal.calibration_stats(p, masks))
    for key in SCALARS:  # the same backend exactly; the reference to float32 accuracy (compiled kernels)
        assert out[key] == pytest.approx(public[key], rel=1e-12, abs=1e-12), key
        assert out[key] == pytest.approx(ref[key], rel=1e-6, abs=1e-9), key
    assert out["n_pairs"] == p.numel() * 3 and out["n_images"] == 3
    table = pooled.bin_table(reference.calibration_stats(p, masks.sum(1), 3))
    for key in ("count", "confidence", "accuracy"):
        np.testing.assert_allclose(out["bins"][key], table[key], equal_nan=True)
    assert metric.stats().n_images == 3


def test_equals_torchmetrics_on_expanded_pairs():
    tm = pytest.importorskip("torchmetrics")
    # torchmetrics bins with bucketize(right=True) over float32 linspace edges, p = 1 in an extra bin;
    # orcal uses min(floor(p * n_bins), n_bins - 1). Away from the bin edges both agree exactly.
    p, masks = make_data(B=4, R=5, shape=(9, 11), seed=1, n_bins=15)
    metric = MultiRaterCalibration(n_bins=15)
    metric.update(p, masks)
    out = metric.compute()
    pp, yy = expand_pairs(p, masks)
    for norm, key in (("l1", "mr_ece"), ("l2", "mr_ece_l2"), ("max", "mr_mce")):
        expected = tm.classification.BinaryCalibrationError(n_bins=15, norm=norm)(pp, yy.long())
        assert out[key] == pytest.approx(float(expected), abs=2e-6), norm


def test_auc_exact_and_streaming_against_sklearn():
    metrics = pytest.importorskip("sklearn.metrics")
    p, masks = make_data(B=2, R=4, shape=(8, 8), seed=2)
    p = (p * 20).round() / 20  # many ties
    metric = MultiRaterCalibration(exact_auc=True, auc_bins=64)
    metric.update(p[:1], masks[:1])
    metric.update(p[1:], masks[1:])
    out = metric.compute()
    pp, yy = expand_pairs(p, masks)
    expected = metrics.roc_auc_score(yy.numpy(), pp.numpy())
    assert out["auc"] == pytest.approx(expected, abs=1e-9)
    assert abs(out["auc_binned"] - expected) <= out["auc_error_bound"] + 1e-12


def test_chunked_updates_equal_one_update():
    p, masks = make_data(B=5, R=3, shape=(4, 5, 6), seed=3)
    one = MultiRaterCalibration(per_image=True, exact_auc=True)
    one.update(p, masks)
    chunked = MultiRaterCalibration(per_image=True, exact_auc=True)
    for i in range(0, 5, 2):
        chunked.update(p[i:i + 2], masks[i:i + 2])
    a, b = one.compute(), chunked.compute()
    for key in (*SCALARS, "n_pairs", "n_images"):
        assert a[key] == pytest.approx(b[key], rel=1e-12, abs=1e-12), key
    np.testing.assert_array_equal(a["agreement"]["count"], b["agreement"]["count"])
    np.testing.assert_allclose(a["agreement"]["confidence"], b["agreement"]["confidence"], rtol=1e-12)
    assert torch.equal(one.stats().n, chunked.stats().n)


def test_mixed_raters_equal_expanded_pairs():
    p1, m1 = make_data(B=2, R=2, shape=(5, 6), seed=4, n_bins=10)
    p2, m2 = make_data(B=1, R=7, shape=(5, 6), seed=5, n_bins=10)
    metric = MultiRaterCalibration(n_bins=10, exact_auc=True)
    metric.update(p1, m1)
    metric.update(p2, m2.sum(1).to(torch.uint8), num_raters=7)  # vote counts this time
    out = metric.compute()
    pairs = [expand_pairs(p1, m1), expand_pairs(p2, m2)]
    pp = torch.cat([q for q, _ in pairs]).double()
    yy = torch.cat([y for _, y in pairs]).double()
    b = torch.clamp(torch.floor(pp * 10), 0, 9).long()
    gap = sum(abs(float(pp[b == i].sum() - yy[b == i].sum())) for i in range(10))
    assert out["mr_ece"] == pytest.approx(gap / pp.numel(), rel=1e-9)
    assert out["n_pairs"] == pp.numel()
    sk = pytest.importorskip("sklearn.metrics")
    assert out["auc"] == pytest.approx(sk.roc_auc_score(yy.numpy(), pp.numpy()), abs=1e-9)
    # agreement levels of R = 2 and R = 7 are merged by k / R (0 and 1 occur for both)
    table = out["agreement"]
    assert table["agreement"][0] == 0.0 and table["agreement"][-1] == 1.0
    assert int(table["count"].sum()) == p1.numel() + p2.numel()


def test_agreement_table_values():
    p = torch.tensor([[[0.1, 0.2], [0.6, 0.9]]])
    k = torch.tensor([[[0, 0], [1, 2]]], dtype=torch.uint8)
    metric = MultiRaterCalibration()
    metric.update(p, k, num_raters=2)
    table = metric.compute()["agreement"]
    np.testing.assert_allclose(table["agreement"], [0.0, 0.5, 1.0])
    np.testing.assert_allclose(table["confidence"], [0.15, 0.6, 0.9], rtol=1e-6)
    np.testing.assert_array_equal(table["count"], [2, 1, 1])
    merged = agreement_table({2: torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64),
                              4: torch.tensor([0.0, 0.0, 1.0, 0.0, 0.0], dtype=torch.float64)},
                             {2: torch.tensor([1, 4, 3]), 4: torch.tensor([0, 0, 4, 0, 0])})
    np.testing.assert_allclose(merged["confidence"], [1.0, 3.0 / 8, 1.0])  # 1/2 and 2/4 pooled


def test_kinds_logit_and_ordinal_and_valid():
    p, masks = make_data(B=2, R=3, shape=(5, 5), seed=6)
    logit = torch.logit(p.clamp(1e-4, 1 - 1e-4))
    a = MultiRaterCalibration(kind="logit")
    a.update(logit, masks)
    b = MultiRaterCalibration()
    b.update(torch.sigmoid(logit), masks)
    assert a.compute()["mr_ece"] == pytest.approx(b.compute()["mr_ece"], rel=1e-6)

    g = torch.Generator().manual_seed(7)
    logits = torch.randn(2, 4, 5, 5, generator=g)
    valid = torch.rand(2, 5, 5, generator=g) > 0.3
    c = MultiRaterCalibration(readout="expected")
    c.update(logits, masks, valid=valid, kind="ordinal")
    q = reference.foreground_probability(logits, "expected")
    ref = pooled.calibration_metrics(reference.calibration_stats(q, masks.sum(1), 3, valid=valid))
    out = c.compute()
    assert out["mr_ece"] == pytest.approx(ref["mr_ece"], rel=1e-6)
    assert int(out["agreement"]["count"].sum()) == int(valid.sum())
    assert out["n_pairs"] == 3 * int(valid.sum())


def test_bad_inputs():
    p, masks = make_data(B=2, R=3, shape=(4, 4))
    metric = MultiRaterCalibration(backend="torch")
    with pytest.raises(ValueError, match="spatial shapes"):
        metric.update(p[:, :3], masks)
    bad = p.clone()
    bad[0, 0, 0] = math.nan
    with pytest.raises(ValueError, match="probabilities"):
        metric.update(bad, masks)
    with pytest.raises(ValueError, match="0..R"):
        metric.update(p, torch.full((2, 4, 4), 4, dtype=torch.uint8), num_raters=3)
    with pytest.raises(TypeError, match="pred"):
        metric.update(p.numpy(), masks)
    with pytest.raises(ValueError, match="kind"):
        metric.update(p, masks, kind="probability")
    with pytest.raises(ValueError, match="n_bins"):
        MultiRaterCalibration(n_bins=0)
    with pytest.raises(RuntimeError, match="before any"):
        metric.compute()  # every update above failed: nothing was accumulated
    metric.update(p[:0], masks[:0])  # an empty batch is a no-op
    with pytest.raises(RuntimeError, match="before any"):
        metric.compute()
    with pytest.raises(RuntimeError, match="per_image"):
        metric.stats()


def test_state_dict_round_trip(tmp_path):
    p, masks = make_data(B=3, R=3, shape=(4, 5), seed=8)
    metric = MultiRaterCalibration(per_image=True, exact_auc=True)
    metric.update(p[:2], masks[:2])
    path = tmp_path / "state.pt"
    torch.save(metric.state_dict(), path)
    restored = MultiRaterCalibration(per_image=True, exact_auc=True)
    restored.load_state_dict(torch.load(path, weights_only=True))
    for m in (metric, restored):
        m.update(p[2:], masks[2:])
    a, b = metric.compute(), restored.compute()
    for key in (*SCALARS, "n_pairs", "n_images"):
        assert a[key] == b[key], key
    with pytest.raises(ValueError, match="saved with"):
        MultiRaterCalibration(n_bins=10, per_image=True, exact_auc=True).load_state_dict(metric.state_dict())
    metric.reset()
    with pytest.raises(RuntimeError):
        metric.compute()


def test_bootstrap_reproducible_and_covers_value():
    p, masks = make_data(B=40, R=3, shape=(8, 8), seed=9)
    metric = MultiRaterCalibration(per_image=True)
    metric.update(p, masks)
    st = metric.stats()
    a = bootstrap(st, n_boot=200, seed=3)
    b = metric.bootstrap(n_boot=200, seed=3)
    assert a == b
    c = bootstrap(st, n_boot=200, seed=4)
    assert c["mr_ece"]["mean"] != a["mr_ece"]["mean"]
    for key in ("mr_ece", "brier", "nll", "auc", "dice"):
        assert a[key]["low"] <= a[key]["value"] <= a[key]["high"], key
        assert a[key]["value"] == pytest.approx(metric.compute()[key], rel=1e-12)


def test_torchmetrics_adapter():
    pytest.importorskip("torchmetrics")
    from orcal.metrics import MultiRaterCalibrationMetric

    p, masks = make_data(B=3, R=3, shape=(5, 5), seed=10)
    adapter = MultiRaterCalibrationMetric()
    adapter.update(p[:1], masks[:1])
    adapter.update(p[1:], masks[1:])
    values = adapter.compute()
    ref = pooled.calibration_metrics(reference.calibration_stats(p, masks.sum(1), 3))
    for key in SCALARS:
        assert float(values[key]) == pytest.approx(ref[key], rel=1e-6, abs=1e-7), key
    adapter.reset()
    assert int(adapter.counts.sum()) == 0


# --- torch.distributed: 2 gloo processes on the CPU ------------------------------------------------------

def _rank_main(rank: int, world: int, init: str, out_dir: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        p, masks = make_data(B=5, R=3, shape=(6, 6), seed=11)
        metric = MultiRaterCalibration(per_image=True, exact_auc=True)
        # unequal shares (rank 0: 2 images, rank 1: 3 images, one of them with R = 2 as vote counts)
        if rank == 0:
            metric.update(p[:2], masks[:2])
        else:
            metric.update(p[2:4], masks[2:4])
            metric.update(p[4:], masks[4:, :2].sum(1).to(torch.uint8), num_raters=2)
        out = metric.compute()
        rows = metric.stats()
        torch.save({"out": {k: v for k, v in out.items() if k in (*SCALARS, "n_pairs", "n_images")},
                    "agreement": out["agreement"]["count"].tolist(), "rows": rows.as_dict()},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def test_distributed_equals_single_process(tmp_path):
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    import torch.multiprocessing as mp

    init = f"file://{tmp_path / 'store'}"
    mp.spawn(_rank_main, args=(2, init, str(tmp_path)), nprocs=2, join=True)
    p, masks = make_data(B=5, R=3, shape=(6, 6), seed=11)
    single = MultiRaterCalibration(per_image=True, exact_auc=True)
    single.update(p[:4], masks[:4])
    single.update(p[4:], masks[4:, :2].sum(1).to(torch.uint8), num_raters=2)
    expected = single.compute()
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        for key in ("n_pairs", "n_images"):
            assert got["out"][key] == expected[key]
        for key in SCALARS:
            assert got["out"][key] == pytest.approx(expected[key], rel=1e-12, abs=1e-12), key
        assert got["agreement"] == expected["agreement"]["count"].tolist()
        rows = got["rows"]
        ref_rows = single.stats()
        assert torch.equal(rows["n"], ref_rows.n) and torch.equal(rows["pos"], ref_rows.pos)
        torch.testing.assert_close(rows["s"], ref_rows.s, rtol=1e-12, atol=1e-12)


def test_slabs_of_large_batches_equal_one_call(monkeypatch):
    import orcal.metrics.batch_stats as batch_stats_module

    p, masks = make_data(B=2, R=3, shape=(7, 5, 6), seed=12)
    g = torch.Generator().manual_seed(13)
    valid = torch.rand(2, 7, 5, 6, generator=g) > 0.2
    logits = torch.randn(2, 4, 7, 5, 6, generator=g)
    whole = MultiRaterCalibration(per_image=True, backend="torch")
    whole.update(p[:, None], masks, valid=valid)
    whole.update(logits, masks.sum(1).to(torch.uint8), num_raters=3, kind="ordinal")
    monkeypatch.setattr(batch_stats_module, "SLAB_VOXELS", 70)  # slabs of one or two planes
    sliced = MultiRaterCalibration(per_image=True, backend="torch")
    sliced.update(p[:, None], masks, valid=valid)
    sliced.update(logits, masks.sum(1).to(torch.uint8), num_raters=3, kind="ordinal")
    a, b = whole.stats(), sliced.stats()
    for name in ("n", "a", "tp", "fp", "fn", "pos", "neg"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    for name in ("s", "brier", "nll"):  # the float32 readout may round differently on another shape
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=1e-6, atol=1e-9)
    with pytest.raises(ValueError, match="spatial shapes"):  # mismatches are still reported as such
        sliced.update(p[:, :, :4], masks)


def _rank_zero_only(rank: int, world: int, init: str, out_dir: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        if rank == 0:  # rank 0 evaluates alone; "auto" would wait for rank 1 in an all-reduce forever
            p, masks = make_data(B=2, R=3, shape=(6, 6), seed=3)
            metric = MultiRaterCalibration(sync=False)
            metric.update(p, masks)
            torch.save(metric.compute()["n_images"], os.path.join(out_dir, "n.pt"))
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()


def test_rank_zero_only_evaluation_with_sync_false(tmp_path):
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    import torch.multiprocessing as mp

    mp.spawn(_rank_zero_only, args=(2, f"file://{tmp_path / 'store'}", str(tmp_path)), nprocs=2, join=True)
    assert torch.load(tmp_path / "n.pt") == 2
    with pytest.raises(RuntimeError, match="sync=True"):
        MultiRaterCalibration(sync=True).compute()
    with pytest.raises(ValueError, match="sync"):
        MultiRaterCalibration(sync="yes")


class _Meta(torch.Tensor):
    """A tensor subclass standing in for MONAI's MetaTensor."""


def test_update_takes_tensor_subclasses():
    p, masks = make_data(B=3, R=3, shape=(6, 6), seed=5)
    a, b = MultiRaterCalibration(), MultiRaterCalibration()
    a.update(p.as_subclass(_Meta), masks.as_subclass(_Meta))
    b.update(p, masks)
    assert a.compute()["mr_ece"] == b.compute()["mr_ece"] and a.compute()["n_images"] == 3



@pytest.mark.parametrize("old, names", [
    ("orcal.metric_table", ("register_metric", "unregister_metric", "METRICS")),
    ("orcal.calibrate", ("TemperatureScaler", "fit_temperature", "apply_temperature")),
    ("orcal.plots", ("reliability_diagram", "confidence_vs_agreement")),
])
def test_moved_modules_warn_and_give_the_same_objects(old, names):
    """Paths the docs once gave stay importable for one release, warn, and hand out the metrics package's objects."""
    import importlib
    import sys

    import orcal.metrics
    import orcal.metrics.plots

    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=old.replace(".", r"\.")):
        module = importlib.import_module(old)
    home = orcal.metrics.plots if old == "orcal.plots" else orcal.metrics
    assert all(getattr(module, name) is getattr(home, name) for name in names)
