"""Triton kernels of the orcal ops (SPEC §1–4).

Layout: every kernel reads channel-major tensors ``(B, C, V)`` (V voxels per image, contiguous). Each thread
owns whole voxels, a few consecutive ones (vectorised loads), and loops over their C channels, each loaded as
a coalesced vector of voxels and converted to the math dtype in registers: the softmaxes, cumulative sums and
readouts over the levels are per-thread elementwise math, with no shuffles and no shared memory. With
``UNROLL`` (C up to ``_ops.CHANNEL_UNROLL_MAX``) the channel loop is unrolled and a voxel's channel values stay
in registers; wider C runs the loop and reads the channels again in each pass (cache hits), so that nothing
spills. The majority ``M`` is a constexpr: which levels form the upper group is known when compiling.
Offsets are 64-bit. Math is float32 (float64 for float64 inputs, ``IS_F64``).

Errors are reported through ``flag_ptr``, a small int32 device tensor the launcher reads after the launch:
slot 0 non-binary masks, slot 1 a vote count above R, slot 2 a probability that is NaN or outside [0, 1].

This module is loaded by :mod:`orcal.ops._triton._ops` once per ``TRITON_INTERPRET`` mode, because Triton
decides at decoration time whether a kernel is compiled or interpreted.
"""

import math

import triton
import triton.language as tl
from triton.language.extra import libdevice

from orcal.ops._triton._ops import interpreting

FLAG_MASKS = tl.constexpr(0)
FLAG_VOTES = tl.constexpr(1)
FLAG_PROB = tl.constexpr(2)
LOG2E = tl.constexpr(math.log2(math.e))
LN2 = tl.constexpr(math.log(2.0))
#: Approximate log2 (a libdevice call, which the interpreter cannot run) in compiled kernels.
FAST_LOG = tl.constexpr(not interpreting())


@triton.jit
def orc_targets_kernel(masks_ptr, k_ptr, flag_ptr, R, V, nblk,
                       R_PAD: tl.constexpr, BLOCK_V: tl.constexpr):
    """k[b, v] = sum_r masks[b, r, v]; flags a mask value above 1."""
    pid = tl.program_id(0)
    b = (pid // nblk).to(tl.int64)
    v = (pid % nblk).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    r = tl.arange(0, R_PAD)
    vm = v < V
    offs = b * R * V + r[:, None].to(tl.int64) * V + v[None, :]
    x = tl.load(masks_ptr + offs, mask=(r[:, None] < R) & vm[None, :], other=0).to(tl.int32)
    k = tl.sum(x, axis=0)
    bad = (tl.max(x, axis=0) > 1) & vm
    tl.store(k_ptr + b * V + v, k.to(tl.uint8), mask=vm)
    # Every writer stores the same 1, so the race is benign.
    tl.store(flag_ptr + FLAG_MASKS + v * 0, 1, mask=bad)


@triton.jit
def _finite_shift(x):
    """x clamped to the finite range: the shift of a group whose maximum is +-inf, so that exp(z - shift) is
    inf or 0 instead of NaN and the majority readout of +-inf logits is 1 or 0 as in the reference (the
    largest finite value as a shift gives the same sums and LSEs as 0; two min/max instead of a test)."""
    if x.dtype == tl.float64:
        big = 1.7976931348623157e308
    else:
        big = 3.4028234663852886e38
    return tl.minimum(tl.maximum(x, -big), big)


@triton.jit
def _exp(x):
    """e^x as ``ex2.approx`` of x log2(e) (one MUFU, no denormal fix-up: results below 2^-126 are 0)."""
    return tl.exp2(x * LOG2E)


@triton.jit
def _fast_ln(x):
    """ln x for the majority logit: ``lg2.approx`` (one MUFU, absolute error below 2^-22) in compiled
    float32, which moves the logit by less than 1e-7; the exact log elsewhere. The NLL and BCE keep the
    exact log (their confident voxels need it)."""
    if FAST_LOG and x.dtype == tl.float32:
        return libdevice.fast_log2f(x) * LN2
    else:
        return tl.log(x)


@triton.jit
def _channel(row_ptr, c, V, v, vm, IS_F64: tl.constexpr):
    """Channel ``c`` of the voxels ``v`` of one image (``row_ptr``: its channel 0; ``V``: int64), in the math
    dtype: converted in registers right after the load, in the load's own layout."""
    x = tl.load(row_ptr + c * V + v, mask=vm, other=0.0)
    if IS_F64:
        return x.to(tl.float64)
    elif x.dtype == tl.bfloat16:
        # bfloat16 is the high half of a float32: a shift (or a mask, for the upper of two packed halves)
        return (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        return x.to(tl.float32)


@triton.jit
def _group_max(mx_lo, mx_hi, z, hi):
    """Running maxima of the two groups; ``hi`` (level >= M) is a constant of the unrolled loop."""
    return tl.where(hi, mx_lo, tl.maximum(mx_lo, z)), tl.where(hi, tl.maximum(mx_hi, z), mx_hi)


@triton.jit
def _group_exp(z, hi, mx_lo, mx_hi):
    return _exp(z - tl.where(hi, mx_hi, mx_lo))


@triton.jit
def _two_groups(row_ptr, V, v, vm, zero, M: tl.constexpr, C: tl.constexpr, UNROLL: tl.constexpr,
                FINITE: tl.constexpr, IS_F64: tl.constexpr):
    """The two partial softmaxes of the majority split (levels < M and >= M), each shifted by its own maximum:
    (shift_lo, shift_hi, sum_lo, sum_hi, exps). Every voxel sits in one thread, so this is per-thread
    elementwise math. ``UNROLL``: the channel loop is unrolled and the exps come back as a tuple of C tensors
    (registers); else a loop that reads the channels twice (cache hits), for wide C, and the tuple is empty.
    ``FINITE``: shifts that are +-inf become finite (:func:`_finite_shift`). ``zero``: zeros of the voxels'
    shape in the math dtype."""
    mx_lo = zero - float("inf")
    mx_hi = mx_lo
    s_lo = zero
    s_hi = zero
    if UNROLL:
        zs = ()
        # (the first level of each group starts its maximum and its sum: no max with -inf, no add to 0)
        for c in tl.static_range(C):
            z = _channel(row_ptr, c, V, v, vm, IS_F64)
            zs = zs + (z,)
            if c == M:
                mx_hi = z
            elif c == 0:
                mx_lo = z
            else:
                mx_lo, mx_hi = _group_max(mx_lo, mx_hi, z, c >= M)
        if FINITE:
            mx_lo = _finite_shift(mx_lo)
            mx_hi = _finite_shift(mx_hi)
        es = ()
        for c in tl.static_range(C):
            e = _group_exp(zs[c], c >= M, mx_lo, mx_hi)
            es = es + (e,)
            if c == M:
                s_hi = e
            elif c > M:
                s_hi += e
            elif c == 0:
                s_lo = e
            else:
                s_lo += e
        return mx_lo, mx_hi, s_lo, s_hi, es
    else:
        for c in range(C):
            mx_lo, mx_hi = _group_max(mx_lo, mx_hi, _channel(row_ptr, c, V, v, vm, IS_F64), c >= M)
        if FINITE:
            mx_lo = _finite_shift(mx_lo)
            mx_hi = _finite_shift(mx_hi)
        for c in range(C):
            e = _group_exp(_channel(row_ptr, c, V, v, vm, IS_F64), c >= M, mx_lo, mx_hi)
            s_lo += tl.where(c >= M, 0.0, e)
            s_hi += tl.where(c >= M, e, 0.0)
        return mx_lo, mx_hi, s_lo, s_hi, ()


@triton.jit
def _capped_exp(d):
    """e^d with the exponent capped at 2^64 (NaN stays NaN): for d <= 0, e^d; for a +inf level's d = +inf,
    exactly 2^64, the weight :func:`_readout`'s expected branch gives it (a power of two: level x 2^64 and
    R x 2^64 are exact, so one +inf level reads out exactly as level / R)."""
    return tl.exp2(tl.minimum(d * LOG2E, 64.0, propagate_nan=tl.PropagateNan.ALL))


@triton.jit
def _readout(row_ptr, V, v, vm, zero, M: tl.constexpr, C: tl.constexpr, UNROLL: tl.constexpr,
             EXPECTED: tl.constexpr, IS_F64: tl.constexpr):
    """Foreground probability of the voxels ``v`` from their C ordinal logits, SPEC §2: the expected vote
    fraction, or the sigmoid of the majority logit from the two groups' LSEs (per-thread math, as
    :func:`_two_groups`)."""
    if EXPECTED:
        # The shift is the largest logit made finite, so a +inf level's exponent is +inf, capped to the weight
        # 2^64, and every finite level's is 0: one +inf level takes all the mass (p = level / R, SPEC §2) and
        # several sum to at least 2^65 (no limit: NaN), with no per-level test; finite logits give se <= C.
        mx = zero - float("inf")
        se = zero
        sce = zero
        if UNROLL:
            zs = ()
            for c in tl.static_range(C):
                z = _channel(row_ptr, c, V, v, vm, IS_F64)
                zs = zs + (z,)
                if c == 0:
                    mx = z
                else:
                    mx = tl.maximum(mx, z)
            mx = _finite_shift(mx)
            for c in tl.static_range(C):
                e = _capped_exp(zs[c] - mx)
                if c == 0:  # (level 0 adds nothing to sce)
                    se = e
                elif c == 1:
                    se += e
                    sce = e
                else:
                    se += e
                    sce += e * c
        else:
            for c in range(C):
                mx = tl.maximum(mx, _channel(row_ptr, c, V, v, vm, IS_F64))
            mx = _finite_shift(mx)
            for c in range(C):
                e = _capped_exp(_channel(row_ptr, c, V, v, vm, IS_F64) - mx)
                se += e
                sce += e * c
        p = sce / (se * (C - 1))
        p = tl.where(p > 1.0, 1.0, p)  # rounding can carry it just past 1 on confident voxels; NaN stays NaN
        p = tl.where(se > 1.5 * 18446744073709551616.0, float("nan"), p)  # two or more +inf levels
    else:
        mx_lo, mx_hi, s_lo, s_hi, es = _two_groups(row_ptr, V, v, vm, zero, M, C, UNROLL, True, IS_F64)
        lgt = (mx_hi - mx_lo) + (_fast_ln(s_hi) - _fast_ln(s_lo))
        p = 1.0 / (1.0 + _exp(-lgt))
    return p


@triton.jit
def foreground_probability_kernel(x_ptr, p_ptr, V, nblk,
                                  M: tl.constexpr, C: tl.constexpr, UNROLL: tl.constexpr,
                                  EXPECTED: tl.constexpr, IS_F64: tl.constexpr, BLOCK_V: tl.constexpr):
    """p = sigmoid(LSE(z_M..z_R) - LSE(z_0..z_{M-1})) (majority) or sum_i i q_i / R (expected)."""
    pid = tl.program_id(0)
    b = (pid // nblk).to(tl.int64)
    v = (pid % nblk).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    vm = v < V
    V64 = V + tl.zeros([], tl.int64)  # (V may arrive as the constexpr 1)
    if IS_F64:
        zero = tl.zeros([BLOCK_V], tl.float64)
    else:
        zero = tl.zeros([BLOCK_V], tl.float32)
    p = _readout(x_ptr + b * C * V64, V64, v, vm, zero, M, C, UNROLL, EXPECTED, IS_F64)
    tl.store(p_ptr + b * V64 + v, p.to(p_ptr.dtype.element_ty), mask=vm)


@triton.jit
def _rps_step(cum, sq, dsum, dcum, e, hi, k, c, sc_lo, sc_hi):
    """Level c < R of the RPS: q_c (the full softmax), the cumulative distribution and its difference from the
    target's; ``dcum`` sums diff_c cum_c, which is sum_c q_c sum_{j >= c} diff_j (the gradient's mean)."""
    q = e * tl.where(hi, sc_hi, sc_lo)
    cum += q
    diff = tl.where(c >= k, cum - 1.0, cum)
    return cum, sq + diff * diff, dsum + diff, dcum + diff * cum, diff


@triton.jit
def ordinal_loss_kernel(x_ptr, k_ptr, valid_ptr, params_ptr, loss_ptr, partial_ptr, grad_ptr, flag_ptr,
                        V, nblk,
                        M: tl.constexpr, C: tl.constexpr, UNROLL: tl.constexpr, HAS_VALID: tl.constexpr,
                        MAP: tl.constexpr, GRAD: tl.constexpr, IS_F64: tl.constexpr, BLOCK_V: tl.constexpr):
    """SPEC §3 per voxel: loss = BCE(l, [k >= M]) + w * RPS, and its gradient in the same pass.

    Each thread owns whole voxels (all C channels, each loaded as a coalesced vector of voxels), so the
    softmaxes and the cumulative sums over the levels are per-thread math.
    ``MAP``: write the per-voxel loss (0 where invalid) to ``loss_ptr``; else one partial sum per program
    to ``partial_ptr`` (reduced on the host side in a fixed order, so the result is deterministic).
    ``GRAD``: write d(loss)/d(logits) scaled by ``params_ptr[0]`` (1 / valid count for the mean); invalid
    voxels get exactly 0, whatever their logits hold. ``params_ptr[1]`` is the RPS weight (in the math dtype:
    a float argument would reach the kernel as float32).
    """
    pid = tl.program_id(0)
    b = (pid // nblk).to(tl.int64)
    v = (pid % nblk).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    vm = v < V
    V64 = V + tl.zeros([], tl.int64)  # (V may arrive as the constexpr 1)
    R: tl.constexpr = C - 1
    row = b * C * V64
    x_row = x_ptr + row
    if IS_F64:
        zero = tl.zeros([BLOCK_V], tl.float64)
    else:
        zero = tl.zeros([BLOCK_V], tl.float32)
    rps_weight = tl.load(params_ptr + 1)
    k = tl.load(k_ptr + b * V64 + v, mask=vm, other=0).to(tl.int32)
    tl.store(flag_ptr + FLAG_VOTES + v * 0, 1, mask=k > R)  # (k is 0 outside the image)
    w = vm
    if HAS_VALID:
        w = w & (tl.load(valid_ptr + b * V64 + v, mask=vm, other=0) != 0)

    # Two partial softmaxes (levels < M and >= M), each with its own maximum: nothing divides by a
    # vanishing probability and logits of +-1e4 stay finite.
    mx_lo, mx_hi, s_lo, s_hi, es = _two_groups(x_row, V64, v, vm, zero, M, C, UNROLL, False, IS_F64)
    lgt = (mx_hi - mx_lo) + (_fast_ln(s_hi) - _fast_ln(s_lo))  # majority logit
    # sigmoid(+-lgt) from u = exp(-|lgt|) (no overflow): 1 / (1 + u) for the likelier side, u / (1 + u) for the
    # other; u also gives the BCE's log1p term.
    u = _exp(-tl.abs(lgt))
    r = 1.0 / (1.0 + u)
    p_hi = tl.where(lgt >= 0, r, u * r)
    p_lo = tl.where(lgt >= 0, u * r, r)
    inv_hi = 1.0 / s_hi
    inv_lo = 1.0 / s_lo
    sc_hi = p_hi * inv_hi  # q = e * sc: the full softmax
    sc_lo = p_lo * inv_lo

    # RPS over the cumulative distributions of levels 0..R-1 (the last level is 1 on both sides).
    cum = zero
    sq = zero
    dsum = zero
    dcum = zero
    if UNROLL:
        diffs = ()
        for c in tl.static_range(R):
            cum, sq, dsum, dcum, diff = _rps_step(cum, sq, dsum, dcum, es[c], c >= M, k, c, sc_lo, sc_hi)
            diffs = diffs + (diff,)
    else:
        for c in range(R):
            e = _group_exp(_channel(x_row, c, V64, v, vm, IS_F64), c >= M, mx_lo, mx_hi)
            cum, sq, dsum, dcum, diff = _rps_step(cum, sq, dsum, dcum, e, c >= M, k, c, sc_lo, sc_hi)
    rps = sq * (1.0 / R)

    y = (k >= M).to(lgt.dtype)
    t = 1.0 + u
    # log1p(u) without a log1p primitive: exact to rounding for small u (Goldberg's trick).
    log1p_u = tl.where(t == 1.0, u, tl.log(t) * u / tl.where(t == 1.0, 1.0, t - 1.0))
    bce = tl.maximum(lgt, 0.0) + log1p_u - y * lgt
    loss = tl.where(w, bce + rps_weight * rps, 0.0)
    if MAP:
        tl.store(loss_ptr + b * V64 + v, loss.to(loss_ptr.dtype.element_ty), mask=vm)
    else:
        tl.store(partial_ptr + pid, tl.sum(loss, axis=0))

    if GRAD:
        # d loss / d z_c = scale * e_c * (d_l * (+-1 / s_group) + w_rps * sc_group * (g_c - qg)), with
        # dRPS/dq_c = g_c = (2/R) sum_{j >= c} diff_j (the total less the levels below c; 0 at level R) and
        # qg = sum_c q_c g_c = (2/R) dcum; so per level one multiply-add on e_c, the rest per voxel.
        scale = tl.load(params_ptr)
        sd = scale * (p_hi - y)
        a_hi = sd * inv_hi
        a_lo = -sd * inv_lo
        bw = scale * rps_weight * (2.0 / R)
        b_hi = bw * sc_hi
        b_lo = bw * sc_lo
        dd = dsum - dcum  # (R/2) (g_c - qg) = dd - (diffs below c)
        g_row = grad_ptr + row
        pre = zero
        if UNROLL:
            for c in tl.static_range(C):
                if c < R:
                    x = dd - pre
                    pre += diffs[c]
                else:
                    x = -dcum
                if c >= M:
                    coef = a_hi + b_hi * x
                else:
                    coef = a_lo + b_lo * x
                grad = tl.where(w, es[c] * coef, 0.0)  # invalid voxels: exactly 0, whatever e holds
                tl.store(g_row + c * V64 + v, grad.to(grad_ptr.dtype.element_ty), mask=vm)
        else:
            cum = zero
            for c in range(C):
                hi = c >= M
                e = _group_exp(_channel(x_row, c, V64, v, vm, IS_F64), hi, mx_lo, mx_hi)
                cum += e * tl.where(hi, sc_hi, sc_lo)
                x = tl.where(c < R, dd - pre, -dcum)
                pre += tl.where(c < R, tl.where(c >= k, cum - 1.0, cum), 0.0)
                grad = tl.where(w, e * tl.where(hi, a_hi + b_hi * x, a_lo + b_lo * x), 0.0)
                tl.store(g_row + c * V64 + v, grad.to(grad_ptr.dtype.element_ty), mask=vm)


@triton.jit
def _columns(x, VEC: tl.constexpr):
    """The VEC columns of a ``[THREADS, VEC]`` tile whose rows sit in one thread each, as a tuple of
    ``[THREADS]`` tensors (in-register splits: no data moves between threads)."""
    if VEC == 1:
        return (tl.reshape(x, [x.shape[0]]),)
    else:
        lo, hi = tl.split(tl.reshape(x, [x.shape[0], VEC // 2, 2]))
        return _columns(lo, VEC // 2) + _columns(hi, VEC // 2)


@triton.jit
def calibration_stats_kernel(pred_ptr, tgt_ptr, valid_ptr, counts_ptr, partial_ptr, auc_ptr, flag_ptr,
                             V, R, n_bins, bin_lo, auc_bins, P, iters, count_cols, a_col, tp_col, pos_col,
                             sum_cols, brier_col,
                             KIND: tl.constexpr, EXPECTED: tl.constexpr, HAS_VALID: tl.constexpr,
                             IS_F64: tl.constexpr, PACKED: tl.constexpr, FULL: tl.constexpr, M: tl.constexpr,
                             C: tl.constexpr, UNROLL: tl.constexpr, NB: tl.constexpr, BLOCK_V: tl.constexpr,
                             VEC: tl.constexpr):
    """SPEC §4 statistics of image ``pid // P``; program ``pid % P`` covers ``iters`` blocks of voxels.

    A block is a ``[THREADS, VEC]`` tile: each thread owns VEC consecutive voxels (all their channels), so the
    readout and every per-voxel quantity are per-thread math, and each trip adds them to per-thread partials
    (registers) with no cross-thread traffic; the threads are reduced once, after the loop.
    ECE bins ``bin_lo .. bin_lo + NB - 1`` (one tuple entry each), Dice counts and the extreme AUC bins
    are flushed once per program (integer atomics, exact). Inner AUC bins take one integer atomic per voxel,
    spread over ``auc_bins`` addresses; with ``PACKED`` (the launcher checks that ``V * R < 2^32``) positives
    and negatives share one 64-bit atomic into ``auc_ptr`` (low and high 32 bits), unpacked by the launcher.
    Histogram atomics are relaxed: they only count, nothing is ordered by them.
    Float sums go to ``partial_ptr`` (one row of ``sum_cols`` per program). Column offsets come from
    :class:`orcal.ops._schema.StatsLayout` (``count_cols``, ``a_col``, ``tp_col``, ``pos_col``, ``sum_cols``,
    ``brier_col``; ``n`` and ``s`` start at column 0).
    KIND: 0 probabilities, 1 binary logits, 2 ordinal logits (``EXPECTED`` picks the readout).
    ``FULL``: everything; else only the ECE bins of this window (the launcher's further passes over the
    voxels when ``n_bins`` is wider than one window, so the bin accumulators stay few enough for registers).
    """
    pid = tl.program_id(0)
    b = (pid // P).to(tl.int64)
    j = (pid % P).to(tl.int64)
    THREADS: tl.constexpr = BLOCK_V // VEC
    if IS_F64:
        acc_t = tl.float64
    else:
        acc_t = tl.float32
    zero = tl.zeros([THREADS, VEC], acc_t)
    V64 = V + tl.zeros([], tl.int64)  # (V may arrive as the constexpr 1)
    tile = tl.arange(0, THREADS)[:, None] * VEC + tl.arange(0, VEC)[None, :]
    # Integer accumulators are int32: the launcher keeps iters * BLOCK_V * R below 2^31.
    log_eps = tl.log(tl.full([1, 1], 1e-7, acc_t))
    zt = tl.zeros([THREADS], dtype=tl.int32)
    # Per bin: n and a share an int32 (n << 16 | a: the launcher keeps a thread's iters * VEC * R below 2^16),
    # and the sum of p is float64.
    na_acc = ()
    s_acc = ()
    for _i in tl.static_range(NB):
        na_acc = na_acc + (zt,)
        s_acc = s_acc + (zt.to(tl.float64),)
    brier_acc = zt.to(tl.float64)
    nll_acc = zt.to(tl.float64)
    tp = zt
    fp = zt
    fn = zt
    pos_first = zt
    neg_first = zt
    pos_last = zt
    neg_last = zt
    # Error flags, per thread: the largest vote count, and whether a counted voxel had a bad probability.
    max_k = tile * 0
    bad_prob = tile * 0
    row = counts_ptr + b * count_cols
    pos_ptr = row + pos_col
    neg_ptr = pos_ptr + auc_bins
    for it in range(iters):
        v = (j * iters + it) * BLOCK_V + tile
        vm = v < V
        # --- the foreground probability
        if KIND == 2:
            p = _readout(pred_ptr + b * C * V64, V64, v, vm, zero, M, C, UNROLL, EXPECTED, IS_F64)
        else:
            x = tl.load(pred_ptr + b * V64 + v, mask=vm, other=0.0).to(acc_t)
            if KIND == 1:
                p = 1.0 / (1.0 + _exp(-x))
            else:
                p = x
        # --- the votes (rater masks are summed by orc_targets_kernel first: the launcher)
        k = tl.load(tgt_ptr + b * V64 + v, mask=vm, other=0).to(tl.int32)
        w = vm
        if HAS_VALID:
            w = w & (tl.load(valid_ptr + b * V64 + v, mask=vm, other=0) != 0)
        ok = (p >= 0.0) & (p <= 1.0)  # False for NaN
        if FULL:
            max_k = tl.maximum(max_k, k)  # 0 outside the image
            bad_prob = tl.where(w & (ok == 0), 1, bad_prob)
        w = w & ok
        p = tl.where(w, p, 0.0)
        kw = tl.where(w, k, 0)
        # --- ECE bins of this window: the bin relative to the window, -1 for a voxel that does not count
        bi = tl.where(w, tl.minimum(tl.floor(p * n_bins).to(tl.int32), n_bins - 1) - bin_lo, -1)
        na = kw + (1 << 16)
        na_new = ()
        s_new = ()
        for i in tl.static_range(NB):
            hot = bi == i
            na_new = na_new + (na_acc[i] + tl.sum(tl.where(hot, na, 0), axis=1),)
            s_new = s_new + (s_acc[i] + tl.sum(tl.where(hot, p, 0.0), axis=1).to(tl.float64),)
        na_acc = na_new
        s_acc = s_new
        if FULL:
            # --- Brier, NLL, Dice counts
            kf = kw.to(acc_t)
            rk = tl.where(w, R - kw, 0).to(acc_t)
            brier = kf * (1.0 - p) * (1.0 - p) + rk * p * p
            # log p and log(1 - p) bounded below by log(1e-7) (SPEC §4), the bound in the math dtype
            t1 = 1.0 - p  # log1p(-p) with Goldberg's trick, exact for small p
            log1m = tl.where(t1 == 1.0, -p, tl.log(t1) * (-p) / tl.where(t1 == 1.0, 1.0, t1 - 1.0))
            nll = -(kf * tl.maximum(tl.log(p), log_eps) + rk * tl.maximum(log1m, log_eps))
            brier_acc += tl.sum(tl.where(w, brier, 0.0), axis=1).to(tl.float64)
            nll_acc += tl.sum(tl.where(w, nll, 0.0), axis=1).to(tl.float64)
            fg = p >= 0.5
            y = k >= M
            tp += tl.sum((w & fg & y).to(tl.int32), axis=1)
            fp += tl.sum((w & fg & (y == 0)).to(tl.int32), axis=1)
            fn += tl.sum((w & (fg == 0) & y).to(tl.int32), axis=1)
            # --- streaming AUC: the first and last score bins (confident voxels, most of an image) are
            # reduced in registers; the others take one atomic per nonzero count.
            ti = tl.minimum(tl.floor(p * auc_bins).to(tl.int32), auc_bins - 1)
            negw = tl.where(w, R - kw, 0)
            first = ti == 0
            last = ti == auc_bins - 1
            pos_first += tl.sum(tl.where(first, kw, 0), axis=1)
            neg_first += tl.sum(tl.where(first, negw, 0), axis=1)
            pos_last += tl.sum(tl.where(last, kw, 0), axis=1)
            neg_last += tl.sum(tl.where(last, negw, 0), axis=1)
            inner = (first == 0) & (last == 0)
            # One atomic per voxel, column by column of the tile: a scattered atomic on the whole tile would
            # change its layout (one element per thread) through shared memory.
            ti_c = _columns(ti, VEC)
            kw_c = _columns(kw, VEC)
            negw_c = _columns(negw, VEC)
            inner_c = _columns(inner.to(tl.int32), VEC)
            for i in tl.static_range(VEC):
                if PACKED:
                    both = kw_c[i].to(tl.int64) + (negw_c[i].to(tl.int64) << 32)
                    tl.atomic_add(auc_ptr + b * auc_bins + ti_c[i], both, mask=(inner_c[i] != 0) & (both != 0),
                                  sem="relaxed")
                else:
                    tl.atomic_add(pos_ptr + ti_c[i], kw_c[i].to(tl.int64), mask=(inner_c[i] != 0) & (kw_c[i] > 0),
                                  sem="relaxed")
                    tl.atomic_add(neg_ptr + ti_c[i], negw_c[i].to(tl.int64),
                                  mask=(inner_c[i] != 0) & (negw_c[i] > 0), sem="relaxed")
    # --- flush: integer atomics (exact, order-free), float partials by plain stores
    prow = partial_ptr + pid.to(tl.int64) * sum_cols
    for i in tl.static_range(NB):
        if bin_lo + i < n_bins:
            n_i = tl.sum(na_acc[i] >> 16, axis=0).to(tl.int64)
            a_i = tl.sum(na_acc[i] & 0xFFFF, axis=0).to(tl.int64)
            tl.atomic_add(row + bin_lo + i, n_i * R, sem="relaxed")
            tl.atomic_add(row + a_col + bin_lo + i, a_i, sem="relaxed")
            tl.store(prow + bin_lo + i, tl.sum(s_acc[i], axis=0) * R)
    if FULL:
        # Every writer stores the same 1, so the race is benign.
        tl.store(flag_ptr + FLAG_VOTES + tile * 0, 1, mask=max_k > R)
        tl.store(flag_ptr + FLAG_PROB + tile * 0, 1, mask=bad_prob != 0)
        tl.atomic_add(row + tp_col, tl.sum(tp, axis=0).to(tl.int64), sem="relaxed")
        tl.atomic_add(row + tp_col + 1, tl.sum(fp, axis=0).to(tl.int64), sem="relaxed")
        tl.atomic_add(row + tp_col + 2, tl.sum(fn, axis=0).to(tl.int64), sem="relaxed")
        tl.atomic_add(pos_ptr, tl.sum(pos_first, axis=0).to(tl.int64), sem="relaxed")
        tl.atomic_add(neg_ptr, tl.sum(neg_first, axis=0).to(tl.int64), sem="relaxed")
        tl.atomic_add(pos_ptr + auc_bins - 1, tl.sum(pos_last, axis=0).to(tl.int64), sem="relaxed")
        tl.atomic_add(neg_ptr + auc_bins - 1, tl.sum(neg_last, axis=0).to(tl.int64), sem="relaxed")
        tl.store(prow + brier_col, tl.sum(brier_acc, axis=0))
        tl.store(prow + brier_col + 1, tl.sum(nll_acc, axis=0))
