"""Launchers of the Triton kernels, wrapped as ``torch.library.custom_op`` (namespace ``orcal_triton``).

The ops take the same arguments and return the same tensors as the compiled ``orcal::`` ops
(``csrc/orcal.cpp``), so :mod:`orcal.ops` calls either one the same way. Validation that needs the data
(non-binary masks, vote counts above R, bad probabilities) happens inside the kernels, which raise a flag
that is checked after the launch.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import pathlib
import sys
from types import ModuleType

import torch

from orcal.ops._schema import KERNEL_READOUTS, KINDS, REDUCTIONS, StatsLayout, async_checks, opmath_dtype, register

_KERNEL_FILE = pathlib.Path(__file__).with_name("_kernels.py")
_MODULES: dict[bool, ModuleType] = {}
NUM_WARPS = 4


def interpreting() -> bool:
    """Whether kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def kernels() -> ModuleType:
    """The kernel module for the current ``TRITON_INTERPRET`` mode (Triton fixes it when decorating)."""
    mode = interpreting()
    module = _MODULES.get(mode)
    if module is None:
        name = f"orcal.ops._triton._kernels_{'interpreted' if mode else 'compiled'}"
        spec = importlib.util.spec_from_file_location(name, _KERNEL_FILE)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        _MODULES[mode] = module
    return module


# --- block sizes ------------------------------------------------------------------------------------------

def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _unrolled(channels: int, elem_size: int) -> bool:
    """Whether the channel loop is unrolled: up to CHANNEL_UNROLL_MAX channels (half as many in float64, whose
    values take two registers)."""
    return channels * max(1, elem_size // 4) <= CHANNEL_UNROLL_MAX


def _voxels_per_thread(channels: int, elem_size: int, per_thread: int) -> int:
    """Consecutive voxels per thread (a power of 2): up to 16 bytes of each channel (one vectorised load) and
    about ``per_thread`` 32-bit channel values in all, when the channel loop is unrolled (they live in
    registers)."""
    vec = 16 // elem_size
    if _unrolled(channels, elem_size):
        fit = max(1, per_thread // (channels * max(1, elem_size // 4)))  # in 32-bit registers
        vec = min(vec, 1 << (fit.bit_length() - 1))
    return vec


#: Every thread owns whole voxels and loops over their channels; up to this many channels the loop is unrolled
#: and a voxel's channel values stay in registers, beyond it the loop runs and reads the channels again (cache
#: hits) in each of its passes, so that nothing spills at any R.
CHANNEL_UNROLL_MAX = 64
#: Channel values per thread of the loss and readout kernels (voxels per thread x channels): what their
#: unrolled channel loops hold in registers without spilling (``python -m benchmarks.sass``).
VOXEL_TILE_ELEMS = 64


def voxel_block(channels: int, elem_size: int) -> dict[str, int]:
    """Constexprs ``C``, ``UNROLL``, ``BLOCK_V`` of the loss and readout kernels: BLOCK_V voxels a program,
    each thread holding up to 16 bytes of consecutive voxels of a channel (vectorised, coalesced loads)."""
    vec = _voxels_per_thread(channels, max(elem_size, 4), VOXEL_TILE_ELEMS)  # half inputs: float32's count
    return {"C": channels, "UNROLL": _unrolled(channels, elem_size), "BLOCK_V": 32 * NUM_WARPS * vec}


#: ECE bins one pass of the statistics kernel holds in registers (every thread keeps ``n``, ``a`` and ``s`` of
#: each); more bins take further passes over the voxels, one per window.
STATS_BIN_WINDOW = 16
#: Logit values per thread of the statistics kernel (as VOXEL_TILE_ELEMS).
STATS_TILE_ELEMS = 64
#: A program of the statistics kernel covers at least this many blocks of one image (its flush, about
#: 40 atomics, is amortised over them) and an image gets at most STATS_PROGRAMS programs (more only where a
#: program's counters would overflow: ``stats_grid``).
STATS_MIN_ITERS = 4
STATS_PROGRAMS = 1024


def stats_tile(channels: int, n_bins: int, elem_size: int) -> dict[str, int]:
    """Constexprs ``C``, ``UNROLL``, ``NB``, ``BLOCK_V``, ``VEC`` of the statistics kernel.

    ``channels``: 1 for probabilities and binary logits, R + 1 for ordinal logits. Every thread owns VEC
    consecutive voxels of a block (its per-thread partials).
    """
    nb = min(n_bins, STATS_BIN_WINDOW)  # bins of one window (a tuple: any count)
    # Half inputs take float32's voxels per thread (8 a thread cost more instructions than 8-byte loads save);
    # the channel loop that runs (wide C) takes one voxel a thread, the most that ptxas keeps in registers.
    # Float64 takes one voxel a thread too (its values take two registers each).
    unroll = _unrolled(channels, elem_size)
    vec = _voxels_per_thread(channels, max(elem_size, 4), STATS_TILE_ELEMS) if unroll and elem_size < 8 else 1
    return {"C": channels, "UNROLL": unroll, "NB": nb,
            "BLOCK_V": 32 * NUM_WARPS * vec, "VEC": vec}


def stats_grid(V: int, block: int, R: int) -> tuple[int, int]:
    """(programs per image, blocks per program) of the statistics kernel.

    A function of the problem size alone, never of the device (as the CUDA kernel's grid): the float
    partials are summed in program order, so the sums are bitwise the same on every GPU model.
    """
    nblocks = triton_cdiv(V, block) if V else 0
    if not nblocks:
        return 0, 0
    programs = min(STATS_PROGRAMS, triton_cdiv(nblocks, STATS_MIN_ITERS))
    iters = triton_cdiv(nblocks, programs)
    iters = min(iters, (2**31 - 1) // (block * max(R, 1)))  # int32 counters in the kernel cannot overflow
    # nor can a thread's packed ECE counts (n << 16 | a over its VEC voxels a block): a and n below 2^16, 2^15
    iters = max(1, min(iters, (2**16 - 1) // (block // (32 * NUM_WARPS) * max(R, 2))))
    return triton_cdiv(nblocks, iters), iters


def _flatten(x: torch.Tensor, channels: bool) -> torch.Tensor:
    """(B, [C,] *S) -> contiguous (B, [C,] V)."""
    lead = 2 if channels else 1
    return x.contiguous().reshape(*x.shape[:lead], math.prod(x.shape[lead:]))


def _new_flags(device: torch.device) -> torch.Tensor:
    return torch.zeros(3, dtype=torch.int32, device=device)


def _raise_flags(flags: torch.Tensor, num_raters: int, masks_name: str, votes_name: str, kind: str = "prob") -> None:
    if async_checks(flags.device):  # no synchronisation: a device-side assertion (_schema.async_checks)
        torch._assert_async(torch.all(flags == 0), f"orcal: bad {masks_name}, {votes_name} or pred values")
        return
    bad_masks, bad_votes, bad_prob = flags.tolist()  # one synchronisation per call
    if bad_masks:
        raise ValueError(f"{masks_name} must be binary (0/1); found a value > 1")
    if bad_votes:
        raise ValueError(f"{votes_name} must lie in 0..R = 0..{num_raters}; found a value > {num_raters}")
    if bad_prob:
        if kind == "prob":
            raise ValueError("pred must hold probabilities in [0, 1]; found NaN or a value outside [0, 1] "
                             "(pass kind='logit' for logits)")
        raise ValueError(f"pred (kind={kind!r}) gives probabilities that are NaN or outside [0, 1]: the logits "
                         "hold NaN or infinite values")


def _on(device: torch.device):
    """Launch on the tensors' GPU (Triton uses the current device and stream)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _as_bytes(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.uint8) if x.dtype == torch.bool else x


# --- ops --------------------------------------------------------------------------------------------------

@torch.library.custom_op("orcal_triton::orc_targets", mutates_args=())
def orc_targets(masks: torch.Tensor) -> torch.Tensor:
    """(B, R, *S) bool/uint8 masks -> (B, *S) uint8 vote counts; non-binary values raise ValueError."""
    R = masks.shape[1]
    flat = _as_bytes(_flatten(masks, True))
    flags = _new_flags(masks.device)
    k = _count_votes(flat, flags)
    if k.numel():
        _raise_flags(flags, R, "masks", "k")
    return k.reshape(masks.shape[:1] + masks.shape[2:])


def _count_votes(flat: torch.Tensor, flags: torch.Tensor) -> torch.Tensor:
    """(B, R, V) uint8 masks -> (B, V) uint8 vote counts; a value above 1 sets ``flags[0]``."""
    B, R, V = flat.shape
    k = torch.empty((B, V), dtype=torch.uint8, device=flat.device)
    if k.numel():
        r_pad = _pow2(R)
        block = max(32 * NUM_WARPS, min(4096, 8192 // r_pad))
        nblk = triton_cdiv(V, block)
        with _on(flat.device):
            kernels().orc_targets_kernel[(B * nblk,)](flat, k, flags, R, V, nblk, R_PAD=r_pad, BLOCK_V=block,
                                                      num_warps=NUM_WARPS)
    return k


@torch.library.custom_op("orcal_triton::foreground_probability", mutates_args=())
def foreground_probability(logits: torch.Tensor, readout: str, majority: int) -> torch.Tensor:
    """(B, R+1, *S) ordinal logits -> (B, *S) foreground probability in the logits' dtype."""
    if readout not in KERNEL_READOUTS:
        raise ValueError(f"readout must be one of {KERNEL_READOUTS}, got {readout!r}")
    B, C = logits.shape[0], logits.shape[1]
    x = _flatten(logits, True)
    V = x.shape[2]
    p = torch.empty((B, V), dtype=logits.dtype, device=logits.device)
    if p.numel():
        tile = voxel_block(C, logits.element_size())
        nblk = triton_cdiv(V, tile["BLOCK_V"])
        with _on(logits.device):
            kernels().foreground_probability_kernel[(B * nblk,)](
                x, p, V, nblk, M=int(majority), EXPECTED=readout == "expected",
                IS_F64=logits.dtype == torch.float64, **tile, num_warps=NUM_WARPS)
    return p.reshape(logits.shape[:1] + logits.shape[2:])


@torch.library.custom_op("orcal_triton::ordinal_loss", mutates_args=())
def ordinal_loss(logits: torch.Tensor, k: torch.Tensor, valid: torch.Tensor | None, rps_weight: float,
                 majority: int, reduction: int, need_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused SPEC §3 loss; returns (loss, d loss / d logits for an upstream gradient of 1, or empty)."""
    B, C = logits.shape[0], logits.shape[1]
    spatial = logits.shape[:1] + logits.shape[2:]
    acc = opmath_dtype(logits.dtype)
    x = _flatten(logits, True)
    V = x.shape[2]
    dev = logits.device
    kf = _flatten(k, False)
    if kf.dtype != torch.uint8:
        raise TypeError(f"k must be uint8 vote counts, got {k.dtype}")
    vf = _as_bytes(_flatten(valid, False)) if valid is not None else kf
    n_vox = B * V
    if reduction == REDUCTIONS["mean"]:
        # torch.full fills on the device: no host-to-device copy, so no synchronisation (and CUDA-graph safe)
        count = torch.full((), float(n_vox), dtype=acc, device=dev) if valid is None else valid.sum().to(acc)
        scale = (1.0 / count.clamp_min(1)).reshape(1)
    elif reduction in (REDUCTIONS["sum"], REDUCTIONS["none"]):
        scale = torch.ones(1, dtype=acc, device=dev)
    else:
        raise ValueError(f"reduction must be 0 (none), 1 (mean) or 2 (sum), got {reduction}")
    is_map = reduction == REDUCTIONS["none"]
    tile = voxel_block(C, logits.element_size())
    nblk = triton_cdiv(V, tile["BLOCK_V"]) if V else 0
    loss_map = torch.empty((B, V) if is_map else (0,), dtype=acc, device=dev)
    partial = torch.empty(0 if is_map else B * nblk, dtype=acc, device=dev)
    grad = torch.empty_like(x) if need_grad else logits.new_empty(0)
    params = torch.cat([scale, torch.full((1,), float(rps_weight), dtype=acc, device=dev)])
    if n_vox:
        flags = _new_flags(dev)
        with _on(dev):
            kernels().ordinal_loss_kernel[(B * nblk,)](
                x, kf, vf, params, loss_map, partial, grad, flags, V, nblk, M=int(majority),
                HAS_VALID=valid is not None, MAP=is_map, GRAD=bool(need_grad), IS_F64=acc == torch.float64,
                **tile, num_warps=NUM_WARPS)
        _raise_flags(flags, C - 1, "masks", "k")
    if need_grad:
        grad = grad.reshape(logits.shape)
    if is_map:
        return loss_map.reshape(spatial), grad
    total = partial.sum(dtype=torch.float64)  # a fixed-order reduction: deterministic
    if reduction == REDUCTIONS["mean"]:
        total = total * scale[0].to(torch.float64)
    return total.to(acc), grad


@torch.library.custom_op("orcal_triton::calibration_stats", mutates_args=())
def calibration_stats(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None, num_raters: int,
                      target_is_masks: bool, kind: str, readout: str, majority: int, n_bins: int,
                      auc_bins: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused SPEC §4 statistics: (counts int64, sums float64), one row per image (``stats_layout.h``)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if readout not in KERNEL_READOUTS:
        raise ValueError(f"readout must be one of {KERNEL_READOUTS}, got {readout!r}")
    B, R, dev = pred.shape[0], int(num_raters), pred.device
    ordinal = kind == "ordinal"
    x = _flatten(pred, ordinal)
    C = x.shape[1] if ordinal else 1
    V = x.shape[-1]
    tgt = _as_bytes(_flatten(target, target_is_masks))
    if not target_is_masks and tgt.dtype != torch.uint8:
        raise TypeError(f"target must be uint8 vote counts, got {target.dtype}")
    flags = _new_flags(dev)
    if target_is_masks:
        # Summing the masks first costs 2 bytes per voxel more than reading them in the statistics kernel, whose
        # mask tile (a layout of its own for bytes) made it reduce across threads and spill.
        tgt = _count_votes(tgt, flags)
    vf = _as_bytes(_flatten(valid, False)) if valid is not None else tgt
    layout = StatsLayout(n_bins, auc_bins)
    count_cols = layout.count_cols()
    counts = torch.zeros((B, count_cols), dtype=torch.int64, device=dev)
    tile = stats_tile(C if ordinal else 1, n_bins, pred.element_size())
    programs, iters = stats_grid(V, tile["BLOCK_V"], R)
    partial = torch.zeros((B * programs, layout.sum_cols()), dtype=torch.float64, device=dev)
    # One 64-bit atomic per voxel for both AUC counts when neither can reach 2^32 in one image.
    packed = V * max(R, 1) < 2**32 - 1
    auc = torch.zeros((B, auc_bins) if packed else (1,), dtype=torch.int64, device=dev)
    if B * programs:
        with _on(dev):
            # The first pass computes everything with the first window of ECE bins; each further pass only
            # the next window (n_bins above STATS_BIN_WINDOW, rare: the default is 15).
            for bin_lo in range(0, n_bins, tile["NB"]):
                kernels().calibration_stats_kernel[(B * programs,)](
                    x, tgt, vf, counts, partial, auc, flags, V, R, n_bins, bin_lo, auc_bins,
                    programs, iters, count_cols, layout.a(), layout.tp(), layout.pos(), layout.sum_cols(),
                    layout.brier(), M=int(majority), KIND=KINDS.index(kind), EXPECTED=readout == "expected",
                    HAS_VALID=valid is not None, IS_F64=pred.dtype == torch.float64, PACKED=packed,
                    FULL=bin_lo == 0, **tile, num_warps=NUM_WARPS)
        _raise_flags(flags, R, "target", "target vote counts", kind)
        if packed:
            pos, neg = unpack_auc(auc)
            counts[:, layout.pos():layout.neg()] += pos
            counts[:, layout.neg():] += neg
    sums = partial.reshape(B, programs, layout.sum_cols()).sum(1)  # fixed order: deterministic
    return counts, sums


def unpack_auc(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(positives, negatives) of int64 AUC counts packed as ``pos + (neg << 32)``, both unsigned 32-bit.

    ``>>`` on int64 is an arithmetic shift: a negative count of 2^31 or more sets the sign bit, so the high
    word is masked after the shift.
    """
    return packed & 0xFFFFFFFF, (packed >> 32) & 0xFFFFFFFF


def triton_cdiv(a: int, b: int) -> int:
    """Ceiling division of non-negative integers."""
    return -(-a // b)


# --- shapes for fake tensors and autograd -----------------------------------------------------------------

register("orcal_triton", "triton")
