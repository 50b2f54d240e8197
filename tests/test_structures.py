"""Several structures at once (SPEC §11): every backend against the binary reference, structure by structure.

The backend cases run on the torch and cpp backends here, on CUDA tensors on a GPU machine, and on the Triton
kernels in Triton's interpreter (a child process, tests/backend_cases.py).
"""

from __future__ import annotations

import math
import os
import statistics

import numpy as np
import pytest
import torch
from backend_cases import INTERPRETED, run_triton_cases

import orcal
from orcal.ops import _ext, reference, structures
from orcal.ops.stats import TENSOR_FIELDS, CalibrationStats

SHAPES = [pytest.param((5, 6), id="2d"), pytest.param((3, 4, 5), id="3d")]


def test_triton_cases():
    """The backend cases of this file on the Triton kernels, in Triton's interpreter (a child process)."""
    run_triton_cases(__file__)


def _labels(B, R, S, C, seed=0):
    """Rater label maps whose raters mostly agree (a shared map, each rater relabelling a few voxels)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(0, C + 1, (B, 1, *S), generator=g)
    noise = torch.randint(0, C + 1, (B, R, *S), generator=g)
    return torch.where(torch.rand(B, R, *S, generator=g) < 0.3, noise, base).to(torch.uint8)


def _logits(B, C, R, S, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (3 * torch.randn(B, C * (R + 1), *S, generator=g, dtype=torch.float64)).to(dtype)


def _per_structure(x, C):
    return [x[:, c * (x.shape[1] // C):(c + 1) * (x.shape[1] // C)] for c in range(C)]


# --- targets ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("S", SHAPES)
@pytest.mark.parametrize("C", [1, 2, 3])
def test_orc_targets_of_label_maps(be, S, C):
    backend, dev = be
    labels = _labels(2, 3, S, C).to(dev)
    k = orcal.orc_targets(labels, backend=backend, num_structures=C)
    assert k.shape == (2, C, *S) and k.dtype == torch.uint8
    for c in range(C):
        assert torch.equal(k[:, c].cpu(), reference.orc_targets(labels.cpu() == c + 1))
    assert (k.sum(1) <= 3).all()
    if C == 1:  # a binary rater stack is the C = 1 case
        assert torch.equal(k[:, 0], orcal.orc_targets(labels.bool(), backend=backend))


def test_orc_targets_refuses_labels_beyond_c(be):
    backend, dev = be
    labels = torch.full((1, 2, 3, 3), 4, dtype=torch.int64, device=dev)
    with pytest.raises(ValueError, match=r"labels 0..C = 0..3"):
        orcal.orc_targets(labels, backend=backend, num_structures=3)
    with pytest.raises(ValueError, match=r"0..3"):  # MONAI's float32 label maps: integers are labels
        orcal.orc_targets(labels.float(), backend=backend, num_structures=3)
    with pytest.raises(TypeError, match="non-integer.*nearest"):  # interpolated: refused with the fix
        orcal.orc_targets(labels.float() - 1.5, backend=backend, num_structures=3)
    float_labels = (labels - 2).float()
    assert torch.equal(orcal.orc_targets(float_labels, backend=backend, num_structures=3),
                       orcal.orc_targets(float_labels.long(), backend=backend, num_structures=3))


def test_num_classes_is_a_deprecated_name_of_num_structures():
    """``num_classes=`` (the former keyword of orc_targets and OrdinalLoss) still works for one release: it
    warns naming ``num_structures``, gives the same result, and is refused beside a different num_structures."""
    labels, logits = _labels(2, 3, (4, 5), 2), _logits(2, 2, 3, (4, 5))
    k = orcal.orc_targets(labels, backend="torch", num_structures=2)
    with pytest.warns(DeprecationWarning, match="num_classes= is deprecated.*use num_structures="):
        assert torch.equal(orcal.orc_targets(labels, backend="torch", num_classes=2), k)
    with pytest.warns(DeprecationWarning, match="use num_structures="):
        assert torch.equal(orcal.orc_targets(labels, backend="torch", num_structures=2, num_classes=2), k)
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="num_structures=3 and num_classes=2"):
        orcal.orc_targets(labels, backend="torch", num_structures=3, num_classes=2)

    new = orcal.OrdinalLoss(from_masks=True, num_structures=2, num_raters=3, backend="torch")
    with pytest.warns(DeprecationWarning, match="OrdinalLoss: num_classes= is deprecated.*use num_structures="):
        old = orcal.OrdinalLoss(from_masks=True, num_classes=2, num_raters=3, backend="torch")
    assert old.num_structures == 2 and "num_structures=2" in repr(old)
    torch.testing.assert_close(old(logits, labels), new(logits, labels))
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="num_structures=1 and num_classes=2"):
        orcal.OrdinalLoss(num_structures=1, num_classes=2)


# --- readout and loss ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("S", SHAPES)
@pytest.mark.parametrize("C", [1, 2, 3])
@pytest.mark.parametrize("readout", ["majority", "expected"])
def test_foreground_probability_per_structure(be, S, C, readout):
    backend, dev = be
    z = _logits(2, C, 3, S).to(dev)
    p = orcal.foreground_probability(z, readout, backend=backend, num_structures=C)
    assert p.shape == (2, C, *S)
    for c, zc in enumerate(_per_structure(z.cpu(), C)):
        torch.testing.assert_close(p[:, c].cpu(), reference.foreground_probability(zc, readout).float(),
                                   atol=1e-6, rtol=1e-6)


def _reference_loss(z, k, C, valid, reduction, structure_reduction, rps_weight=0.5):
    per = []
    for c, zc in enumerate(_per_structure(z, C)):
        vc = None if valid is None else (valid if valid.ndim == k.ndim - 1 else valid[:, c])
        per.append(reference.ordinal_loss(zc, k[:, c], rps_weight, None, vc, reduction))
    if reduction == "none":
        return torch.stack(per, 1)
    total = torch.stack(per).sum()
    return total if structure_reduction == "sum" else total / C


@pytest.mark.parametrize("S", SHAPES)
@pytest.mark.parametrize("C", [2, 3])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("structure_reduction", ["sum", "mean"])
@pytest.mark.parametrize("valid_kind", [None, "shared", "per-structure"])
def test_loss_is_the_per_structure_loss(be, S, C, reduction, structure_reduction, valid_kind):
    backend, dev = be
    R = 3
    z = _logits(2, C, R, S, dtype=torch.float64)
    k = orcal.orc_targets(_labels(2, R, S, C), backend="torch", num_structures=C)
    g = torch.Generator().manual_seed(5)
    valid = {None: None, "shared": torch.rand(2, *S, generator=g) > 0.3,
             "per-structure": torch.rand(2, C, *S, generator=g) > 0.3}[valid_kind]
    want_z = z.clone().requires_grad_()
    want = _reference_loss(want_z, k, C, valid, reduction, structure_reduction)
    got_z = z.to(dev).requires_grad_()
    got = orcal.ordinal_loss(got_z, k.to(dev), 0.5, valid=None if valid is None else valid.to(dev),
                             reduction=reduction, backend=backend, structure_reduction=structure_reduction)
    torch.testing.assert_close(got.cpu(), want, atol=1e-10, rtol=1e-10)
    seed = torch.rand(want.shape, generator=g, dtype=torch.float64)
    (want * seed).sum().backward()
    (got * seed.to(dev)).sum().backward()
    torch.testing.assert_close(got_z.grad.cpu(), want_z.grad, atol=1e-10, rtol=1e-10)


def test_loss_with_ignore_index_counts_each_structures_voxels(be):
    backend, dev = be
    z, k = _logits(2, 2, 3, (4, 5)), orcal.orc_targets(_labels(2, 3, (4, 5), 2), backend="torch", num_structures=2)
    padded = k.to(torch.int16)
    padded[:, :, 0] = -1  # nnU-Net's padding, on every structure
    got = orcal.ordinal_loss(z.to(dev), padded.to(dev), backend=backend, ignore_index=-1)
    valid = torch.ones(2, 4, 5, dtype=torch.bool)
    valid[:, 0] = False
    want = _reference_loss(z, k, 2, valid, "mean", "sum", rps_weight=1.0)
    torch.testing.assert_close(got.cpu(), want.float(), atol=1e-6, rtol=1e-6)


def test_one_structure_is_the_binary_loss(be):
    backend, dev = be
    z, k = _logits(2, 1, 3, (4, 5)).to(dev), torch.randint(0, 4, (2, 4, 5), dtype=torch.uint8).to(dev)
    binary = orcal.ordinal_loss(z, k, backend=backend)
    assert torch.equal(orcal.ordinal_loss(z, k[:, None], backend=backend), binary)  # (B, 1, *S): binary


def test_loss_refuses_channels_that_are_not_c_levels(be):
    backend, dev = be
    k = torch.zeros(1, 3, 4, 4, dtype=torch.uint8, device=dev)
    with pytest.raises(ValueError, match=r"C \* \(R \+ 1\) for C = 3"):
        orcal.ordinal_loss(torch.zeros(1, 10, 4, 4, device=dev), k, backend=backend)
    with pytest.raises(ValueError, match="structure_reduction"):
        orcal.ordinal_loss(torch.zeros(1, 12, 4, 4, device=dev), k, backend=backend, structure_reduction="max")


def test_the_views_are_not_copies():
    z = _logits(2, 3, 4, (3, 4, 5))
    k = torch.zeros(2, 3, 3, 4, 5, dtype=torch.uint8)
    assert structures.fold(z, 3).data_ptr() == z.data_ptr() and structures.fold(z, 3).shape == (6, 5, 3, 4, 5)
    assert structures.fold(k, 3)._base is k


@pytest.mark.skipif(not _ext.compiled() or INTERPRETED, reason="the compiled CPU ops")
def test_opcheck_on_the_structure_views():
    z = structures.fold(_logits(2, 3, 3, (3, 4)), 3)
    k = structures.fold(orcal.orc_targets(_labels(2, 3, (3, 4), 3), backend="torch", num_structures=3), 3)
    torch.library.opcheck(torch.ops.orcal.ordinal_loss.default, (z, k, None, 1.0, 2, 1, True))
    torch.library.opcheck(torch.ops.orcal.foreground_probability.default, (z, "expected", 2))
    torch.library.opcheck(torch.ops.orcal.calibration_stats.default,
                          (z, k, None, 3, False, "ordinal", "majority", 2, 15, 64))


# --- statistics and metrics ---------------------------------------------------------------------------------

def _assert_same_stats(a: CalibrationStats, b: CalibrationStats) -> None:
    for name in TENSOR_FIELDS:
        torch.testing.assert_close(getattr(a, name).cpu(), getattr(b, name).cpu(), atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("S", SHAPES)
@pytest.mark.parametrize("C", [1, 2, 3])
@pytest.mark.parametrize("kind", ["ordinal", "prob"])
def test_stats_have_a_row_per_image_and_structure(be, S, C, kind):
    backend, dev = be
    R, labels = 3, _labels(3, 3, S, C)
    k = orcal.orc_targets(labels, backend="torch", num_structures=C)
    pred = (_logits(3, C, R, S, dtype=torch.float64) if kind == "ordinal"
            else torch.rand(3, C, *S, generator=torch.Generator().manual_seed(2), dtype=torch.float64))
    valid = torch.rand(3, *S, generator=torch.Generator().manual_seed(3)) > 0.2
    kw = dict(kind=kind, readout="expected", n_bins=10, auc_bins=64, backend=backend, num_structures=C)
    from_votes = orcal.calibration_stats(pred.to(dev), k.to(dev), num_raters=R, valid=valid.to(dev), **kw)
    from_labels = orcal.calibration_stats(pred.to(dev), labels.to(dev), valid=valid.to(dev), **kw)
    assert from_votes.num_structures == C and from_votes.n_images == 3 and from_votes.n.shape[0] == 3 * C
    _assert_same_stats(from_votes, from_labels)
    for c, pc in enumerate(_per_structure(pred, C)):
        p = reference.binary_probability(pc if kind == "ordinal" else pc[:, 0], kind, "expected")
        want = reference.calibration_stats(p, k[:, c], R, 10, 64, 2, valid)
        _assert_same_stats(from_votes.structure(c), want)
    if kind == "ordinal" and C > 1:  # ordinal logits with (B, C, *S) votes need not say num_structures
        kw.pop("num_structures")
        _assert_same_stats(orcal.calibration_stats(pred.to(dev), k.to(dev), num_raters=R, valid=valid.to(dev), **kw),
                           from_votes)


def test_metrics_per_structure_pooled_and_macro():
    C, R = 3, 3
    labels = _labels(4, R, (6, 7), C)
    st = orcal.calibration_stats(_logits(4, C, R, (6, 7)), labels, kind="ordinal", num_structures=C,
                                 backend="torch")
    m = orcal.calibration_metrics(st)
    single = [orcal.calibration_metrics(st.structure(c)) for c in range(C)]
    pooled = orcal.calibration_metrics(CalibrationStats.cat([st.structure(c) for c in range(C)]))
    for key in ("mr_ece", "auc", "brier", "dice"):
        assert m[key] == pytest.approx(pooled[key])
        assert m[f"{key}/macro"] == pytest.approx(np.mean([s[key] for s in single]))
        for c in range(C):
            assert m[f"{key}/{c + 1}"] == pytest.approx(single[c][key])
    with pytest.raises(IndexError):
        st.structure(C)


def test_bootstrap_resamples_images_with_their_structures():
    C, R = 2, 4
    st = orcal.calibration_stats(_logits(6, C, R, (5, 5)), _labels(6, R, (5, 5), C), kind="ordinal",
                                 num_structures=C, backend="torch")
    boot = orcal.bootstrap(st, n_boot=50, seed=3)
    for c in range(C):  # the same draws of images as a bootstrap of that structure alone
        alone = orcal.bootstrap(st.structure(c), n_boot=50, seed=3)
        assert boot[f"mr_ece/{c + 1}"] == pytest.approx(alone["mr_ece"])
    assert boot["mr_ece"]["value"] == pytest.approx(orcal.calibration_metrics(st)["mr_ece"])


def test_stats_select_images_and_round_trip():
    C = 3
    st = orcal.calibration_stats(_logits(4, C, 2, (4, 4)), _labels(4, 2, (4, 4), C), kind="ordinal",
                                 num_structures=C, backend="torch")
    first = st[1]
    assert first.n_images == 1 and first.n.shape[0] == C
    _assert_same_stats(first.structure(2), st.structure(2)[1])
    again = CalibrationStats.from_dict(st.as_dict())
    assert again.num_structures == C
    _assert_same_stats(again, st)
    _assert_same_stats(CalibrationStats.cat([st[:2], st[2:]]), st)
    with pytest.raises(ValueError, match="num_structures"):
        CalibrationStats.cat([st, st.structure(0)])


def test_the_streaming_metric_keeps_a_row_per_structure():
    from orcal.metrics import MultiRaterCalibration

    C, R = 3, 2
    logits, labels = _logits(5, C, R, (6, 5)), _labels(5, R, (6, 5), C)
    k = orcal.orc_targets(labels, backend="torch", num_structures=C)
    metric = MultiRaterCalibration(kind="ordinal", readout="expected", per_image=True, num_structures=C)
    metric.update(logits[:2], labels[:2])  # label maps
    metric.update(logits[2:], k[2:], num_raters=R)  # vote counts
    whole = orcal.calibration_stats(logits, k, num_raters=R, kind="ordinal", readout="expected")
    got, want = metric.compute(), orcal.calibration_metrics(whole)
    assert {key: got[key] for key in want} == pytest.approx(want) and "agreement" not in got
    assert got["n_images"] == 5 and metric.totals().n.shape[0] == C
    _assert_same_stats(metric.stats(), whole)
    again = MultiRaterCalibration(kind="ordinal", readout="expected", per_image=True, num_structures=C)
    again.load_state_dict(metric.state_dict())
    assert again.compute()["mr_ece/2"] == pytest.approx(got["mr_ece/2"])
    with pytest.raises(ValueError, match="pass num_structures=3"):
        MultiRaterCalibration(kind="ordinal").update(logits, k, num_raters=R)
    with pytest.raises(ValueError, match="exact_auc"):
        MultiRaterCalibration(exact_auc=True, num_structures=C)


# --- volume uncertainty -------------------------------------------------------------------------------------

def _direct_volume_metrics(p: np.ndarray, rater_masks: list[np.ndarray], voxel_ml: float, level: float = 0.9):
    """CRPS by integrating (F(x) - [x >= y])^2 numerically, coverage with statistics.NormalDist, from the
    raters' masks one by one."""
    mu, sd = p.sum() * voxel_ml, math.sqrt((p * (1 - p)).sum()) * voxel_ml
    dist = statistics.NormalDist(mu, sd)
    lo, hi = dist.inv_cdf((1 - level) / 2), dist.inv_cdf((1 + level) / 2)
    crps, inside, volumes = [], [], []
    for mask in rater_masks:
        y = mask.sum() * voxel_ml
        xs = np.linspace(min(mu, y) - 12 * sd, max(mu, y) + 12 * sd, 200001)
        cdf = np.array([dist.cdf(x) for x in xs[::100]])
        cdf = np.interp(xs, xs[::100], cdf)
        crps.append(np.trapezoid((cdf - (xs >= y)) ** 2, xs))
        inside.append(lo <= y <= hi)
        volumes.append(y)
    return np.mean(crps), np.mean(inside), abs(mu - np.mean(volumes)), sd


def test_volume_metrics_against_a_direct_computation():
    C, R, S = 2, 3, (6, 7, 8)
    labels = _labels(2, R, S, C)
    prob = torch.rand(2, C, *S, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    spacing = (2.0, 0.7, 0.7)
    m = orcal.volume_metrics(orcal.volume_stats(prob, labels, spacing, num_structures=C))
    voxel_ml = 2.0 * 0.7 * 0.7 / 1000
    direct = {c: [_direct_volume_metrics(prob[b, c].numpy(), [(labels[b, r] == c + 1).numpy() for r in range(R)],
                                         voxel_ml) for b in range(2)] for c in range(C)}
    for c in range(C):
        crps, cover, err, sd = np.mean(direct[c], axis=0)
        assert m[f"volume_crps/{c + 1}"] == pytest.approx(crps, rel=1e-4)
        assert m[f"volume_coverage/{c + 1}"] == pytest.approx(cover)
        assert m[f"volume_error/{c + 1}"] == pytest.approx(err)
        assert m[f"volume_sd/{c + 1}"] == pytest.approx(sd)
    assert m["volume_crps"] == pytest.approx(np.mean([np.mean(direct[c], axis=0)[0] for c in range(C)]))


def test_volume_stats_stream_over_chunks_and_read_binary_masks():
    R, S = 4, (8, 6, 5)
    masks = torch.rand(3, R, *S, generator=torch.Generator().manual_seed(1)) > 0.6
    prob = torch.rand(3, *S, generator=torch.Generator().manual_seed(2))
    whole = orcal.volume_stats(prob, masks, spacing=(1.0, 1.0, 2.5))
    halves = (orcal.volume_stats(prob[:, :4], masks[:, :, :4], spacing=(1.0, 1.0, 2.5))
              + orcal.volume_stats(prob[:, 4:], masks[:, :, 4:], spacing=(1.0, 1.0, 2.5)))
    assert orcal.volume_metrics(halves) == pytest.approx(orcal.volume_metrics(whole))
    assert torch.equal(whole.raters, masks.flatten(2).sum(2).double())
    rows = orcal.VolumeStats.cat([orcal.volume_stats(prob[:1], masks[:1]), orcal.volume_stats(prob[1:], masks[1:])])
    assert orcal.volume_metrics(rows) == pytest.approx(orcal.volume_metrics(orcal.volume_stats(prob, masks)))
    # a certain prediction: CRPS is the absolute volume error, and the interval holds only an equal volume
    exact = orcal.volume_metrics(orcal.volume_stats(masks[:, 0].float(), masks))
    assert exact["volume_sd"] == 0 and 0 < exact["volume_coverage"] <= 1
    with pytest.raises(ValueError, match="spacing"):
        orcal.volume_stats(prob, masks, spacing=(1.0, 1.0))
    with pytest.raises(ValueError, match="coverage"):
        orcal.volume_metrics(whole, coverage=1.5)


def _structure_rank(rank: int, world: int, init: str, out_dir: str) -> None:
    from orcal.metrics import MultiRaterCalibration

    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        metric = MultiRaterCalibration(kind="ordinal", per_image=True, num_structures=2)
        if rank == 1:  # rank 0 sees no image: it still joins the sums and the gather
            metric.update(_logits(3, 2, 3, (5, 4)), _labels(3, 3, (5, 4), 2))
        out = metric.compute()
        torch.save({"out": out["mr_ece/2"], "n_images": out["n_images"], "rows": metric.stats().as_dict()},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def test_the_streaming_metric_sums_structures_over_ranks(tmp_path):
    if not torch.distributed.is_available() or INTERPRETED:
        pytest.skip("torch.distributed is not available" if not INTERPRETED else "runs in the main process")
    import torch.multiprocessing as mp

    mp.spawn(_structure_rank, args=(2, f"file://{tmp_path / 'store'}", str(tmp_path)), nprocs=2, join=True)
    whole = orcal.calibration_stats(_logits(3, 2, 3, (5, 4)), _labels(3, 3, (5, 4), 2), kind="ordinal",
                                    num_structures=2)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert got["n_images"] == 3 and got["out"] == pytest.approx(orcal.calibration_metrics(whole)["mr_ece/2"])
        rows = CalibrationStats.from_dict(got["rows"])
        assert rows.num_structures == 2
        _assert_same_stats(rows, whole)


def test_large_batches_of_several_structures_go_in_slabs(monkeypatch):
    import orcal.metrics.batch_stats as batch_stats_module
    from orcal.metrics import MultiRaterCalibration

    C, R = 2, 3
    logits, labels = _logits(2, C, R, (7, 5, 6)), _labels(2, R, (7, 5, 6), C)
    valid = torch.rand(2, 7, 5, 6, generator=torch.Generator().manual_seed(8)) > 0.2
    whole = MultiRaterCalibration(kind="ordinal", per_image=True, backend="torch", num_structures=C)
    whole.update(logits, labels, valid=valid)
    calls = []
    real = orcal.ops.calibration_stats
    monkeypatch.setattr(batch_stats_module, "SLAB_VOXELS", 70)  # slabs of one or two planes
    monkeypatch.setattr(batch_stats_module.ops, "calibration_stats", lambda *a, **k: calls.append(1) or real(*a, **k))
    sliced = MultiRaterCalibration(kind="ordinal", per_image=True, backend="torch", num_structures=C)
    sliced.update(logits, labels, valid=valid)
    assert len(calls) > 3 and sliced.stats().num_structures == C
    _assert_same_stats(sliced.stats(), whole.stats())
