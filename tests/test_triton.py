"""Triton kernels (orcal.ops._triton) against orcal.ops.reference.

On CPU tensors the kernels run in Triton's interpreter, which must be switched on (``TRITON_INTERPRET=1``)
before Triton is first imported: a plain run runs this file's CPU cases once in a child process with it set
(``interpreter_verdicts``), so other test modules never see the variable, and each case reports the child's
verdict. Shapes are tiny there. On a
GPU machine the same tests run natively on CUDA tensors (``-m cuda``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton", reason="Triton is not installed")

from orcal import ops  # noqa: E402
from orcal.ops import _triton, reference  # noqa: E402
from orcal.ops.stats import CalibrationStats  # noqa: E402

#: Whether this process imported Triton in interpreter mode (then CPU tensors work, CUDA ones do not).
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICES = [pytest.param("cpu", id="interpreter")]
if not INTERPRETED and torch.cuda.is_available():
    DEVICES.append(pytest.param("cuda", id="cuda", marks=pytest.mark.cuda))
HALF_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


@pytest.fixture(scope="session")
def interpreter_verdicts(request, tmp_path_factory) -> dict[str, tuple[str, str]]:
    """The selected interpreter cases of this file, run once in a child process with TRITON_INTERPRET=1:
    ``{test name: (passed | failed | skipped, message)}``."""
    import xml.etree.ElementTree as ET

    here = Path(__file__).resolve()
    root = here.parents[1]
    ids = [item.nodeid.split("::", 1)[1] for item in request.session.items
           if Path(item.path).resolve() == here and "interpreter" in item.name]
    xml = tmp_path_factory.mktemp("triton-interpreter") / "results.xml"
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-m", "pytest", *(f"{here}::{i}" for i in ids), "-q",
                           "-p", "no:cacheprovider", f"--junitxml={xml}"], cwd=root, env=env, capture_output=True,
                          text=True, timeout=900)
    if not xml.is_file():
        pytest.fail("the Triton interpreter's child process wrote no results:\n" + proc.stdout[-4000:]
                    + proc.stderr[-2000:], pytrace=False)
    verdicts = {}
    for case in ET.parse(xml).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = "skipped" if child.tag == "skipped" else "failed"
                message = (child.get("message") or "") + "\n" + (child.text or "")
                break
        verdicts[case.get("name")] = (outcome, message.strip())
    return verdicts


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    """The device of a test; CPU tensors run in the interpreter, CUDA tensors run compiled kernels.

    Outside the interpreter a CPU case reports its verdict from the child process that ran it there
    (``interpreter_verdicts``; see ``tests/conftest.py``).
    """
    if request.param == "cuda":
        if INTERPRETED or not torch.cuda.is_available():
            pytest.skip("needs a CUDA device and compiled (not interpreted) Triton kernels")
    elif not INTERPRETED:
        verdicts = request.getfixturevalue("interpreter_verdicts")
        request.node.child_verdict = verdicts.get(
            request.node.name, ("failed", f"{request.node.name} did not run in the Triton interpreter's child "
                                          "process"))
        if request.node.child_verdict[0] != "passed":
            request.node.child_verdict = (request.node.child_verdict[0], "in the Triton interpreter (child "
                                          "process, TRITON_INTERPRET=1): " + request.node.child_verdict[1])
    return request.param


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _masks(B, R, S, seed=0, device="cpu", dtype=torch.bool):
    return (torch.rand((B, R, *S), generator=_gen(seed)) < 0.4).to(dtype).to(device)


def _logits(B, R, S, seed=0, device="cpu", dtype=torch.float32, scale=3.0):
    return (scale * torch.randn((B, R + 1, *S), generator=_gen(seed))).to(dtype).to(device)


def _votes(B, R, S, seed=0, device="cpu"):
    return torch.randint(0, R + 1, (B, *S), generator=_gen(seed), dtype=torch.uint8).to(device)


def _poison(device: str) -> None:
    """Leave NaN/0xFF in freed memory, so that elements a kernel forgets to write show up.

    On CUDA the caching allocator serves requests of at most 1 MiB from its small pool (2 MiB segments) and
    larger ones from the large pool: the outputs of these tiny tests come from the small pool, so most of
    the poison goes there (chunks of 512 KiB), and one 4 MiB chunk poisons the large pool.
    """
    chunks = [torch.empty(1 << 19, dtype=torch.uint8, device=device) for _ in range(8)]
    chunks.append(torch.empty(4 << 20, dtype=torch.uint8, device=device))
    for chunk in chunks:
        chunk.fill_(0xFF)  # NaN in every float dtype, 255 in uint8, -1 in signed integers
    del chunks


@pytest.mark.cuda
def test_poison_reaches_the_small_pool(device):
    """A small output allocated after _poison starts out poisoned (on CUDA, where the allocator caches)."""
    if device != "cuda":
        pytest.skip("the CPU allocator gives freed memory back: poisoning is best effort there")
    _poison(device)
    fresh = torch.empty(4096, dtype=torch.uint8, device=device)
    assert bool((fresh == 0xFF).all())


# --- orc_targets ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("R,S", [(1, (5, 7)), (3, (3, 4, 5)), (32, (6, 9))])
@pytest.mark.parametrize("dtype", [torch.bool, torch.uint8])
def test_orc_targets_matches_reference(device, R, S, dtype):
    masks = _masks(2, R, S, seed=R, device=device, dtype=dtype)
    _poison(device)
    k = ops.orc_targets(masks, backend="triton")
    assert k.dtype == torch.uint8 and k.shape == (2, *S)
    assert torch.equal(k.cpu(), reference.orc_targets(masks.cpu()))


def test_orc_targets_rejects_non_binary(device):
    masks = _masks(1, 3, (4, 4), device=device, dtype=torch.uint8)
    masks[0, 1, 2, 3] = 2
    with pytest.raises(ValueError, match="binary"):
        ops.orc_targets(masks, backend="triton")


def test_orc_targets_non_contiguous_and_empty(device):
    masks = _masks(2, 4, (6, 5), device=device).transpose(2, 3)
    assert torch.equal(ops.orc_targets(masks, backend="triton").cpu(), reference.orc_targets(masks.cpu()))
    empty = torch.zeros((0, 3, 4, 4), dtype=torch.bool, device=device)
    assert ops.orc_targets(empty, backend="triton").shape == (0, 4, 4)


# --- foreground_probability -------------------------------------------------------------------------------

@pytest.mark.parametrize("R", [1, 2, 7, 32])
@pytest.mark.parametrize("readout", ["majority", "expected"])
def test_foreground_probability(device, R, readout):
    logits = _logits(2, R, (3, 5), seed=R, device=device)
    m = R // 2 + 1
    _poison(device)
    p = ops.foreground_probability(logits, readout, backend="triton")
    assert p.dtype == logits.dtype and p.shape == (2, 3, 5)
    torch.testing.assert_close(p.cpu(), reference.foreground_probability(logits.cpu(), readout, m),
                               atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_foreground_probability_half(device, dtype):
    logits = _logits(1, 7, (2, 3, 4), device=device, dtype=dtype)
    p = ops.foreground_probability(logits, "majority", majority=3, backend="triton")
    assert p.dtype == dtype
    expected = reference.foreground_probability(logits.cpu(), "majority", 3).to(dtype)
    torch.testing.assert_close(p.cpu().float(), expected.float(), atol=HALF_TOL[dtype], rtol=HALF_TOL[dtype])


# --- ordinal_loss -----------------------------------------------------------------------------------------

def _check_loss(device, R, S, dtype=torch.float32, reduction="mean", use_valid=False, rps_weight=0.7,
                majority=None, scale=3.0, seed=0):
    logits = _logits(2, R, S, seed=seed, device=device, dtype=dtype, scale=scale)
    k = _votes(2, R, S, seed=seed + 1, device=device)
    valid = (torch.rand((2, *S), generator=_gen(seed + 2)) < 0.7).to(device) if use_valid else None
    mine = logits.clone().requires_grad_()
    _poison(device)
    loss = ops.ordinal_loss(mine, k, rps_weight, majority, valid, reduction, backend="triton")
    ref_in = logits.detach().cpu().float().requires_grad_()
    ref_valid = None if valid is None else valid.cpu()
    expected = reference.ordinal_loss(ref_in, k.cpu(), rps_weight, majority, ref_valid, reduction)
    assert loss.dtype == torch.float32 and loss.shape == expected.shape
    torch.testing.assert_close(loss.detach().cpu(), expected.detach(), atol=1e-5, rtol=1e-5)
    upstream = torch.rand(expected.shape, generator=_gen(seed + 3)) + 0.5
    loss.backward(upstream.to(device))
    expected.backward(upstream)
    assert mine.grad.dtype == dtype
    tol = HALF_TOL[dtype]
    torch.testing.assert_close(mine.grad.cpu().float(), ref_in.grad, atol=tol * 1e-1, rtol=tol)
    return loss


@pytest.mark.parametrize("R,S", [(1, (4, 6)), (2, (3, 3, 3)), (7, (5, 6)), (8, (2, 3, 4)), (32, (3, 5))])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_ordinal_loss_values_and_gradients(device, R, S, reduction):
    _check_loss(device, R, S, reduction=reduction, seed=R)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_ordinal_loss_valid(device, reduction):
    _check_loss(device, 7, (2, 5, 6), reduction=reduction, use_valid=True, majority=3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_ordinal_loss_half(device, dtype):
    _check_loss(device, 7, (4, 7), dtype=dtype, use_valid=True)


def test_ordinal_loss_extreme_logits_stay_finite(device):
    loss = _check_loss(device, 4, (3, 5), scale=1e4, reduction="none")
    assert torch.isfinite(loss).all()


def test_ordinal_loss_no_valid_voxel(device):
    logits = _logits(1, 3, (4, 4), device=device).requires_grad_()
    valid = torch.zeros((1, 4, 4), dtype=torch.bool, device=device)
    loss = ops.ordinal_loss(logits, _votes(1, 3, (4, 4), device=device), valid=valid, backend="triton")
    loss.backward()
    assert loss.item() == 0.0 and not logits.grad.any()


def test_ordinal_loss_forward_only(device):
    logits = _logits(2, 3, (4, 5), device=device)
    k = _votes(2, 3, (4, 5), device=device)
    loss, grad = _triton.ordinal_loss_op()(logits, k, None, 1.0, 2, 1, False)
    assert grad.numel() == 0
    torch.testing.assert_close(loss.cpu(), reference.ordinal_loss(logits.cpu(), k.cpu(), 1.0, 2))


def test_ordinal_loss_rejects_votes_above_r(device):
    logits = _logits(1, 3, (4, 4), device=device)
    k = _votes(1, 3, (4, 4), device=device)
    k[0, 1, 1] = 4
    with pytest.raises(ValueError, match="0..R"):
        ops.ordinal_loss(logits, k, backend="triton")


# --- calibration_stats ------------------------------------------------------------------------------------

def _assert_stats_equal(mine: CalibrationStats, expected: CalibrationStats, R: int = 255,
                        exact: bool = True) -> None:
    """Exact counts, close sums. ``exact=False`` for probabilities derived with ``exp`` (logits): the kernels'
    ``exp`` differs from torch's by an ulp, so a voxel on a bin edge may land one bin over (in the ECE, AUC
    score and Dice 0.5 edges): each histogram then keeps its total and differs by at most 2 R."""
    for name in ("n", "a", "tp", "fp", "fn", "pos", "neg"):
        a, b = getattr(mine, name).cpu(), getattr(expected, name)
        if exact:
            assert torch.equal(a, b), name
        elif name in ("tp", "fp", "fn"):
            assert (a - b).abs().max() <= 1, name
        else:
            assert torch.equal(a.sum(-1), b.sum(-1)) and (a - b).abs().sum() <= 2 * R, name
    for name in ("s", "brier", "nll"):
        torch.testing.assert_close(getattr(mine, name).cpu(), getattr(expected, name), atol=1e-6, rtol=1e-6,
                                   msg=name)


def _stats_case(device, kind, readout, target_masks, use_valid, R=5, S=(3, 6, 7), dtype=torch.float32,
                n_bins=15, auc_bins=64, seed=0):
    masks = _masks(2, R, S, seed=seed, device=device)
    logits = _logits(2, R, S, seed=seed + 1, device=device, dtype=dtype, scale=2.0)
    pred = {"ordinal": logits, "logit": logits[:, 0], "prob": torch.sigmoid(logits[:, 0].float()).to(dtype)}[kind]
    valid = (torch.rand((2, *S), generator=_gen(seed + 2)) < 0.7).to(device) if use_valid else None
    m = R // 2 + 1
    _poison(device)
    st = ops.calibration_stats(pred, masks if target_masks else reference.orc_targets(masks),
                               None if target_masks else R, kind, readout, None, n_bins, auc_bins, valid,
                               backend="triton")
    p = reference.binary_probability(pred.cpu(), kind, readout, m)
    expected = reference.calibration_stats(p, reference.orc_targets(masks.cpu()), R, n_bins, auc_bins, m,
                                           None if valid is None else valid.cpu())
    _assert_stats_equal(st, expected, R, exact=kind == "prob")
    return st


@pytest.mark.parametrize("kind,readout", [("prob", "majority"), ("logit", "majority"), ("ordinal", "majority"),
                                          ("ordinal", "expected")])
@pytest.mark.parametrize("target_masks", [True, False])
def test_calibration_stats(device, kind, readout, target_masks):
    _stats_case(device, kind, readout, target_masks, use_valid=False)


@pytest.mark.parametrize("kind", ["prob", "ordinal"])
def test_calibration_stats_valid_2d(device, kind):
    _stats_case(device, kind, "majority", True, use_valid=True, S=(9, 11), n_bins=10, auc_bins=100)


@pytest.mark.parametrize("R", [1, 32])
def test_calibration_stats_rater_extremes(device, R):
    _stats_case(device, "ordinal", "majority", True, use_valid=True, R=R, S=(4, 5), seed=R)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_calibration_stats_half(device, dtype):
    _stats_case(device, "ordinal", "expected", False, use_valid=True, dtype=dtype, S=(5, 6))


def test_calibration_stats_deterministic(device):
    a = _stats_case(device, "logit", "majority", True, use_valid=True, S=(2, 9, 13))
    b = _stats_case(device, "logit", "majority", True, use_valid=True, S=(2, 9, 13))
    for name in ("s", "brier", "nll"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_calibration_stats_errors(device):
    masks = _masks(1, 3, (4, 4), device=device, dtype=torch.uint8)
    p = torch.rand((1, 4, 4), generator=_gen(0)).to(device)
    bad = masks.clone()
    bad[0, 0, 0, 0] = 3
    with pytest.raises(ValueError, match="binary"):
        ops.calibration_stats(p, bad, backend="triton")
    k = reference.orc_targets(masks.cpu()).to(device)
    k[0, 2, 2] = 4
    with pytest.raises(ValueError, match="0..R"):
        ops.calibration_stats(p, k, num_raters=3, backend="triton")
    for value in (float("nan"), 1.5, -0.1):
        q = p.clone()
        q[0, 1, 2] = value
        with pytest.raises(ValueError, match="probabilities"):
            ops.calibration_stats(q, masks, backend="triton")
    q = p.clone()
    q[0, 1, 2] = 2.0  # ignored where not valid
    valid = torch.ones((1, 4, 4), dtype=torch.bool, device=device)
    valid[0, 1, 2] = False
    ops.calibration_stats(q, masks, valid=valid, backend="triton")


# --- the custom ops pass torch.library.opcheck ------------------------------------------------------------

def test_opcheck(device):
    masks = _masks(2, 3, (3, 4), device=device)
    logits = _logits(2, 3, (3, 4), device=device)
    k = reference.orc_targets(masks.cpu()).to(device)
    valid = (torch.rand((2, 3, 4), generator=_gen(1)) < 0.7).to(device)
    launchers = _triton._launchers()
    torch.library.opcheck(launchers.orc_targets, (masks,))
    torch.library.opcheck(launchers.foreground_probability, (logits, "majority", 2))
    loss_op = _triton.ordinal_loss_op()
    for reduction in (0, 1):
        torch.library.opcheck(loss_op, (logits.clone().requires_grad_(), k, valid, 1.0, 2, reduction, True))
    torch.library.opcheck(_triton.calibration_stats_op(), (logits, masks, valid, 3, True, "ordinal", "majority",
                                                           2, 15, 32))


#: (H, W) of one image of more than 2^28 voxels: its logits (R + 1 = 8 channels) hold more than 2^31 elements.
BIG_IMAGE = ((1 << 14) + 1, (1 << 14) + 3)


@pytest.mark.cuda
@pytest.mark.slow
@pytest.mark.skipif(INTERPRETED or not torch.cuda.is_available(), reason="needs a CUDA GPU (about 8 GB)")
def test_sizes_above_2_to_the_31_elements():
    """64-bit offsets: 2D logits (1, 8, H, W) of more than 2^31 elements, checked at the far end against the
    reference (loss map) and in total (statistics)."""
    R, (H, W) = 7, BIG_IMAGE
    V = H * W
    gen = torch.Generator(device="cuda").manual_seed(0)
    logits = torch.randn(1, R + 1, H, W, device="cuda", dtype=torch.float16, generator=gen)
    assert logits.numel() > 2**31
    k = torch.randint(0, R + 1, (1, H, W), device="cuda", dtype=torch.uint8, generator=gen)
    loss_map, _ = _triton.ordinal_loss_op()(logits, k, None, 1.0, R // 2 + 1, ops.REDUCTIONS["none"], False)
    tail = slice(V - 1000, V)
    flat = logits.reshape(1, R + 1, V)
    want = reference.ordinal_loss(flat[:, :, tail].float().cpu(), k.reshape(1, V)[:, tail].cpu(), reduction="none")
    torch.testing.assert_close(loss_map.reshape(1, V)[:, tail].cpu(), want, rtol=2e-3, atol=2e-3)
    del loss_map
    st = ops.calibration_stats(logits, k, num_raters=R, kind="ordinal", backend="triton")
    assert int(st.n.sum()) == V * R and int(st.a.sum()) == int(k.long().sum())
    assert int(st.pos.sum()) == int(k.long().sum()) and int(st.neg.sum()) == V * R - int(k.long().sum())


def test_big_image_shapes_pass_validation():
    """The shapes of test_sizes_above_2_to_the_31_elements reach the kernels (no GPU: meta tensors, which the
    argument checks accept and the op's shape function answers)."""
    R, (H, W) = 7, BIG_IMAGE
    logits = torch.empty(1, R + 1, H, W, dtype=torch.float16, device="meta")
    k = torch.empty(1, H, W, dtype=torch.uint8, device="meta")
    assert logits.numel() > 2**31
    counts, sums = _triton.calibration_stats_op()(logits, k, None, R, False, "ordinal", "majority", 4, 15, 4096)
    assert counts.shape[0] == 1 and sums.shape[0] == 1
    loss, _ = _triton.ordinal_loss_op()(logits, k, None, 1.0, 4, ops.REDUCTIONS["none"], False)
    assert loss.shape == (1, H, W)


# --- the defects of a desk review of the compiled kernels, each pinned ---------------------------------------

def test_packed_auc_counts_unpack_as_unsigned():
    """Positives and negatives share an int64 (low and high 32 bits): a negative count of 2^31 or more sets the
    sign bit, which an arithmetic shift alone would carry into a negative count."""
    from orcal.ops._triton._ops import unpack_auc

    pos = torch.tensor([0, 5, 2**32 - 1, 7, 2**31])
    neg = torch.tensor([2**31, 2**32 - 1, 0, 2**31 + 3, 2**31 - 1])
    packed = pos + (neg << 32)  # wraps around int64, as the kernel's 64-bit atomics do
    assert (packed < 0).any()
    got_pos, got_neg = unpack_auc(packed)
    assert torch.equal(got_pos, pos) and torch.equal(got_neg, neg)


def test_stats_grid_depends_on_the_problem_size_only(monkeypatch):
    """The programs per image (and so the order in which float partials are summed) never come from the
    device: the same on every GPU model, so the statistics are bitwise reproducible across them."""
    from orcal.ops._triton import _ops

    def no_device_query(*args, **kwargs):
        raise AssertionError("the statistics grid must not depend on the device")

    monkeypatch.setattr(torch.cuda, "get_device_properties", no_device_query)
    monkeypatch.setattr(torch.cuda, "is_available", no_device_query)
    block = _ops.stats_tile(8, 15, 4)["BLOCK_V"]
    for V in (1, block, 20 * block + 3, 128 * 256 * 256):
        programs, iters = _ops.stats_grid(V, block, 7)
        assert programs * iters * block >= V > (programs - 1) * iters * block  # every block once, no idle program
        assert 1 <= programs <= _ops.STATS_PROGRAMS
    assert _ops.stats_grid(128 * 256 * 256, block, 7)[0] == _ops.STATS_PROGRAMS  # a CT volume fills any GPU
    # A thread packs its ECE counts n and a (n << 16 | a) into an int32: a < 2^16 and n < 2^15 at any R.
    vec = block // (32 * _ops.NUM_WARPS)
    for V, R in ((512**3, 255), (512**3, 1), (1, 255)):
        programs, iters = _ops.stats_grid(V, block, R)
        assert programs * iters * block >= V and iters * vec * max(R, 2) < 2**16


def test_backward_reads_no_device_value():
    """The loss's backward never reads a non-CPU upstream gradient on the host (a synchronisation on every
    backward, which docs/gpu.md rules out with ORCAL_ASYNC_CHECKS=1): a meta tensor, which cannot be read,
    stands in for a CUDA one. A CPU upstream of 1 still skips the scaling pass."""
    from types import SimpleNamespace

    from orcal.ops._schema import _loss_backward

    backward = _loss_backward("triton")
    saved = torch.full((2, 3, 4, 4), 0.5)
    with torch.no_grad():  # as autograd runs a backward without create_graph
        ctx = SimpleNamespace(saved_tensors=(saved.to("meta"),), reduction=ops.REDUCTIONS["mean"])
        grad = backward(ctx, torch.ones((), device="meta"), None)[0]
        assert grad.device.type == "meta" and grad.shape == saved.shape
        ctx = SimpleNamespace(saved_tensors=(saved,), reduction=ops.REDUCTIONS["mean"])
        assert backward(ctx, torch.ones(()), None)[0] is saved  # on the host: no pass
        torch.testing.assert_close(backward(ctx, torch.full((), 2.0), None)[0], 2 * saved)


def _record_host_reads(monkeypatch) -> list[str]:
    """Record the calls that read a tensor on the host or make one from host data (on CUDA, each one a
    synchronisation or a blocking copy). Patched functions, since a custom op's body runs outside of
    torch's function and dispatch modes."""
    seen: list[str] = []

    def spy(owner, name):
        real = getattr(owner, name)

        def wrapper(*args, **kwargs):
            seen.append(name)
            return real(*args, **kwargs)

        monkeypatch.setattr(owner, name, wrapper)

    spy(torch, "tensor")
    spy(torch, "as_tensor")
    for name in ("item", "tolist", "__bool__", "__int__", "__float__"):
        spy(torch.Tensor, name)
    return seen


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_loss_and_stats_do_not_synchronise(device, monkeypatch, reduction):
    """With ORCAL_ASYNC_CHECKS=1 the ops read nothing back and copy nothing in from the host: on the
    interpreter no such op is dispatched, on CUDA the sync debug mode raises on any synchronisation."""
    monkeypatch.setenv("ORCAL_ASYNC_CHECKS", "1")
    logits = _logits(2, 3, (4, 5), device=device).requires_grad_()
    k = _votes(2, 3, (4, 5), device=device)
    masks = _masks(2, 3, (4, 5), device=device)
    upstream = torch.full((), 1.0, device=device)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            ops.ordinal_loss(logits, k, reduction=reduction, backend="triton").backward(upstream)
            ops.calibration_stats(logits.detach(), masks, kind="ordinal", backend="triton")
        finally:
            torch.cuda.set_sync_debug_mode("default")
        return
    with monkeypatch.context() as patch:
        seen = _record_host_reads(patch)
        loss = ops.ordinal_loss(logits, k, reduction=reduction, backend="triton")
        ops.calibration_stats(logits.detach(), masks, kind="ordinal", backend="triton")
    assert not seen, seen
    loss.backward(upstream)
    assert logits.grad is not None


def test_channel_loop_that_runs(device, monkeypatch):
    """Above CHANNEL_UNROLL_MAX channels (R > 63) the kernels run their channel loop and read the channels again
    in each pass instead of holding them in registers: checked against the reference at R = 7 with the limit
    lowered, for the loss and its gradient, both readouts and the statistics."""
    from orcal.ops._triton import _ops

    monkeypatch.setattr(_ops, "CHANNEL_UNROLL_MAX", 4)
    assert not _ops.voxel_block(8, 4)["UNROLL"] and not _ops.stats_tile(8, 15, 4)["UNROLL"]
    _check_loss(device, 7, (5, 6), use_valid=True, majority=3)
    _check_loss(device, 7, (3, 4), reduction="none", scale=1e4)
    logits = _logits(2, 7, (3, 5), device=device)
    for readout in ("majority", "expected"):
        p = ops.foreground_probability(logits, readout, backend="triton")
        torch.testing.assert_close(p.cpu(), reference.foreground_probability(logits.cpu(), readout, 4),
                                   atol=2e-6, rtol=1e-5)
        _stats_case(device, "ordinal", readout, False, use_valid=True, R=7)
    # the expected readout's limits at infinite logits (one certain level, two, NaN) in the looped branch too
    inf, nan = float("inf"), float("nan")
    z = torch.zeros(1, 8, 1, 4)
    z[0, 5, 0, 0] = inf
    z[0, 0, 0, 1] = inf
    z[0, [2, 6], 0, 2] = inf
    z[0, 3, 0, 3] = nan
    p = ops.foreground_probability(z.to(device), "expected", backend="triton").cpu().flatten()
    torch.testing.assert_close(p, torch.tensor([5 / 7, 0.0, nan, nan]), equal_nan=True, atol=0, rtol=0)


@pytest.mark.parametrize("n_bins", [17, 40])
def test_calibration_stats_bin_windows(device, n_bins):
    """More ECE bins than one window holds (STATS_BIN_WINDOW) take further passes over the voxels."""
    _stats_case(device, "prob", "majority", True, use_valid=True, S=(9, 11), n_bins=n_bins, auc_bins=100)


def test_calibration_stats_several_programs_per_image(device):
    """Images of many blocks: several programs per image, each over several blocks (the flush, the
    per-program partials and their fixed-order sum)."""
    from orcal.ops._triton import _ops

    block = _ops.stats_tile(1, 15, 4)["BLOCK_V"]
    S = (2 * block + 1, 11)  # 22 blocks and a tail: 6 programs of 4 blocks
    programs, iters = _ops.stats_grid(S[0] * S[1], block, 3)
    assert programs > 1 and iters > 1
    _stats_case(device, "prob", "majority", True, use_valid=True, R=3, S=S, n_bins=10, auc_bins=32)


@pytest.mark.slow
def test_histogram_atomics_are_relaxed():
    """Compiled for sm_90a (no GPU needed), the statistics kernel's atomics carry no acquire/release
    semantics (a fence and an L1 invalidation per voxel in the hot loop on Hopper)."""
    sass = pytest.importorskip("benchmarks.sass")
    case = next(c for c in sass.triton_cases() if c["kernel"] == "calibration_stats_kernel")
    ptx = sass.compile_triton(case).asm["ptx"]
    assert "atom" in ptx
    assert "acq_rel" not in ptx and "fence" not in ptx


@pytest.mark.slow
def test_kernels_do_not_spill():
    """The block sizes keep every kernel in registers at the widest settings (R = 32, 100 ECE bins, masks),
    compiled for sm_90a with Triton's own ptxas and read back with cuobjdump (no GPU needed)."""
    sass = pytest.importorskip("benchmarks.sass")
    cases = [c for c in sass.triton_cases()
             if c["dtype"] == "float32" and ("R=32" in c["case"] or "100 bins" in c["case"])]
    # R = 63: the widest unrolled channel loop (R = 31 in float64); R = 255: the loop that runs; every dtype
    loops = [c for c in sass.triton_cases(raters=(63, 255)) + sass.triton_cases(raters=(7, 31, 255),
                                                                                 dtypes=("float64",))
             if c["kernel"] != "foreground_probability_kernel" or c["dtype"] == "float64"]
    cases += [c for c in loops if "100 bins" not in c["case"]]
    rows = sass.triton_rows(cases)
    assert rows and not [r.error for r in rows if r.error]
    assert {(r.case, r.dtype): r.spill_bytes for r in rows} == {(r.case, r.dtype): 0 for r in rows}
