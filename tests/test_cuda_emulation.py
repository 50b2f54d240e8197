"""The CUDA kernels of csrc/cuda, run on the host by the emulation of csrc/cuda/emulation.h.

The launchers and kernels that nvcc compiles, built as C++ (tests/cuda_emulation.py), run on CPU tensors through
``torch.ops.orcal_emu`` and are checked against the CPU kernels (``torch.ops.orcal``) and orcal.ops.reference: several
blocks per image, tails, ``valid``, every dtype, R up to 255, the multi-pass ECE path, the global-memory AUC
path, the error flags and more than 65535 images. A missing barrier, a wrong index or a broken flush fails here.
Shapes stay tiny: each CUDA thread is an OS thread. Run with ``ORCAL_CUDA_EMULATION=1 python -m pytest -m emulated``.
"""

from __future__ import annotations

import cuda_emulation
import pytest
import torch

from orcal.ops import _ext
from orcal.ops import reference as ref
from orcal.ops.stats import CalibrationStats

pytestmark = [
    pytest.mark.emulated,
    pytest.mark.skipif(cuda_emulation.flavour() is None,
                       reason=f"the emulated CUDA kernels run on request: {cuda_emulation.HOW}"),
    pytest.mark.skipif(not _ext.compiled(), reason="the CPU kernels of orcal._C are the comparison"),
]

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
RS = [1, 2, 7, 32, 255]
THREADS = 256  # cuda::kThreads: the launchers' block size
# (value atol/rtol, gradient atol/rtol) of the emulated kernels against the CPU kernels: the same math in the same
# precision, different summation orders and exp/log implementations.
TOL = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-5, 1e-3),
    torch.bfloat16: (1e-5, 8e-3),
    torch.float64: (1e-12, 1e-12),
}
REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}


@pytest.fixture(scope="module")
def emu():
    return cuda_emulation.load(cuda_emulation.flavour() or "1")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _logits(B, R, V, dtype, seed, scale=3.0):
    return (torch.randn(B, R + 1, V, generator=_gen(seed)) * scale).to(dtype)


def _masks(B, R, V, seed, dtype=torch.bool):
    return (torch.rand(B, R, V, generator=_gen(seed + 1)) > 0.45).to(dtype)


def _valid(B, V, seed):
    return torch.rand(B, V, generator=_gen(seed + 2)) > 0.3


def _close(a, b, atol, rtol, what):
    assert a.shape == b.shape and a.dtype == b.dtype, what
    torch.testing.assert_close(a.double(), b.double(), atol=atol, rtol=rtol, msg=what)


# --- orc_targets ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("R", RS)
def test_orc_targets(emu, R):
    for dtype in (torch.bool, torch.uint8):
        masks = _masks(3, R, 200, seed=R, dtype=dtype)  # 600 voxels: three blocks, the last one ragged
        got = emu.orc_targets(masks)
        assert torch.equal(got, torch.ops.orcal.orc_targets(masks))
        assert torch.equal(got, ref.orc_targets(masks))
    assert emu.orc_targets(masks[:0]).shape == (0, 200)


def test_orc_targets_non_binary_raises(emu):
    masks = _masks(2, 3, 300, seed=0, dtype=torch.uint8)
    masks[1, 2, 299] = 2  # the very last voxel, in the last block
    with pytest.raises(ValueError, match="binary"):
        emu.orc_targets(masks)


# --- foreground_probability ----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("R", RS)
def test_foreground_probability(emu, dtype, R):
    z = _logits(2, R, 150, dtype, seed=R)  # 300 voxels: two blocks
    m = max(1, (R + 1) // 2)
    tol = {torch.float64: 1e-12, torch.float32: 1e-6}.get(dtype, 1e-2)
    for readout in ("majority", "expected"):
        got = emu.foreground_probability(z, readout, m)
        assert got.dtype == dtype
        _close(got, torch.ops.orcal.foreground_probability(z, readout, m), tol, tol, readout)
        _close(got, ref.foreground_probability(z, readout, m).to(dtype), tol, tol, readout)


# --- ordinal_loss --------------------------------------------------------------------------------------------

def _check_loss(emu, z, k, valid, reduction, rps_weight=1.0, majority=None):
    R = z.shape[1] - 1
    m = ref.majority_threshold(R, majority)
    args = (z, k, valid, rps_weight, m, REDUCTIONS[reduction], True)
    loss, grad = emu.ordinal_loss(*args)
    cpu_loss, cpu_grad = torch.ops.orcal.ordinal_loss(*args)
    value_tol, grad_rtol = TOL[z.dtype]
    _close(loss, cpu_loss, value_tol, value_tol, f"loss {reduction}")
    _close(grad, cpu_grad, value_tol, grad_rtol, f"grad {reduction}")
    want = ref.ordinal_loss(z, k, rps_weight, m, valid, reduction)
    _close(loss, want.to(loss.dtype), value_tol, 10 * value_tol, f"reference loss {reduction}")
    want_grad = ref.ordinal_loss_grad(z, k, rps_weight, m, valid, reduction)
    _close(grad, want_grad.to(grad.dtype), 10 * value_tol, 2 * grad_rtol, f"reference grad {reduction}")
    if valid is not None:  # invalid voxels: exactly zero gradient (and loss), never garbage
        assert torch.all(grad.movedim(1, -1)[~valid] == 0)
        if reduction == "none":
            assert torch.all(loss[~valid] == 0)
    # forward only: the same loss, no gradient written
    loss_only, none = emu.ordinal_loss(z, k, valid, rps_weight, m, REDUCTIONS[reduction], False)
    assert none.numel() == 0 and torch.equal(loss_only, loss)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("R", RS)
def test_ordinal_loss(emu, dtype, R):
    V = 700 if R < 32 else 300  # 1400 voxels: two blocks of 4 voxels per thread, the second one ragged
    z = _logits(2, R, V, dtype, seed=R)
    k = torch.randint(0, R + 1, (2, V), generator=_gen(R), dtype=torch.uint8)
    valid = _valid(2, V, seed=R)
    for reduction in ("mean", "sum", "none"):
        _check_loss(emu, z, k, valid, reduction)
    _check_loss(emu, z, k, None, "mean", rps_weight=0.3, majority=max(1, R // 3))


def test_ordinal_loss_many_blocks_and_repeat_bit_for_bit(emu):
    z = _logits(3, 3, 1500, torch.float32, seed=5)  # 4500 voxels: five blocks
    k = torch.randint(0, 4, (3, 1500), generator=_gen(5), dtype=torch.uint8)
    valid = _valid(3, 1500, seed=5)
    for reduction in ("sum", "none"):
        _check_loss(emu, z, k, valid, reduction)
    first = emu.ordinal_loss(z, k, valid, 1.0, 2, 1, True)
    again = emu.ordinal_loss(z, k, valid, 1.0, 2, 1, True)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


def test_ordinal_loss_k_above_r_and_empty(emu):
    z = _logits(2, 3, 300, torch.float32, seed=1)
    k = torch.randint(0, 4, (2, 300), generator=_gen(1), dtype=torch.uint8)
    k[1, 299] = 4
    with pytest.raises(ValueError, match="0..R"):
        emu.ordinal_loss(z, k, None, 1.0, 2, 1, True)
    loss, grad = emu.ordinal_loss(z[:0], k[:0], None, 1.0, 2, 1, True)
    assert loss.item() == 0 and grad.shape == (0, 4, 300)
    none = torch.zeros(2, 300, dtype=torch.bool)
    loss, grad = emu.ordinal_loss(z, k.clamp(max=3), none, 1.0, 2, 1, True)
    assert loss.item() == 0 and torch.all(grad == 0)


# --- calibration_stats ---------------------------------------------------------------------------------------

def _stats(op, pred, target, valid, R, masks, kind, readout, m, n_bins, auc_bins):
    return op(pred, target, valid, R, masks, kind, readout, m, n_bins, auc_bins)


def _check_stats(emu, pred, target, valid, R, masks, kind, readout="majority", n_bins=15, auc_bins=64):
    m = ref.majority_threshold(R)
    args = (pred, target, valid, R, masks, kind, readout, m, n_bins, auc_bins)
    counts, sums = _stats(emu.calibration_stats, *args)
    cpu_counts, cpu_sums = _stats(torch.ops.orcal.calibration_stats, *args)
    # probabilities computed from logits by another exp may land one bin over at a bin edge
    exact = kind == "prob"
    slack = 0 if exact else 4 * 255
    assert counts.shape == cpu_counts.shape and (counts - cpu_counts).abs().sum() <= slack, "counts"
    _close(sums, cpu_sums, 1e-6, 1e-5, "sums")
    p = ref.binary_probability(pred, kind, readout, m)
    k = ref.orc_targets(target) if masks else target
    want = ref.calibration_stats(p, k, R, n_bins, auc_bins, m, valid).pack()
    assert (counts - want[0]).abs().sum() <= slack, "reference counts"
    _close(sums, want[1], 1e-6, 1e-5, "reference sums")
    return counts, sums


def _pred(kind, B, R, V, dtype, seed):
    if kind == "prob":
        return torch.rand(B, V, generator=_gen(seed)).to(dtype)
    if kind == "logit":
        return (torch.randn(B, V, generator=_gen(seed)) * 3).to(dtype)
    return _logits(B, R, V, dtype, seed)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["prob", "logit", "ordinal"])
def test_stats_dtypes_and_kinds(emu, dtype, kind):
    R = 3
    pred = _pred(kind, 2, R, 300, dtype, seed=1)
    masks = _masks(2, R, 300, seed=1)
    readouts = ("majority", "expected") if kind == "ordinal" else ("majority",)
    for readout in readouts:
        _check_stats(emu, pred, masks, _valid(2, 300, seed=1), R, True, kind, readout)
    _check_stats(emu, pred, ref.orc_targets(masks), None, R, False, kind)


@pytest.mark.parametrize("R", RS)
def test_stats_raters(emu, R):
    pred = _pred("ordinal", 2, R, 200, torch.float32, seed=R)
    masks = _masks(2, R, 200, seed=R, dtype=torch.uint8)
    _check_stats(emu, pred, masks, _valid(2, 200, seed=R), R, True, "ordinal")
    _check_stats(emu, pred, ref.orc_targets(masks), None, R, False, "ordinal", readout="expected")


def test_stats_several_blocks_per_image(emu, monkeypatch):
    # The launcher gives a block 2^15 voxels or more; 2048 here, so that a few thousand voxels span several blocks.
    monkeypatch.setenv("ORCAL_CUDA_EMULATION_BLOCK_VOXELS", "2048")
    V = 2 * 2048 + 100  # three blocks per image, the last one ragged
    pred = _pred("prob", 2, 4, V, torch.float32, seed=3)
    masks = _masks(2, 4, V, seed=3)
    _check_stats(emu, pred, masks, _valid(2, V, seed=3), 4, True, "prob", n_bins=10, auc_bins=128)
    # bad probabilities in three blocks of two images: counted over the blocks, the first one (by index) named
    bad = pred.clone()
    bad[1, 5], bad[1, V - 1], bad[0, 2500] = -0.5, 2.0, float("nan")
    with pytest.raises(ValueError, match=r"\[0, 1\]; found nan \(3 bad values\)"):
        emu.calibration_stats(bad, masks, None, 4, True, "prob", "majority", 3, 10, 128)


@pytest.mark.parametrize("n_bins", [1, 16, 17, 33, 100])
def test_stats_ece_bins(emu, n_bins):
    # up to 16 bins in one pass; 17..32 in one pass of 32; more take several passes over the input
    pred = _pred("prob", 2, 5, 300, torch.float64, seed=n_bins)
    masks = _masks(2, 5, 300, seed=n_bins)
    _check_stats(emu, pred, masks, _valid(2, 300, seed=n_bins), 5, True, "prob", n_bins=n_bins)


@pytest.mark.parametrize("auc_bins", [2, 5000, 8192])
def test_stats_auc_bins(emu, auc_bins):
    # 5000 bins fit in shared memory next to 15 ECE bins; 8192 do not: global-memory atomics instead
    pred = _pred("logit", 2, 7, 300, torch.float32, seed=auc_bins)
    masks = _masks(2, 7, 300, seed=auc_bins)
    _check_stats(emu, pred, masks, _valid(2, 300, seed=auc_bins), 7, True, "logit", auc_bins=auc_bins)


def test_stats_repeat_bit_for_bit(emu):
    pred = _pred("ordinal", 2, 3, 400, torch.float32, seed=9)
    masks = _masks(2, 3, 400, seed=9)
    args = (pred, masks, None, 3, True, "ordinal", "majority", 2, 20, 64)
    first, again = emu.calibration_stats(*args), emu.calibration_stats(*args)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


def test_stats_more_than_65535_images(emu, monkeypatch):
    # the image loop of the launcher: grid.y is at most 65535, so 65537 images take two launches. Only the first
    # and last row of blocks of each launch run (ORCAL_CUDA_EMULATION_SPARSE_Y): images 0, 65534, 65535, 65536.
    B, R = 65537, 3
    pred = torch.rand(B, 1, generator=_gen(0))
    k = torch.randint(0, R + 1, (B, 1), generator=_gen(0), dtype=torch.uint8)
    monkeypatch.setenv("ORCAL_CUDA_EMULATION_SPARSE_Y", "1")
    counts, sums = emu.calibration_stats(pred, k, None, R, False, "prob", "majority", 2, 15, 64)
    cpu_counts, cpu_sums = torch.ops.orcal.calibration_stats(pred, k, None, R, False, "prob", "majority", 2, 15, 64)
    ran = torch.tensor([0, 65534, 65535, 65536])
    assert torch.equal(counts[ran], cpu_counts[ran])
    _close(sums[ran], cpu_sums[ran], 1e-6, 1e-5, "sums")
    skipped = torch.ones(B, dtype=torch.bool)
    skipped[ran] = False
    assert torch.all(counts[skipped] == 0) and torch.all(sums[skipped] == 0)


def test_stats_errors(emu):
    R, V = 3, 300
    pred = _pred("prob", 2, R, V, torch.float32, seed=4)
    k = torch.randint(0, R + 1, (2, V), generator=_gen(4), dtype=torch.uint8)
    k[1, V - 1] = R + 1
    with pytest.raises(ValueError, match="0..R"):
        emu.calibration_stats(pred, k, None, R, False, "prob", "majority", 2, 15, 64)
    masks = _masks(2, R, V, seed=4, dtype=torch.uint8)
    masks[1, 2, V - 1] = 2
    with pytest.raises(ValueError, match="binary"):
        emu.calibration_stats(pred, masks, None, R, True, "prob", "majority", 2, 15, 64)
    bad = pred.clone()
    bad[1, 7] = 1.5
    bad[0, 9] = float("nan")
    with pytest.raises(ValueError, match=r"\[0, 1\]; found nan \(2 bad values\)"):
        emu.calibration_stats(bad, k.clamp(max=R), None, R, False, "prob", "majority", 2, 15, 64)
    empty = emu.calibration_stats(pred[:0], k[:0], None, R, False, "prob", "majority", 2, 15, 64)
    assert empty[0].shape == (0, CalibrationStats.empty(15, 64).pack()[0].shape[1])
