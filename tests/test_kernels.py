"""The compiled kernels (backend="cpp", CPU and CUDA) against orcal.ops.reference: values, gradients, edge cases."""

from __future__ import annotations

import pytest
import torch

import orcal
from orcal.ops import _ext
from orcal.ops import reference as ref

pytestmark = pytest.mark.skipif(not _ext.compiled(), reason="orcal._C is not built")

_CUDA = torch.cuda.is_available() and _ext.cuda_built()
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda,
                                               pytest.mark.skipif(not _CUDA, reason="needs CUDA kernels + GPU")])]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# (loss atol, loss rtol, grad atol, grad rtol): the loss is computed in float32 from the upcast logits, the
# gradient is rounded to the logits' dtype.
TOL = {
    torch.float32: (1e-5, 1e-5, 1e-6, 1e-4),
    torch.float16: (1e-5, 1e-5, 1e-5, 2e-3),
    torch.bfloat16: (1e-5, 1e-5, 1e-4, 1.6e-2),
    torch.float64: (1e-12, 1e-12, 1e-14, 1e-11),
}
RS = [1, 2, 3, 7, 8, 32]


def _inputs(R, spatial, dtype, device, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    B = spatial[0]
    z = (torch.randn(B, R + 1, *spatial[1:], generator=g) * scale).to(dtype).to(device)
    k = torch.randint(0, R + 1, spatial, generator=g, dtype=torch.uint8).to(device)
    valid = (torch.rand(spatial, generator=g) > 0.3).to(device)
    return z, k, valid


def _loss_and_grad(fn, z, *args, **kwargs):
    z = z.detach().clone().requires_grad_()
    loss = fn(z, *args, **kwargs)
    loss.sum().backward()
    return loss.detach(), z.grad


def _check_loss(z, k, valid, reduction, device, rps_weight=1.0, majority=None):
    cpp = _loss_and_grad(orcal.ordinal_loss, z, k, rps_weight, majority, valid, reduction, backend="cpp")
    want = _loss_and_grad(ref.ordinal_loss, z, k, rps_weight, majority, valid, reduction)
    la, lr, ga, gr = TOL[z.dtype]
    assert cpp[0].dtype == ref.opmath_dtype(z.dtype)
    assert cpp[1].dtype == z.dtype and cpp[1].shape == z.shape
    torch.testing.assert_close(cpp[0], want[0].to(cpp[0].dtype), atol=la, rtol=lr)
    torch.testing.assert_close(cpp[1].double(), want[1].double(), atol=ga, rtol=gr)
    if valid is not None:  # invalid voxels: exactly zero loss and gradient, never garbage
        assert torch.all(cpp[1].movedim(1, -1)[~valid] == 0)
        if reduction == "none":
            assert torch.all(cpp[0][~valid] == 0)


# --- ordinal_loss ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("R", RS)
def test_loss_matches_reference(device, dtype, R):
    spatial = (2, 5, 13) if R % 2 else (2, 3, 4, 11)  # 2D and 3D, odd sizes, more than one block for some
    z, k, valid = _inputs(R, spatial, dtype, device, seed=R)
    for reduction in ("mean", "sum", "none"):
        _check_loss(z, k, valid, reduction, device)
    _check_loss(z, k, None, "mean", device, rps_weight=0.3, majority=max(1, R // 3))


@pytest.mark.parametrize("device", DEVICES)
def test_loss_spans_blocks_and_odd_shapes(device):
    z, k, valid = _inputs(3, (3, 7, 9, 5), torch.float32, device)  # 315 voxels per image: 3 blocks, ragged
    for reduction in ("mean", "none"):
        _check_loss(z, k, valid, reduction, device)
    z1, k1, _ = _inputs(4, (1, 1, 1), torch.float32, device)  # a single voxel
    _check_loss(z1, k1, None, "mean", device)


@pytest.mark.parametrize("device", DEVICES)
def test_loss_non_contiguous_inputs(device):
    z, k, valid = _inputs(3, (2, 6, 10), torch.float32, device)
    zt = z.transpose(2, 3).contiguous().transpose(2, 3)  # channels plane transposed in memory
    assert not zt.is_contiguous()
    _check_loss(zt, k, valid, "mean", device)
    wide, _, _ = _inputs(3, (2, 6, 20), torch.float32, device)
    _check_loss(wide[..., ::2], k, valid.transpose(1, 2).contiguous().transpose(1, 2), "none", device)


@pytest.mark.parametrize("device", DEVICES)
def test_loss_empty_and_all_invalid(device):
    z, k, _ = _inputs(3, (0, 4, 4), torch.float32, device)
    loss, grad = _loss_and_grad(orcal.ordinal_loss, z, k, backend="cpp")
    assert loss.item() == 0 and grad.shape == z.shape
    z, k, _ = _inputs(3, (2, 4, 4), torch.float32, device)
    none = torch.zeros(k.shape, dtype=torch.bool, device=device)
    loss, grad = _loss_and_grad(orcal.ordinal_loss, z, k, valid=none, backend="cpp")
    assert loss.item() == 0 and torch.all(grad == 0)


@pytest.mark.parametrize("device", DEVICES)
def test_loss_invalid_voxels_ignore_nan_logits(device):
    z, k, valid = _inputs(3, (1, 8, 8), torch.float32, device)
    z = z.clone()
    z[:, 0][~valid] = float("nan")
    loss, grad = _loss_and_grad(orcal.ordinal_loss, z, k, valid=valid, reduction="none", backend="cpp")
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    assert torch.all(loss[~valid] == 0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_loss_extreme_logits_stay_finite(device, dtype):
    z, k, _ = _inputs(7, (2, 6, 6), dtype, device)
    z = (torch.sign(z.float()) * 1e4).to(dtype)
    cpp = _loss_and_grad(orcal.ordinal_loss, z, k, reduction="none", backend="cpp")
    assert torch.isfinite(cpp[0]).all() and torch.isfinite(cpp[1]).all()
    want = _loss_and_grad(ref.ordinal_loss, z, k, reduction="none")
    torch.testing.assert_close(cpp[0].double(), want[0].double(), rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("device", DEVICES)
def test_loss_k_above_r_raises(device):
    z, k, _ = _inputs(3, (1, 4, 4), torch.float32, device)
    k = k.clone()
    k[0, 1, 2] = 4
    with pytest.raises(ValueError, match="0..R"):
        orcal.ordinal_loss(z, k, backend="cpp")


@pytest.mark.parametrize("device", DEVICES)
def test_loss_forward_only(device):
    z, k, _ = _inputs(3, (2, 5, 5), torch.float32, device)
    with torch.no_grad():
        loss = orcal.ordinal_loss(z.requires_grad_(), k, backend="cpp")
    torch.testing.assert_close(loss, ref.ordinal_loss(z.detach(), k), atol=1e-6, rtol=1e-6)
    _, grad = torch.ops.orcal.ordinal_loss(z.detach(), k, None, 1.0, 2, 1, False)
    assert grad.numel() == 0
    _, grad = torch.ops.orcal.ordinal_loss(z.detach().transpose(2, 3), k.transpose(1, 2), None, 1.0, 2, 1, True)
    assert grad.is_contiguous() and grad.shape == z.transpose(2, 3).shape


def test_loss_same_result_for_any_thread_count():
    z, k, valid = _inputs(7, (2, 48, 50), torch.float32, "cpu")  # 19 blocks per image
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(_loss_and_grad(orcal.ordinal_loss, z, k, valid=valid, backend="cpp"))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_loss_gradcheck_float64():
    z, k, valid = _inputs(3, (2, 3, 3), torch.float64, "cpu")
    for reduction in ("mean", "none"):
        assert torch.autograd.gradcheck(
            lambda x, r=reduction: orcal.ordinal_loss(x, k, valid=valid, reduction=r, backend="cpp"),
            (z.clone().requires_grad_(),))


def test_loss_opcheck():
    z, k, valid = _inputs(3, (2, 3, 4), torch.float32, "cpu")
    for args in ((z, k, valid, 1.0, 2, 1, True), (z, k, None, 0.5, 1, 0, False), (z, k, None, 1.0, 3, 2, True)):
        torch.library.opcheck(torch.ops.orcal.ordinal_loss.default, args)


# --- foreground_probability ----------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("R", [1, 2, 7, 32])
def test_foreground_probability(device, dtype, R):
    z, _, _ = _inputs(R, (2, 5, 3, 7) if R % 2 else (1, 9, 13), dtype, device)
    for readout in ("majority", "expected"):
        got = orcal.foreground_probability(z, readout, backend="cpp")
        want = ref.foreground_probability(z, readout).to(dtype)
        assert got.dtype == dtype and got.shape == want.shape
        tol = {torch.float64: 1e-12, torch.float32: 1e-6}.get(dtype, 1e-2)
        torch.testing.assert_close(got.double(), want.double(), atol=tol, rtol=tol)


def test_foreground_probability_opcheck():
    z, _, _ = _inputs(3, (2, 3, 4), torch.float32, "cpu")
    torch.library.opcheck(torch.ops.orcal.foreground_probability.default, (z, "majority", 2))
    torch.library.opcheck(torch.ops.orcal.foreground_probability.default, (z, "expected", 2))


# --- calibration_stats ---------------------------------------------------------------------------------------

STAT_FIELDS = ("n", "a", "s", "brier", "nll", "tp", "fp", "fn", "pos", "neg")


def _pred(kind, R, spatial, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    if kind == "prob":
        x = torch.rand(spatial, generator=g)
    elif kind == "logit":
        x = torch.randn(spatial, generator=g) * 3
    else:
        x = torch.randn(spatial[0], R + 1, *spatial[1:], generator=g) * 3
    return x.to(dtype).to(device)


def _compare_stats(got, want, exact_counts):
    for f in STAT_FIELDS:
        a, b = getattr(got, f), getattr(want, f)
        assert a.shape == b.shape and a.dtype == b.dtype, f
        if a.dtype == torch.int64:
            if exact_counts:
                assert torch.equal(a, b), f
            else:  # a probability on a bin edge may land one bin over (1-ulp differences of exp/log)
                assert (a - b).abs().sum() <= 2 * 255, f
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["prob", "logit", "ordinal"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_stats_match_reference(device, kind, dtype):
    for R, spatial in ((3, (2, 7, 11)), (8, (1, 3, 5, 6)), (1, (2, 4, 4))):
        pred = _pred(kind, R, spatial, dtype, device, seed=R)
        g = torch.Generator().manual_seed(R)
        masks = (torch.rand(spatial[0], R, *spatial[1:], generator=g) > 0.4).to(device)
        valid = (torch.rand(spatial, generator=g) > 0.25).to(device)
        for v in (None, valid):
            for target, num_raters in ((masks, None), (ref.orc_targets(masks), R)):
                readouts = ("majority", "expected") if kind == "ordinal" else ("majority",)
                for readout in readouts:
                    kw = dict(num_raters=num_raters, kind=kind, readout=readout, n_bins=15, auc_bins=64, valid=v)
                    got = orcal.calibration_stats(pred, target, backend="cpp", **kw)
                    want = orcal.calibration_stats(pred, target, backend="torch", **kw)
                    _compare_stats(got, want, exact_counts=kind == "prob")


@pytest.mark.parametrize("device", DEVICES)
def test_stats_uint8_masks_odd_bins_and_empty(device):
    pred = _pred("prob", 5, (2, 9, 9), torch.float32, device)
    masks = (torch.rand(2, 5, 9, 9) > 0.5).to(torch.uint8).to(device)
    for n_bins, auc_bins in ((1, 2), (7, 4096), (100, 33)):
        got = orcal.calibration_stats(pred, masks, n_bins=n_bins, auc_bins=auc_bins, backend="cpp")
        want = orcal.calibration_stats(pred, masks, n_bins=n_bins, auc_bins=auc_bins, backend="torch")
        _compare_stats(got, want, exact_counts=True)
    edge = torch.tensor([0.0, 1.0, 0.5, 1 / 15, 14 / 15, 1 - 2 ** -24]).view(1, 2, 3).to(device)
    k = torch.tensor([0, 2, 1, 1, 0, 2], dtype=torch.uint8).view(1, 2, 3).to(device)
    got = orcal.calibration_stats(edge, k, num_raters=2, backend="cpp")
    _compare_stats(got, orcal.calibration_stats(edge, k, num_raters=2, backend="torch"), exact_counts=True)
    empty = orcal.calibration_stats(pred[:0], masks[:0], backend="cpp")
    assert empty.n.shape == (0, 15)


@pytest.mark.parametrize("device", DEVICES)
def test_stats_errors(device):
    pred = _pred("prob", 3, (1, 4, 4), torch.float32, device).clone()
    k = torch.randint(0, 4, (1, 4, 4), dtype=torch.uint8).to(device)
    bad = pred.clone()
    bad[0, 1, 1] = float("nan")
    with pytest.raises(ValueError, match=r"probabilities in \[0, 1\]"):
        orcal.calibration_stats(bad, k, num_raters=3, backend="cpp")
    bad[0, 1, 1] = 1.5
    with pytest.raises(ValueError, match=r"probabilities in \[0, 1\]; found 1.5"):
        orcal.calibration_stats(bad, k, num_raters=3, backend="cpp")
    valid = torch.ones(1, 4, 4, dtype=torch.bool, device=device)
    valid[0, 1, 1] = False  # a bad value where nothing counts is ignored
    orcal.calibration_stats(bad, k, num_raters=3, valid=valid, backend="cpp")
    with pytest.raises(ValueError, match="0..R"):
        orcal.calibration_stats(pred, k + 1, num_raters=3, backend="cpp")
    masks = torch.zeros(1, 3, 4, 4, dtype=torch.uint8, device=device)
    masks[0, 2, 3, 3] = 2
    with pytest.raises(ValueError, match="binary"):
        orcal.calibration_stats(pred, masks, backend="cpp")


def test_stats_same_result_for_any_thread_count():
    pred = _pred("ordinal", 3, (3, 20, 30, 30), torch.float32, "cpu")  # 18000 voxels: two chunks per image
    masks = torch.rand(3, 3, 20, 30, 30) > 0.5
    before = torch.get_num_threads()
    try:
        out = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            out.append(torch.ops.orcal.calibration_stats(pred, masks, None, 3, True, "ordinal", "majority", 2,
                                                         15, 4096))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])


def test_stats_opcheck():
    pred = _pred("prob", 3, (2, 3, 4), torch.float32, "cpu")
    masks = torch.rand(2, 3, 3, 4) > 0.5
    torch.library.opcheck(torch.ops.orcal.calibration_stats.default,
                          (pred, masks, None, 3, True, "prob", "majority", 2, 15, 64))
    logits = _pred("ordinal", 3, (2, 3, 4), torch.float32, "cpu")
    torch.library.opcheck(torch.ops.orcal.calibration_stats.default,
                          (logits, ref.orc_targets(masks), masks[:, 0].bool(), 3, False, "ordinal", "expected", 2,
                           10, 32))


# --- orc_targets ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_orc_targets(device):
    masks = (torch.rand(2, 7, 5, 3, 4) > 0.5).to(device)
    assert torch.equal(orcal.orc_targets(masks, backend="cpp"), ref.orc_targets(masks))
    torch.library.opcheck(torch.ops.orcal.orc_targets.default, (masks.to(torch.uint8),))
