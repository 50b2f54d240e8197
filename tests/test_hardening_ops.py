"""Hostile and careless inputs to the ops (SPEC §8), on every backend: a clear error naming the argument, or the
right answer. Bad arguments, confident and infinite logits, NaN at invalid voxels (the cases real CT volumes
produce), logits without their axes, label maps with the wrong values, empty batches, dtypes, gradients,
``torch.compile`` and CUDA graphs, and an extension that fails to load.

Each case runs on the reference and the compiled CPU kernels here, and on the
Triton kernels in Triton's interpreter in a child process (``test_triton_cases``).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from backend_cases import BACKENDS, INTERPRETED, REPO, _logits, _votes, run_triton_cases
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import orcal
from orcal.ops import _ext, reference

INF, NAN = math.inf, math.nan


def test_triton_cases():
    """The backend cases of this file on the Triton kernels, in Triton's interpreter (a child process)."""
    run_triton_cases(__file__)


# --- infinite logits: the expected readout gives the limit (SPEC §2) ----------------------------------------

EXPECTED_LIMITS = [  # (logits of R = 4, expected readout)
    ([INF, 0, 0, 0, 0], 0.0),              # level 0 certain
    ([0, 1, INF, -3, 0], 0.5),             # a level below the majority certain
    ([0, 0, 0, 0, INF], 1.0),              # the top level certain
    ([-INF, INF, -INF, 2, 0], 0.25),       # with -inf beside it
    ([-INF, -INF, 0, 0, -INF], 0.625),     # -inf levels only drop out
    ([INF, 0, 0, INF, 0], NAN),            # two certain levels: no limit
    ([INF, 0, NAN, 0, 0], NAN),            # NaN stays NaN
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_infinite_logits_expected_readout_is_the_limit(be, dtype):
    backend, dev = be
    z = torch.tensor([row for row, _ in EXPECTED_LIMITS], dtype=torch.float64).T  # (R + 1, cases)
    z = z.view(1, 5, 1, -1).repeat(2, 1, 3, 1).to(dtype).to(dev)
    want = torch.tensor([p for _, p in EXPECTED_LIMITS], dtype=torch.float64)
    for got in (orcal.foreground_probability(z, "expected", backend=backend),
                reference.foreground_probability(z, "expected")):
        got = got.double().cpu()
        assert got.shape == (2, 3, len(want))
        torch.testing.assert_close(got, want.expand_as(got), equal_nan=True, atol=1e-3, rtol=0)
    # the structure-major view of SPEC §11 reads the same
    two = torch.cat([z, z.flip(1)], 1)
    p = orcal.foreground_probability(two, "expected", backend=backend, num_structures=2).double().cpu()
    torch.testing.assert_close(p[:, 0], want.expand(2, 3, -1), equal_nan=True, atol=1e-3, rtol=0)


def test_infinite_logits_readouts_agree_where_both_have_a_limit(be):
    """One certain level: both readouts follow from it (the majority readout is 1 iff the level is >= m)."""
    backend, dev = be
    z = torch.zeros(1, 5, 1, 5)
    for level in range(5):
        z[0, level, 0, level] = INF
    z = z.to(dev)
    expected = orcal.foreground_probability(z, "expected", backend=backend).cpu().flatten()
    majority = orcal.foreground_probability(z, "majority", backend=backend).cpu().flatten()
    assert expected.tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert majority.tolist() == [0.0, 0.0, 0.0, 1.0, 1.0]


# --- logits and label maps without their layout --------------------------------------------------------------

def _layout_cases(dev):
    k = torch.zeros(1, dtype=torch.uint8, device=dev)
    return [
        ("readout-0d", lambda b: orcal.foreground_probability(torch.tensor(1.0, device=dev), backend=b), "logits"),
        ("readout-1d", lambda b: orcal.foreground_probability(torch.zeros(4, device=dev), backend=b), "logits"),
        ("readout-structures-0d", lambda b: orcal.foreground_probability(torch.tensor(1.0, device=dev), backend=b,
                                                                          num_structures=2), "logits"),
        ("loss-0d", lambda b: orcal.ordinal_loss(torch.tensor(0.0, device=dev), k[0], backend=b), "logits"),
        ("loss-1d", lambda b: orcal.ordinal_loss(torch.zeros(4, device=dev), k, backend=b), "logits"),
        ("stats-ordinal-1d", lambda b: orcal.calibration_stats(torch.zeros(4, device=dev), k.expand(3), num_raters=3,
                                                               kind="ordinal", backend=b), "pred"),
        ("stats-structures-1d", lambda b: orcal.calibration_stats(
            torch.zeros(4, device=dev), torch.zeros(1, 3, 4, 4, dtype=torch.uint8, device=dev), num_structures=2,
            backend=b), "pred"),
        # label maps: the error names the argument the caller gave
        ("stats-labels-range", lambda b: orcal.calibration_stats(
            torch.rand(1, 2, 4, 4, device=dev), torch.full((1, 3, 4, 4), 5, dtype=torch.uint8, device=dev),
            num_structures=2, backend=b), "target must hold labels 0..C = 0..2"),
        ("orc-labels-range", lambda b: orcal.orc_targets(torch.full((1, 3, 4, 4), 5, dtype=torch.uint8, device=dev),
                                                         backend=b, num_structures=2), "masks must hold labels 0..C"),
        ("stats-num_structures-float", lambda b: orcal.calibration_stats(
            torch.rand(1, 2, 4, 4, device=dev), torch.zeros(1, 3, 4, 4, dtype=torch.uint8, device=dev),
            num_structures=2.0, backend=b), "num_structures"),
        ("readout-num_structures-str", lambda b: orcal.foreground_probability(
            torch.zeros(1, 8, 4, 4, device=dev), backend=b, num_structures="2"), "num_structures"),
    ]


@pytest.mark.parametrize("case", range(len(_layout_cases("cpu"))),
                         ids=[c[0] for c in _layout_cases("cpu")])
def test_layout_errors_name_the_argument(be, case):
    backend, dev = be
    _, call, words = _layout_cases(dev)[case]
    with pytest.raises((ValueError, TypeError), match=words):
        call(backend)


def test_empty_batches_of_several_structures(be):
    backend, dev = be
    logits = torch.zeros(0, 8, 4, 4, device=dev)
    k = torch.zeros(0, 2, 4, 4, dtype=torch.uint8, device=dev)
    labels = torch.zeros(0, 3, 4, 4, dtype=torch.uint8, device=dev)
    assert orcal.foreground_probability(logits, backend=backend, num_structures=2).shape == (0, 2, 4, 4)
    assert float(orcal.ordinal_loss(logits, k, backend=backend)) == 0
    assert orcal.orc_targets(labels, backend=backend, num_structures=2).shape == (0, 2, 4, 4)
    assert orcal.calibration_stats(torch.zeros(0, 2, 4, 4, device=dev), labels, num_structures=2,
                                   backend=backend).n_images == 0
    assert orcal.calibration_stats(logits, k, num_raters=3, kind="ordinal", backend=backend).n_images == 0


# --- arguments, values and gradients on every backend ------------------------------------------------------



def _loss(dev, **kw):
    args = dict(logits=_logits(1, 3, (4, 4), device=dev), k=_votes((1, 4, 4), 3, device=dev))
    args.update(kw)
    return lambda backend: orcal.ordinal_loss(backend=backend, **args)


def _stats(dev, **kw):
    masks = (torch.rand(1, 3, 4, 4, generator=torch.Generator().manual_seed(1)) < 0.5).to(torch.uint8).to(dev)
    args = dict(pred=torch.rand(1, 4, 4).to(dev), target=masks)
    args.update(kw)
    return lambda backend: orcal.calibration_stats(backend=backend, **args)


def _readout(dev, **kw):
    args = dict(logits=_logits(1, 3, (4, 4), device=dev))
    args.update(kw)
    return lambda backend: orcal.foreground_probability(backend=backend, **args)


BAD = [  # (id, call factory, exception, words the message must hold)
    ("loss-majority-float", lambda d: _loss(d, majority=2.7), TypeError, ["majority", "integer", "2.7"]),
    ("loss-majority-str", lambda d: _loss(d, majority="2"), TypeError, ["majority", "'2'"]),
    ("loss-majority-bool", lambda d: _loss(d, majority=True), TypeError, ["majority"]),
    ("loss-majority-range", lambda d: _loss(d, majority=4), ValueError, ["majority", "1..3"]),
    ("loss-rps-nan", lambda d: _loss(d, rps_weight=float("nan")), ValueError, ["rps_weight", "finite"]),
    ("loss-rps-inf", lambda d: _loss(d, rps_weight=float("inf")), ValueError, ["rps_weight"]),
    ("loss-rps-negative", lambda d: _loss(d, rps_weight=-1.0), ValueError, ["rps_weight"]),
    ("loss-rps-str", lambda d: _loss(d, rps_weight="abc"), TypeError, ["rps_weight", "'abc'"]),
    ("loss-rps-none", lambda d: _loss(d, rps_weight=None), TypeError, ["rps_weight", "None"]),
    ("loss-reduction", lambda d: _loss(d, reduction="avg"), ValueError, ["reduction", "'avg'"]),
    ("loss-k-float", lambda d: _loss(d, k=torch.full((1, 4, 4), 0.5, device=d)), TypeError, ["k", "non-integer"]),
    ("loss-k-bool", lambda d: _loss(d, k=torch.zeros(1, 4, 4, dtype=torch.bool, device=d)), TypeError,
     ["k", "integer"]),
    ("loss-k-shape", lambda d: _loss(d, k=torch.zeros(1, 4, 5, dtype=torch.uint8, device=d)), ValueError,
     ["k", "shape"]),
    ("loss-k-above-R", lambda d: _loss(d, k=torch.full((1, 4, 4), 4, dtype=torch.int64, device=d)), ValueError,
     ["k", "0..3"]),
    ("loss-k-negative", lambda d: _loss(d, k=torch.full((1, 4, 4), -1, dtype=torch.int16, device=d)), ValueError,
     ["k", "0..3"]),
    ("loss-k-meta", lambda d: _loss(d, k=torch.zeros(1, 4, 4, dtype=torch.uint8, device="meta")), ValueError,
     ["k", "device"]),
    ("loss-valid-dtype", lambda d: _loss(d, valid=torch.ones(1, 4, 4, device=d)), TypeError, ["valid", "bool"]),
    ("loss-logits-int", lambda d: _loss(d, logits=torch.zeros(1, 4, 4, 4, dtype=torch.int64, device=d)), TypeError,
     ["logits"]),
    ("loss-one-channel", lambda d: _loss(d, logits=torch.zeros(1, 1, 4, 4, device=d)), ValueError,
     ["logits", "channels"]),
    ("stats-n_bins-bool", lambda d: _stats(d, n_bins=True), TypeError, ["n_bins"]),
    ("stats-n_bins-huge", lambda d: _stats(d, n_bins=2**26, auc_bins=2), ValueError, ["n_bins", "1024"]),
    ("stats-n_bins-zero", lambda d: _stats(d, n_bins=0), ValueError, ["n_bins"]),
    ("stats-n_bins-float", lambda d: _stats(d, n_bins=15.0), TypeError, ["n_bins"]),
    ("stats-auc_bins-one", lambda d: _stats(d, auc_bins=1), ValueError, ["auc_bins"]),
    ("stats-auc_bins-huge", lambda d: _stats(d, auc_bins=2**21), ValueError, ["auc_bins", "1048576"]),
    ("stats-num_raters-float", lambda d: _stats(d, target=_votes((1, 4, 4), 3, device=d), num_raters=2.5),
     TypeError, ["num_raters"]),
    ("stats-num_raters-str", lambda d: _stats(d, target=_votes((1, 4, 4), 3, device=d), num_raters="3"),
     TypeError, ["num_raters"]),
    ("stats-num_raters-zero", lambda d: _stats(d, target=_votes((1, 4, 4), 3, device=d), num_raters=0),
     ValueError, ["num_raters"]),
    ("stats-majority-float", lambda d: _stats(d, majority=1.5), TypeError, ["majority"]),
    ("stats-kind", lambda d: _stats(d, kind="probs"), ValueError, ["kind"]),
    ("stats-prob-above-1", lambda d: _stats(d, pred=torch.full((1, 4, 4), 1.5, device=d)), ValueError,
     ["pred", "[0, 1]"]),
    ("stats-ordinal-nan", lambda d: _stats(d, pred=torch.full((1, 4, 4, 4), float("nan"), device=d),
                                           kind="ordinal"), ValueError, ["kind='ordinal'", "NaN"]),
    ("stats-target-device", lambda d: _stats(d, target=torch.zeros(1, 3, 4, 4, dtype=torch.uint8, device="meta")),
     ValueError, ["device"]),
    ("readout-majority-str", lambda d: _readout(d, majority="2"), TypeError, ["majority"]),
    ("readout-name", lambda d: _readout(d, readout="mean"), ValueError, ["readout", "'mean'"]),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_argument(be, case):
    name, factory, exc, words = case
    backend, dev = be
    with pytest.raises(exc) as info:
        factory(dev)(backend)
    for word in words:
        assert word in str(info.value), (name, str(info.value))


def test_numpy_and_other_integer_arguments_are_accepted(be):
    backend, dev = be
    logits, k = _logits(2, 3, (5, 4), device=dev), _votes((2, 5, 4), 3, device=dev)
    want = orcal.ordinal_loss(logits, k, majority=2, rps_weight=0.5, backend=backend)
    got = orcal.ordinal_loss(logits, k, majority=np.int64(2), rps_weight=np.float32(0.5), backend=backend)
    torch.testing.assert_close(got, want)
    for dtype in (torch.int16, torch.int32, torch.int64, torch.uint16, torch.uint32):
        torch.testing.assert_close(orcal.ordinal_loss(logits, k.to(dtype), majority=2, rps_weight=0.5,
                                                      backend=backend), want)
    p = torch.rand(2, 5, 4).to(dev)
    a = orcal.calibration_stats(p, k, num_raters=np.int64(3), n_bins=np.int32(15), backend=backend)
    b = orcal.calibration_stats(p, k, num_raters=3, n_bins=15, backend=backend)
    assert torch.equal(a.n, b.n) and torch.equal(a.pos, b.pos)


def test_empty_batch_gives_no_rows(be):
    backend, dev = be
    masks = torch.zeros(0, 3, 4, 4, dtype=torch.uint8, device=dev)
    for pred, kind in ((torch.rand(0, 4, 4).to(dev), "prob"), (torch.randn(0, 4, 4, 4).to(dev), "ordinal")):
        st_ = orcal.calibration_stats(pred, masks, kind=kind, backend=backend)
        assert st_.n_images == 0 and st_.n_bins == 15
    assert orcal.ordinal_loss(torch.randn(0, 4, 4, 4, device=dev), torch.zeros(0, 4, 4, dtype=torch.uint8,
                                                                                device=dev), backend=backend) == 0


def test_confident_expected_readout_stays_in_unit_interval(be):
    """The issue's case: R = 7, logits (-100 x6, -17, 0): the softmax sum rounds past 1 without the clamp."""
    backend, dev = be
    z = torch.tensor([-100.0] * 6 + [-17.0, 0.0]).view(1, 8, 1, 1).repeat(2, 1, 3, 5).to(dev)
    z[1] = torch.tensor([0.0, -17.0] + [-100.0] * 6).view(8, 1, 1)
    for readout in ("expected", "majority"):
        p = orcal.foreground_probability(z, readout, backend=backend)
        assert float(p.min()) >= 0 and float(p.max()) <= 1
        k = torch.stack([torch.full((3, 5), 7), torch.zeros(3, 5)]).to(torch.uint8).to(dev)
        m = orcal.calibration_metrics(orcal.calibration_stats(z, k, num_raters=7, kind="ordinal", readout=readout,
                                                              backend=backend))
        assert m["mr_ece"] < 1e-6 and m["auc"] == 1.0


def test_infinite_logits_majority_readout_matches_reference(be):
    backend, dev = be
    inf = float("inf")
    z = torch.zeros(1, 4, 1, 4)
    z[0, 3, 0, 0] = inf                  # a level above the majority is certain: p = 1
    z[0, 0, 0, 1] = inf                  # a level below it: p = 0
    z[0, :2, 0, 2] = -inf                # every level below is impossible: p = 1
    z[0, 2:, 0, 3] = -inf                # every level from the majority on is impossible: p = 0
    want = reference.foreground_probability(z, "majority")
    assert want.flatten().tolist() == [1.0, 0.0, 1.0, 0.0]
    got = orcal.foreground_probability(z.to(dev), "majority", backend=backend).cpu()
    assert got.flatten().tolist() == want.flatten().tolist()


def test_invalid_voxels_get_exactly_zero_gradient(be):
    backend, dev = be
    z = _logits(2, 3, (4, 4), device="cpu")
    valid = torch.rand(2, 4, 4, generator=torch.Generator().manual_seed(2)) < 0.6
    z[:, 0][~valid] = float("nan")
    z[:, 2][~valid] = float("inf")
    z[:, 3][~valid] = -float("inf")
    k = _votes((2, 4, 4), 3)
    for reduction in ("mean", "sum", "none"):
        x = z.clone().to(dev).requires_grad_()
        loss = orcal.ordinal_loss(x, k.to(dev), valid=valid.to(dev), reduction=reduction, backend=backend)
        loss.sum().backward()
        grad = x.grad.cpu()
        assert torch.isfinite(grad).all(), reduction
        assert (grad.permute(1, 0, 2, 3)[:, ~valid] == 0).all(), reduction
        want = reference.ordinal_loss_grad(torch.where(valid.unsqueeze(1), z, 0.0), k, valid=valid,
                                           reduction=reduction)
        torch.testing.assert_close(grad, want.float(), rtol=1e-4, atol=1e-6)


def test_nll_bound_is_symmetric(be):
    """A confident miss costs -log(1e-7) pairs on either side (p = 0 with every rater voting foreground, or
    p = 1 with none), in float32 and float64 alike."""
    backend, dev = be
    for dtype in (torch.float32, torch.float64):
        p = torch.tensor([[[0.0, 1.0]]], dtype=dtype, device=dev)
        k = torch.tensor([[[3, 0]]], dtype=torch.uint8, device=dev)
        st_ = orcal.calibration_stats(p, k, num_raters=3, backend=backend)
        want = -6 * math.log(torch.tensor(1e-7, dtype=dtype).item())
        assert float(st_.nll[0]) == pytest.approx(want, rel=1e-6), dtype


def test_float64_loss_and_gradient_are_float64_exact(be):
    backend, dev = be
    z = _logits(1, 4, (6, 6), dtype=torch.float64)
    k = _votes((1, 6, 6), 4, seed=3)
    x = z.clone().to(dev).requires_grad_()
    loss = orcal.ordinal_loss(x, k.to(dev), rps_weight=0.3, backend=backend)
    loss.backward()
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss.cpu(), reference.ordinal_loss(z, k, 0.3), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(x.grad.cpu(), reference.ordinal_loss_grad(z, k, 0.3), rtol=1e-10, atol=1e-15)


def test_double_backward(be):
    backend, dev = be
    z, k = _logits(1, 3, (3, 3), dtype=torch.float64, device=dev), _votes((1, 3, 3), 3, device=dev)
    x = z.clone().requires_grad_()
    (g,) = torch.autograd.grad(orcal.ordinal_loss(x, k, backend="torch"), x, create_graph=True)
    v = torch.randn_like(z)
    (hvp,) = torch.autograd.grad((g * v).sum(), x)
    eps = 1e-6  # the Hessian-vector product of the torch backend against a difference of analytic gradients
    fd = (reference.ordinal_loss_grad(z + eps * v, k) - reference.ordinal_loss_grad(z - eps * v, k)) / (2 * eps)
    torch.testing.assert_close(hvp, fd, rtol=1e-5, atol=1e-9)
    if backend != "torch":
        x = z.clone().requires_grad_()
        loss = orcal.ordinal_loss(x, k, backend=backend)
        with pytest.raises(RuntimeError, match="double backward.*backend='torch'"):
            torch.autograd.grad(loss, x, create_graph=True)


def test_torch_func_grad(be):
    backend, dev = be
    z, k = _logits(1, 3, (3, 3), device=dev), _votes((1, 3, 3), 3, device=dev)
    g = torch.func.grad(lambda t: orcal.ordinal_loss(t, k))(z)  # auto: correct under the transform
    torch.testing.assert_close(g.cpu(), reference.ordinal_loss_grad(z.cpu(), k.cpu()), rtol=1e-5, atol=1e-7)
    if backend != "torch":
        with pytest.raises(RuntimeError, match="torch.func.*backend='torch'"):
            torch.func.grad(lambda t: orcal.ordinal_loss(t, k, backend=backend))(z)


_TOL = {torch.float32: 2e-4, torch.float64: 1e-9, torch.float16: 2e-2, torch.bfloat16: 6e-2}


@settings(max_examples=12 if INTERPRETED else 40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_property_every_op_matches_reference(be, data):
    backend, dev = be
    R = data.draw(st.integers(1, 8), "R")
    dims = data.draw(st.sampled_from([(3, 4), (2, 3, 5), (1, 7)]), "S")
    B = data.draw(st.integers(1, 2), "B")
    dtype = data.draw(st.sampled_from(list(_TOL)), "dtype")
    scale = data.draw(st.sampled_from([0.5, 3.0, 40.0, 300.0]), "scale")  # 40+: confident voxels
    majority = data.draw(st.one_of(st.none(), st.integers(1, R)), "majority")
    rps = data.draw(st.sampled_from([0.0, 0.25, 1.0, 3.0]), "rps_weight")
    readout = data.draw(st.sampled_from(["majority", "expected"]), "readout")
    seed = data.draw(st.integers(0, 2**16), "seed")
    z = _logits(B, R, dims, seed=seed, scale=scale, dtype=dtype)
    k = _votes((B, *dims), R, seed=seed + 1)
    tol = _TOL[dtype]
    p = orcal.foreground_probability(z.to(dev), readout, majority, backend=backend).cpu()
    want_p = reference.foreground_probability(z, readout, majority)
    assert float(p.min()) >= 0 and float(p.max()) <= 1
    torch.testing.assert_close(p.double(), want_p.double(), rtol=tol, atol=tol)
    x = z.clone().to(dev).requires_grad_()
    loss = orcal.ordinal_loss(x, k.to(dev), rps_weight=rps, majority=majority, backend=backend)
    loss.backward()
    torch.testing.assert_close(loss.cpu().double(), reference.ordinal_loss(z, k, rps, majority).double(),
                               rtol=tol, atol=tol)
    torch.testing.assert_close(x.grad.cpu().double(), reference.ordinal_loss_grad(z, k, rps, majority).double(),
                               rtol=tol, atol=tol)
    got = orcal.calibration_stats(z.to(dev), k.to(dev), num_raters=R, kind="ordinal", readout=readout,
                                  majority=majority, backend=backend).to("cpu")
    assert int(got.n.sum()) == B * math.prod(dims) * R and int(got.a.sum()) == int(k.long().sum())
    ref = reference.calibration_stats(want_p, k, R, majority=majority)  # brier and nll are continuous in p
    torch.testing.assert_close(got.brier, ref.brier, rtol=10 * tol, atol=10 * tol)
    torch.testing.assert_close(got.nll, ref.nll, rtol=10 * tol, atol=10 * tol)


@pytest.mark.skipif(not _ext.compiled(), reason="needs the compiled extension")
@pytest.mark.skipif(INTERPRETED, reason="C++ checks run in the main process")
def test_direct_op_calls_check_their_arguments():
    for R in (0, 256):
        with pytest.raises(ValueError, match="1..255 raters"):
            torch.ops.orcal.orc_targets(torch.zeros(2, R, 3, 3, dtype=torch.uint8))
    masks = torch.zeros(1, 3, 5, 6, dtype=torch.uint8)
    with pytest.raises(ValueError, match="n_bins must lie in 1..1024"):
        torch.ops.orcal.calibration_stats(torch.rand(1, 5, 6), masks, None, 3, True, "prob", "majority", 2, 2**26, 2)
    with pytest.raises(ValueError, match="auc_bins must lie in 2..1048576"):
        torch.ops.orcal.calibration_stats(torch.rand(1, 5, 6), masks, None, 3, True, "prob", "majority", 2, 15, 2**21)


@pytest.mark.skipif(not _ext.compiled() or not sys.platform.startswith("linux"), reason="compiled ops, rlimit")
@pytest.mark.skipif(INTERPRETED, reason="runs in the main process")
def test_running_out_of_memory_is_a_memory_error():
    code = """
import resource, torch, orcal
resource.setrlimit(resource.RLIMIT_AS, (6 * 1024**3, 6 * 1024**3))
try:  # 600 images x 2^21 int64 AUC counts = 10 GB of statistics rows
    orcal.calibration_stats(torch.rand(600, 2, 2), torch.zeros(600, 2, 2, dtype=torch.uint8), num_raters=3,
                            auc_bins=2**20, backend="cpp")
except MemoryError:
    print("MemoryError")
"""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "MemoryError", proc.stdout + proc.stderr[-2000:]


@pytest.mark.skipif(INTERPRETED, reason="runs in the main process")
def test_an_extension_that_fails_to_load_is_not_silent():
    code = """
import importlib.abc, importlib.machinery, sys, warnings
class Broken(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        return importlib.machinery.ModuleSpec(name, self) if name == "orcal._C" else None
    def create_module(self, spec):
        raise ImportError("undefined symbol: _ZN3c104impl8GPUTrace")
    def exec_module(self, module):
        pass
sys.meta_path.insert(0, Broken())
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import orcal
print([str(w.message) for w in caught if "orcal" in str(w.message)])
print(orcal.build_info()["load_error"])
"""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "could not be loaded" in proc.stdout and "pip install" in proc.stdout
    assert proc.stdout.strip().splitlines()[-1].startswith("undefined symbol")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a pure-Python install (no orcal._C at all) stays quiet
        assert _ext.LOAD_ERROR is None or not _ext.compiled()


class _Meta(torch.Tensor):
    """A torch.Tensor subclass standing in for MONAI's MetaTensor (which dispatches like one)."""


def test_loss_takes_the_ecosystems_targets(be):
    backend, dev = be
    z = _logits(2, 3, (4, 5), device=dev)
    k = _votes((2, 4, 5), 3, device=dev)
    want = orcal.ordinal_loss(z, k, backend=backend)
    for other in (k[:, None], k.float(), k[:, None].to(torch.int16), k.to(torch.float16)):
        torch.testing.assert_close(orcal.ordinal_loss(z, other, backend=backend), want)
    with pytest.raises(TypeError, match="non-integer"):
        orcal.ordinal_loss(z, k.float() + 0.5, backend=backend)
    # nnU-Net pads with -1: those voxels are invalid
    padded = k.to(torch.int16).clone()
    padded[:, :, -1] = -1
    valid = padded != -1
    torch.testing.assert_close(orcal.ordinal_loss(z, padded, ignore_index=-1, backend=backend),
                               orcal.ordinal_loss(z, k, valid=valid, backend=backend))
    # a tensor subclass keeps its gradient
    x = z.clone().as_subclass(_Meta).requires_grad_()
    orcal.ordinal_loss(x, k.as_subclass(_Meta), backend=backend).backward()
    y = z.clone().requires_grad_()
    orcal.ordinal_loss(y, k, backend=backend).backward()
    torch.testing.assert_close(torch.Tensor.as_subclass(x.grad, torch.Tensor), y.grad)


@pytest.mark.slow
@pytest.mark.skipif(INTERPRETED, reason="compiled graphs of the interpreter are not what users run")
def test_every_op_compiles_with_fullgraph(be):
    """The backend is chosen outside the graph and data checks are asynchronous assertions inside it."""
    backend, dev = be
    torch._dynamo.reset()
    z, k = _logits(1, 3, (6, 5), device=dev), _votes((1, 6, 5), 3, device=dev)
    valid = torch.rand(1, 6, 5, generator=torch.Generator().manual_seed(9)).to(dev) > 0.3
    loss = torch.compile(lambda x, kk, v: orcal.ordinal_loss(x, kk, valid=v, backend=backend), fullgraph=True)
    x = z.clone().requires_grad_()
    value = loss(x, k, valid)
    value.backward()
    y = z.clone().requires_grad_()
    want = orcal.ordinal_loss(y, k, valid=valid, backend=backend)
    want.backward()
    torch.testing.assert_close(value, want)
    torch.testing.assert_close(x.grad, y.grad)
    readout = torch.compile(lambda x: orcal.foreground_probability(x, "expected", backend=backend), fullgraph=True)
    torch.testing.assert_close(readout(z), orcal.foreground_probability(z, "expected", backend=backend))
    stats = torch.compile(lambda x, kk: orcal.calibration_stats(x, kk, num_raters=3, kind="ordinal",
                                                               backend=backend).pack(), fullgraph=True)
    counts, _ = stats(z, k)
    assert torch.equal(counts.cpu(), orcal.calibration_stats(z, k, num_raters=3, kind="ordinal",
                                                            backend=backend).pack()[0].cpu())
    masks = (torch.rand(1, 3, 6, 5, generator=torch.Generator().manual_seed(10)) < 0.5).to(torch.uint8).to(dev)
    targets = torch.compile(lambda m: orcal.orc_targets(m, backend=backend), fullgraph=True)
    assert torch.equal(targets(masks).cpu(), masks.sum(1, dtype=torch.uint8).cpu())


def _sync_free_calls(backend, z, k, masks):
    """Every op once, as a training or evaluation step calls them."""
    return (orcal.orc_targets(masks, backend=backend),
            orcal.ordinal_loss(z, k, backend=backend),
            orcal.foreground_probability(z, "expected", backend=backend),
            *orcal.calibration_stats(z, k, num_raters=3, kind="ordinal", backend=backend).pack())


def _compiled_cuda_backends() -> list:
    """The compiled kernels on CUDA tensors; a machine without them gets one case that says why it is skipped."""
    cases = [p for p in BACKENDS if p.id in ("cpp-cuda", "triton-cuda")]
    if cases:
        return cases
    if not torch.cuda.is_available():
        return [pytest.param(None, id="cuda", marks=pytest.mark.cuda)]  # tests/conftest.py: no GPU here
    return [pytest.param(None, id="cuda", marks=pytest.mark.skip(
        reason="this install has no compiled CUDA kernels (neither orcal._C with CUDA nor Triton)"))]


@pytest.mark.parametrize("be", _compiled_cuda_backends())
def test_ops_capture_in_a_cuda_graph(be):
    """While a stream is captured the kernels check their flags on the device: no synchronisation, so
    torch.cuda.graph (and torch.compile(mode="reduce-overhead")) can record them; replays give eager results."""
    backend, dev = be
    z, k = _logits(2, 3, (8, 6, 5), device=dev), _votes((2, 8, 6, 5), 3, device=dev)
    masks = (torch.rand(2, 3, 8, 6, 5, generator=torch.Generator().manual_seed(4)) < 0.5).to(torch.uint8).to(dev)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up outside the graph (allocations, Triton's compilation)
        _sync_free_calls(backend, z, k, masks)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = _sync_free_calls(backend, z, k, masks)
    z.copy_(_logits(2, 3, (8, 6, 5), seed=7, device=dev))  # new data in the graph's static inputs
    k.copy_(_votes((2, 8, 6, 5), 3, seed=8, device=dev))
    graph.replay()
    torch.cuda.synchronize()
    for got, want in zip(outputs, _sync_free_calls(backend, z, k, masks)):
        torch.testing.assert_close(got, want)


# Only the Triton launchers read ORCAL_ASYNC_CHECKS per call (the CUDA kernels read it once per process), and
# on CPU tensors they run in the interpreter: this test exists in test_triton_cases' child process only.
if INTERPRETED:
    def test_async_checks_keep_results_and_catch_bad_values(be, monkeypatch):
        """ORCAL_ASYNC_CHECKS=1 (no host synchronisation anywhere): the same results; a bad value still fails
        (on CPU tensors the device-side assertion raises at once; on a GPU it would fail the stream)."""
        backend, dev = be  # the only backend of the child process: ("triton", "cpu")
        z, k = _logits(1, 3, (4, 5), device=dev), _votes((1, 4, 5), 3, device=dev)
        masks = (torch.rand(1, 3, 4, 5, generator=torch.Generator().manual_seed(2)) < 0.5).to(torch.uint8)
        want = _sync_free_calls(backend, z, k, masks)
        monkeypatch.setenv("ORCAL_ASYNC_CHECKS", "1")
        for got, expected in zip(_sync_free_calls(backend, z, k, masks), want):
            torch.testing.assert_close(got, expected)
        with pytest.raises(RuntimeError, match="orcal: bad masks"):
            orcal.orc_targets(masks * 2, backend=backend)
