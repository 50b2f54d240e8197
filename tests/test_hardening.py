"""Hostile and careless inputs (SPEC §8): a clear error naming the argument or the file, or the right answer.

Every op case runs on each backend available here: the reference and the compiled CPU kernels in this
process, the Triton kernels in Triton's interpreter in a child process (``test_triton_cases``), and all of
them on CUDA tensors on a GPU machine. Confident logits, infinite logits and NaN at invalid voxels are the
cases real CT volumes produce.
"""

from __future__ import annotations

import math
import os
import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import orcal
from orcal.data.safe_pickle import UnsafePickleError, safe_loads
from orcal.ops import _ext, reference

REPO = Path(__file__).resolve().parents[1]
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _backends() -> list:
    if INTERPRETED:  # the child process of test_triton_cases: Triton on CPU tensors only
        return [pytest.param(("triton", "cpu"), id="triton")]
    out = [pytest.param(("torch", "cpu"), id="torch")]
    if _ext.compiled():
        out.append(pytest.param(("cpp", "cpu"), id="cpp"))
    if torch.cuda.is_available():
        out.append(pytest.param(("torch", "cuda"), id="torch-cuda", marks=pytest.mark.cuda))
        if _ext.cuda_built():
            out.append(pytest.param(("cpp", "cuda"), id="cpp-cuda", marks=pytest.mark.cuda))
        if _ext.triton_available():
            out.append(pytest.param(("triton", "cuda"), id="triton-cuda", marks=pytest.mark.cuda))
    return out


BACKENDS = _backends()


@pytest.fixture(params=BACKENDS)
def be(request):
    return request.param


def run_triton_cases(test_file: str) -> None:
    """Run the ``triton`` backend cases of ``test_file`` in Triton's interpreter (a child process)."""
    if INTERPRETED:
        pytest.skip("already in the interpreter")
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), str(REPO / "tests"), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-m", "pytest", test_file, "-q", "-x", "-p", "no:cacheprovider",
                           "-k", "triton"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout


def test_triton_cases():
    """The backend cases of this file on the Triton kernels, in Triton's interpreter (a child process)."""
    run_triton_cases(__file__)


def _votes(shape, R, seed=0, device="cpu"):
    return torch.randint(0, R + 1, shape, generator=torch.Generator().manual_seed(seed), dtype=torch.uint8).to(device)


def _logits(B, R, S, seed=0, device="cpu", scale=3.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn((B, R + 1, *S), generator=g, dtype=torch.float64)).to(dtype).to(device)


# --- a table of bad arguments, per op and backend ---------------------------------------------------------

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


# --- confident and infinite logits -------------------------------------------------------------------------

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


# --- second derivatives ------------------------------------------------------------------------------------

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


# --- random dtypes, shapes and scalar arguments ------------------------------------------------------------

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


# --- direct torch.ops.orcal calls (the C++ checks) ---------------------------------------------------------

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


# --- the metric ---------------------------------------------------------------------------------------------

@pytest.mark.skipif(INTERPRETED, reason="runs in the main process")
def test_metric_checks_an_empty_batch():
    from orcal.metrics import MultiRaterCalibration

    metric = MultiRaterCalibration()
    with pytest.raises(ValueError, match="pred"):
        metric.update(torch.rand(0, 7), torch.zeros(0, 3, 4, 4, dtype=torch.uint8))
    metric.update(torch.rand(0, 4, 4), torch.zeros(0, 3, 4, 4, dtype=torch.uint8))  # consistent: adds nothing
    metric.update(torch.rand(1, 4, 4), torch.ones(1, 3, 4, 4, dtype=torch.uint8))
    assert metric.compute()["n_images"] == 1


# --- files -------------------------------------------------------------------------------------------------

def _png(path: Path, array: np.ndarray) -> Path:
    from PIL import Image

    Image.fromarray(array).save(path)
    return path


@pytest.mark.skipif(INTERPRETED, reason="runs in the main process")
def test_colour_masks_are_an_error_unless_a_channel_is_chosen(tmp_path):
    from orcal.data import load_dataset
    from orcal.io import read_mask

    fg = np.zeros((6, 6), np.uint8)
    fg[1:4, 2:5] = 255
    green = np.zeros((6, 6, 3), np.uint8)
    green[..., 1] = fg
    alpha = np.zeros((6, 6, 4), np.uint8)
    alpha[..., 3] = fg
    grey = np.repeat(fg[..., None], 3, axis=2)
    opaque = np.concatenate([grey, np.full((6, 6, 1), 255, np.uint8)], axis=2)
    for name, arr in (("green", green), ("alpha", alpha)):
        path = _png(tmp_path / f"{name}.png", arr)
        with pytest.raises(ValueError, match=f"{name}.png: a colour mask"):
            read_mask(path)
        assert (read_mask(path, channel=1 if name == "green" else 3) == (fg > 0)).all()
    for name, arr in (("grey", grey), ("opaque", opaque)):
        assert (read_mask(_png(tmp_path / f"{name}.png", arr)) == (fg > 0)).all()
    # the folder loader and orcal fuse read by the same rule
    case = tmp_path / "data" / "case1"
    case.mkdir(parents=True)
    np.save(case / "image.npy", np.random.rand(6, 6).astype(np.float32))
    for r in (1, 2):
        _png(case / f"rater{r}.png", green)
    with pytest.raises(ValueError, match="rater1.png: a colour mask"):
        load_dataset("folder", root=tmp_path / "data")[0]
    item = load_dataset("folder", root=tmp_path / "data", mask_channel=1)[0]
    assert (item["masks"][0].numpy() == (fg > 0)).all()
    from orcal.cli import main

    files = [str(case / "rater1.png"), str(case / "rater2.png")]
    assert main(["fuse", "--method", "soft", "--out", str(tmp_path / "o"), *files]) == 2
    assert main(["fuse", "--method", "soft", "--out", str(tmp_path / "o"), "--mask-channel", "1", *files]) == 0


@pytest.mark.skipif(INTERPRETED, reason="runs in the main process")
def test_nan_pixel_names_the_file_at_load_time(tmp_path):
    from orcal.data import load_dataset

    case = tmp_path / "case1"
    case.mkdir()
    image = np.random.rand(6, 6).astype(np.float32)
    image[2, 3] = np.nan
    np.save(case / "image.npy", image)
    for r in (1, 2):
        np.save(case / f"rater{r}.npy", np.eye(6, dtype=np.uint8))
    with pytest.raises(ValueError, match=r"image\.npy: the image holds 1 NaN or infinite values"):
        load_dataset("folder", root=tmp_path)[0]


@pytest.mark.skipif(INTERPRETED, reason="runs in the main process")
def test_hostile_pickles_are_bounded():
    legit = {"image": np.random.rand(8, 8), "masks": [np.zeros((8, 8), np.uint8)] * 4, "uid": "1.2"}
    for protocol in (2, 4, 5):
        out = safe_loads(pickle.dumps(legit, protocol=protocol))
        assert np.array_equal(out["image"], legit["image"]) and len(out["masks"]) == 4
    # 38 bytes that ask for 100 GB
    bomb = b"\x80\x04\x8c\x08builtins\x8c\tbytearray\x93\x8a\x05\x00\xe8vH\x17\x85R."
    with pytest.raises(UnsafePickleError, match="bytearray"):
        safe_loads(bomb)
    with pytest.raises(UnsafePickleError, match="list"):
        safe_loads(pickle.dumps(_RangeListBomb()))
    nested = [np.zeros((64, 64), np.uint8)]
    for _ in range(40):  # 2^40 references to one mask in a 4 kB file
        nested = [nested, nested]
    with pytest.raises(UnsafePickleError, match="unfolds"):
        safe_loads(pickle.dumps({"masks": nested}))
    deep: list = []
    for _ in range(200):
        deep = [deep]
    with pytest.raises(UnsafePickleError, match="deep"):
        safe_loads(pickle.dumps(deep))
    loop: list = []
    loop.append(loop)
    with pytest.raises(UnsafePickleError, match="contains itself"):
        safe_loads(pickle.dumps(loop))


class _RangeListBomb:
    """Pickles as ``list(range(10**12))``: builtins.list called on a builtins.range."""

    def __reduce__(self):
        return list, (range(10**12),)


@pytest.mark.skipif(INTERPRETED, reason="runs in the main process")
def test_fuse_cases_in_a_folder_with_glob_characters(tmp_path):
    from orcal.cli import main

    case = tmp_path / "d" / "case[1]"
    case.mkdir(parents=True)
    for r in (1, 2, 3):
        np.save(case / f"rater{r}.npy", np.eye(4, dtype=np.uint8))
    out = tmp_path / "o"
    assert main(["fuse", "--method", "soft", "--out", str(out), "--cases", str(tmp_path / "d" / "*"),
                 "--raters", "rater*.npy"]) == 0
    assert (out / "case[1].npy").is_file()


@pytest.mark.skipif(INTERPRETED, reason="runs in the main process")
def test_staple_refuses_an_infinite_confidence_weight():
    from orcal.staple import staple

    with pytest.raises(ValueError, match="confidence_weight"):
        staple(torch.ones(1, 3, 4, 4, dtype=torch.uint8), confidence_weight=float("inf"))


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


# --- training: resume, checkpoints, the CLI ------------------------------------------------------------------

def _tiny_run(out: Path, **kw):
    from orcal.train import TrainConfig, train

    base = dict(dataset="synthetic", dataset_options={"n": 8, "shape": (16, 16), "R": 3, "seed": 3},
                arch="unet-small", model_options={"base_channels": 4, "depth": 1}, epochs=2, batch_size=4,
                lr=1e-3, max_steps_per_epoch=1, out_dir=str(out))
    base.update(kw)
    return train(TrainConfig(**base), progress=False)


@pytest.mark.skipif(INTERPRETED, reason="runs in the main process")
def test_extending_a_finished_run_keeps_learning(tmp_path):
    out = tmp_path / "a"
    assert [h["lr"] for h in _tiny_run(out).history] == pytest.approx([1e-3, 5e-4])
    lrs = [h["lr"] for h in _tiny_run(out, epochs=4, resume=True).history]
    assert lrs[:2] == pytest.approx([1e-3, 5e-4])
    assert lrs[2:] == pytest.approx([1e-3 * 0.5 * (1 + math.cos(math.pi * e / 4)) for e in (2, 3)])
    assert min(lrs) > 0


@pytest.mark.skipif(INTERPRETED, reason="runs in the main process")
@pytest.mark.parametrize("change", [{"lr": 2e-3}, {"rps_weight": 0.5}, {"majority": 1},
                                    {"fusion_options": {"sigma": 2.0}},
                                    {"dataset_options": {"n": 9, "shape": (16, 16), "R": 3, "seed": 3}},
                                    {"patch_size": 8}, {"weight_decay": 0.0}])
def test_resume_refuses_changed_settings(tmp_path, change):
    out = tmp_path / "a"
    _tiny_run(out, epochs=1)
    key = next(iter(change))
    with pytest.raises(ValueError, match=f"cannot resume .*last.pt.*{key}="):
        _tiny_run(out, resume=True, **change)


@pytest.mark.skipif(INTERPRETED, reason="runs in the main process")
def test_resume_with_only_best_pt_refuses_to_overwrite_it(tmp_path):
    out = tmp_path / "a"
    _tiny_run(out, epochs=1)
    (out / "last.pt").unlink()
    before = (out / "best.pt").read_bytes()
    with pytest.raises(ValueError, match="best.pt .* but no last.pt"):
        _tiny_run(out, resume=True)
    assert (out / "best.pt").read_bytes() == before


@pytest.mark.skipif(INTERPRETED, reason="runs in the main process")
def test_incomplete_checkpoints_name_the_file(tmp_path):
    from orcal.train import atomic_save, load_model

    out = tmp_path / "a"
    _tiny_run(out, epochs=1)
    ckpt = torch.load(out / "last.pt", weights_only=True)
    del ckpt["rng"]
    atomic_save(ckpt, out / "last.pt")
    with pytest.raises(ValueError, match="last.pt is incomplete: it lacks rng"):
        _tiny_run(out, resume=True)
    best = torch.load(out / "best.pt", weights_only=True)
    name = next(iter(best["model"]))
    best["model"][name] = torch.zeros(1)
    atomic_save(best, out / "broken.pt")
    with pytest.raises(ValueError, match="broken.pt does not fit its own model"):
        load_model(out / "broken.pt")
    del best["model_spec"]["arch"]
    atomic_save(best, out / "nospec.pt")
    with pytest.raises(ValueError, match="nospec.pt is incomplete"):
        load_model(out / "nospec.pt")


@pytest.mark.skipif(INTERPRETED, reason="runs in the main process")
def test_out_naming_a_file_and_leftover_temporaries(tmp_path, capsys):
    from orcal.cli import main

    path = tmp_path / "file"
    path.write_text("not a folder")
    assert main(["train", "--out", str(path), "--epochs", "1", "--quiet"]) == 2
    assert "is an existing file" in capsys.readouterr().err
    out = tmp_path / "a"
    out.mkdir()
    stale = out / ".last.pt.abc123.tmp"
    stale.write_bytes(b"half a checkpoint")
    _tiny_run(out, epochs=1)
    assert not stale.exists() and (out / "last.pt").is_file()


@pytest.mark.skipif(INTERPRETED, reason="runs in the main process")
def test_a_single_patch_size_means_a_cube():
    from orcal.commands._args import patch_size as _patch_size
    from orcal.models import as_tuple

    assert _patch_size("16") == 16 and _patch_size("16,8") == (16, 8) and _patch_size("none") is None
    assert as_tuple(16, 3) == (16, 16, 16) and as_tuple((16,), 3) == (16, 16, 16) and as_tuple((4, 5), 2) == (4, 5)
    with pytest.raises(ValueError, match="patch_size"):
        as_tuple((4, 5), 3)


# --- the ecosystem's targets (MONAI, nnU-Net) --------------------------------------------------------------

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


@pytest.mark.skipif(INTERPRETED, reason="runs in the main process")
def test_loss_modules_take_rater_stacks_and_padding():
    from orcal.losses import OrdinalLoss, SoftBCELoss

    masks = (torch.rand(2, 3, 4, 5, generator=torch.Generator().manual_seed(4)) < 0.5)
    z = _logits(2, 3, (4, 5))
    k = orcal.orc_targets(masks)
    torch.testing.assert_close(OrdinalLoss(from_masks=True)(z, masks.float()), OrdinalLoss()(z, k[:, None].float()))
    logit = torch.randn(2, 1, 4, 5)
    soft = masks.float().mean(1)
    torch.testing.assert_close(SoftBCELoss(from_masks=True)(logit, masks.float()), SoftBCELoss()(logit, soft))
    torch.testing.assert_close(SoftBCELoss()(logit, soft[:, None]), SoftBCELoss()(logit, soft))
    padded = soft.clone()
    padded[:, 0] = -1
    torch.testing.assert_close(SoftBCELoss(ignore_index=-1)(logit, padded), SoftBCELoss()(logit, soft, padded != -1))
    with pytest.raises(ValueError, match="binary"):
        OrdinalLoss(from_masks=True)(z, masks.float() * 2)
    assert "from_masks=True" in repr(OrdinalLoss(from_masks=True, ignore_index=-1))


# --- torch.compile(fullgraph=True) ------------------------------------------------------------------------

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


# --- no host synchronisation: CUDA graphs and ORCAL_ASYNC_CHECKS=1 ---------------------------------------

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
