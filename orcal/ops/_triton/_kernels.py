"""Triton kernels of the orcal ops (SPEC §1–4).

Layout: every kernel reads channel-major tensors ``(B, C, V)`` (V voxels per image, contiguous) as a tile
``[C_PAD, BLOCK_V]``: voxels are the fast, coalesced axis and all channels of a voxel sit in one thread's
registers, so channel reductions and scans need no shuffles. Offsets are 64-bit. Math is float32
(float64 for float64 inputs, ``IS_F64``).

Errors are reported through ``flag_ptr``, a small int32 device tensor the launcher reads after the launch:
slot 0 non-binary masks, slot 1 a vote count above R, slot 2 a probability that is NaN or outside [0, 1].

This module is loaded by :mod:`orcal.ops._triton._ops` once per ``TRITON_INTERPRET`` mode, because Triton
decides at decoration time whether a kernel is compiled or interpreted.
"""

import triton
import triton.language as tl

FLAG_MASKS = tl.constexpr(0)
FLAG_VOTES = tl.constexpr(1)
FLAG_PROB = tl.constexpr(2)


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
def _finite_or_zero(x):
    """x where finite, else 0: the shift of a group whose maximum is +-inf, so that exp(z - shift) is inf or 0
    instead of NaN and the majority readout of +-inf logits is 1 or 0 as in the reference."""
    return tl.where(x - x == 0, x, 0.0)


@triton.jit
def _readout(z, c, C, m, EXPECTED: tl.constexpr):
    """Foreground probability of a (C_PAD, BLOCK_V) tile of logits (padding channels hold -inf), SPEC §2:
    the expected vote fraction, or the sigmoid of the majority logit from the two groups' LSEs."""
    if EXPECTED:
        mx = tl.max(z, axis=0)
        e = tl.exp(z - mx[None, :])
        p = tl.sum(e * c.to(z.dtype), axis=0) / tl.sum(e, axis=0) / (C - 1).to(z.dtype)
        p = tl.where(p > 1.0, 1.0, p)  # rounding can carry it just past 1 on confident voxels; NaN stays NaN
        # +inf logits: one such level takes all the mass (p = level / R), several have no limit (NaN).
        pinf = z == float("inf")
        n_inf = tl.sum(pinf.to(z.dtype), axis=0) + 2 * tl.sum((z != z).to(z.dtype), axis=0)  # NaN stays NaN
        lim = tl.sum(tl.where(pinf, c.to(z.dtype), 0.0), axis=0) / (C - 1).to(z.dtype)
        p = tl.where(n_inf == 0, p, tl.where(n_inf == 1, lim, float("nan")))
    else:
        hi = c >= m
        mx_hi = _finite_or_zero(tl.max(tl.where(hi, z, -float("inf")), axis=0))
        mx_lo = _finite_or_zero(tl.max(tl.where(hi, -float("inf"), z), axis=0))
        e = tl.exp(z - tl.where(hi, mx_hi[None, :], mx_lo[None, :]))
        s_hi = tl.sum(tl.where(hi, e, 0.0), axis=0)
        s_lo = tl.sum(tl.where(hi, 0.0, e), axis=0)
        lgt = (mx_hi - mx_lo) + tl.log(s_hi) - tl.log(s_lo)
        p = 1.0 / (1.0 + tl.exp(-lgt))
    return p


@triton.jit
def foreground_probability_kernel(x_ptr, p_ptr, C, V, m, nblk,
                                  EXPECTED: tl.constexpr, IS_F64: tl.constexpr,
                                  C_PAD: tl.constexpr, BLOCK_V: tl.constexpr):
    """p = sigmoid(LSE(z_m..z_R) - LSE(z_0..z_{m-1})) (majority) or sum_i i q_i / R (expected)."""
    pid = tl.program_id(0)
    b = (pid // nblk).to(tl.int64)
    v = (pid % nblk).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    c = tl.arange(0, C_PAD)[:, None]
    cm = c < C
    vm = v < V
    x = tl.load(x_ptr + b * C * V + c.to(tl.int64) * V + v[None, :], mask=cm & vm[None, :], other=0.0)
    if IS_F64:
        z = x.to(tl.float64)
    else:
        z = x.to(tl.float32)
    z = tl.where(cm, z, -float("inf"))
    p = _readout(z, c, C, m, EXPECTED)
    tl.store(p_ptr + b * V + v, p.to(p_ptr.dtype.element_ty), mask=vm)


@triton.jit
def ordinal_loss_kernel(x_ptr, k_ptr, valid_ptr, params_ptr, loss_ptr, partial_ptr, grad_ptr, flag_ptr,
                        C, V, m, nblk,
                        HAS_VALID: tl.constexpr, MAP: tl.constexpr, GRAD: tl.constexpr, IS_F64: tl.constexpr,
                        C_PAD: tl.constexpr, BLOCK_V: tl.constexpr):
    """SPEC §3 per voxel: loss = BCE(l, [k >= m]) + w * RPS, and its gradient in the same pass.

    ``MAP``: write the per-voxel loss (0 where invalid) to ``loss_ptr``; else one partial sum per program
    to ``partial_ptr`` (reduced on the host side in a fixed order, so the result is deterministic).
    ``GRAD``: write d(loss)/d(logits) scaled by ``params_ptr[0]`` (1 / valid count for the mean); invalid
    voxels get exactly 0, whatever their logits hold. ``params_ptr[1]`` is the RPS weight (in the math dtype:
    a float argument would reach the kernel as float32).
    """
    pid = tl.program_id(0)
    b = (pid // nblk).to(tl.int64)
    v = (pid % nblk).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    c = tl.arange(0, C_PAD)[:, None]
    cm = c < C
    vm = v < V
    R = C - 1
    offs = b * C * V + c.to(tl.int64) * V + v[None, :]
    tile_mask = cm & vm[None, :]
    x = tl.load(x_ptr + offs, mask=tile_mask, other=0.0)
    if IS_F64:
        z = x.to(tl.float64)
    else:
        z = x.to(tl.float32)
    z = tl.where(cm, z, -float("inf"))
    Rf = R.to(z.dtype)
    rps_weight = tl.load(params_ptr + 1)
    k = tl.load(k_ptr + b * V + v, mask=vm, other=0).to(tl.int32)
    tl.store(flag_ptr + FLAG_VOTES + v * 0, 1, mask=(k > R) & vm)
    w = vm
    if HAS_VALID:
        w = w & (tl.load(valid_ptr + b * V + v, mask=vm, other=0) != 0)

    # Two partial softmaxes (levels < m and >= m), each with its own maximum: nothing divides by a
    # vanishing probability and logits of +-1e4 stay finite.
    hi = c >= m
    mx_hi = tl.max(tl.where(hi, z, -float("inf")), axis=0)
    mx_lo = tl.max(tl.where(hi, -float("inf"), z), axis=0)
    e = tl.exp(z - tl.where(hi, mx_hi[None, :], mx_lo[None, :]))  # 0 on padded channels
    s_hi = tl.sum(tl.where(hi, e, 0.0), axis=0)
    s_lo = tl.sum(tl.where(hi, 0.0, e), axis=0)
    lgt = (mx_hi - mx_lo) + tl.log(s_hi) - tl.log(s_lo)  # majority logit
    p_hi = 1.0 / (1.0 + tl.exp(-lgt))
    p_lo = 1.0 / (1.0 + tl.exp(lgt))
    soft = e * tl.where(hi, (1.0 / s_hi)[None, :], (1.0 / s_lo)[None, :])  # partial softmaxes
    q = soft * tl.where(hi, p_hi[None, :], p_lo[None, :])  # the full softmax

    # RPS over the cumulative distributions of levels 0..R-1 (the last level is 1 on both sides).
    cum = tl.cumsum(q, axis=0)
    target_cum = (c >= k[None, :]).to(z.dtype)
    diff = tl.where(c < R, cum - target_cum, 0.0)
    rps = tl.sum(diff * diff, axis=0) / Rf

    y = (k >= m).to(z.dtype)
    a = tl.abs(lgt)
    u = tl.exp(-a)
    t = 1.0 + u
    # log1p(u) without a log1p primitive: exact to rounding for small u (Goldberg's trick).
    log1p_u = tl.where(t == 1.0, u, tl.log(t) * u / tl.where(t == 1.0, 1.0, t - 1.0))
    bce = tl.maximum(lgt, 0.0) + log1p_u - y * lgt
    loss = tl.where(w, bce + rps_weight * rps, 0.0)
    if MAP:
        tl.store(loss_ptr + b * V + v, loss.to(loss_ptr.dtype.element_ty), mask=vm)
    else:
        tl.store(partial_ptr + pid, tl.sum(loss, axis=0))

    if GRAD:
        # dRPS/dq_i = (2/R) sum_{j >= i} diff_j: the reverse cumulative sum, from the total.
        rev = tl.sum(diff, axis=0)[None, :] - tl.cumsum(diff, axis=0) + diff
        g = rev * (2.0 / Rf)
        qg = tl.sum(q * g, axis=0)
        d_rps = q * (g - qg[None, :])
        d_l = p_hi - y
        dl_dz = tl.where(hi, soft, -soft)
        grad = (d_l[None, :] * dl_dz + rps_weight * d_rps) * tl.load(params_ptr)
        grad = tl.where(w[None, :], grad, 0.0)
        tl.store(grad_ptr + offs, grad.to(grad_ptr.dtype.element_ty), mask=tile_mask)


@triton.jit
def _thread_sum(x, THREADS: tl.constexpr, VEC: tl.constexpr):
    """``[BLOCK_V] -> [THREADS]``: the sum of the VEC consecutive voxels of each thread (in its registers)."""
    return tl.sum(tl.reshape(x, [THREADS, VEC]), axis=1)


@triton.jit
def _thread_sum2(x, ROWS: tl.constexpr, THREADS: tl.constexpr, VEC: tl.constexpr):
    """``[ROWS, BLOCK_V] -> [ROWS, THREADS]``, as :func:`_thread_sum` row by row."""
    return tl.sum(tl.reshape(x, [ROWS, THREADS, VEC]), axis=2)


@triton.jit
def calibration_stats_kernel(pred_ptr, tgt_ptr, valid_ptr, counts_ptr, partial_ptr, auc_ptr, flag_ptr,
                             V, R, C, m, n_bins, bin_lo, auc_bins, P, iters, count_cols, a_col, tp_col, pos_col,
                             sum_cols, brier_col,
                             KIND: tl.constexpr, EXPECTED: tl.constexpr, HAS_VALID: tl.constexpr,
                             IS_F64: tl.constexpr, PACKED: tl.constexpr, FULL: tl.constexpr, C_PAD: tl.constexpr,
                             NB_PAD: tl.constexpr, BLOCK_V: tl.constexpr, VEC: tl.constexpr):
    """SPEC §4 statistics of image ``pid // P``; program ``pid % P`` covers ``iters`` blocks of voxels.

    ECE bins ``bin_lo .. bin_lo + NB_PAD - 1``, Dice counts and the extreme AUC bins are accumulated in
    registers and flushed once per program (integer atomics, exact). Inner AUC bins take one integer atomic
    per voxel and level, spread over ``auc_bins`` addresses; with ``PACKED`` (the launcher checks that
    ``V * R < 2^32``) positives and negatives share one 64-bit atomic into ``auc_ptr`` (low and high 32 bits),
    unpacked by the launcher. Histogram atomics are relaxed: they only count, nothing is ordered by them.
    Float sums go to ``partial_ptr`` (one row of ``sum_cols`` per program). Column offsets come from
    :class:`orcal.ops._schema.StatsLayout` (``count_cols``, ``a_col``, ``tp_col``, ``pos_col``, ``sum_cols``,
    ``brier_col``; ``n`` and ``s`` start at column 0).
    KIND: 0 probabilities, 1 binary logits, 2 ordinal logits (``EXPECTED`` picks the readout).
    ``FULL``: everything; else only the ECE bins of this window (the launcher's further passes over the
    voxels when ``n_bins`` is wider than one window, so the bin vectors stay small enough for registers).
    """
    pid = tl.program_id(0)
    b = (pid // P).to(tl.int64)
    j = (pid % P).to(tl.int64)
    nb = tl.arange(0, NB_PAD)
    if IS_F64:
        acc_t = tl.float64
    else:
        acc_t = tl.float32
    # Integer accumulators are int32: the launcher keeps iters * BLOCK_V * R below 2^31. Every thread
    # holds a copy of the bin vectors, so their width costs registers.
    log_eps = tl.log(tl.full([1], 1e-7, acc_t))
    # Per-thread partials (THREADS = BLOCK_V // VEC columns, one per thread): each trip adds the VEC voxels a
    # thread holds, in its registers; the threads are reduced once, after the loop, so the loop body has no
    # cross-thread reduction (no shuffles, no barriers) for these.
    THREADS: tl.constexpr = BLOCK_V // VEC
    n_acc = tl.zeros([NB_PAD, THREADS], dtype=tl.int32)
    a_acc = tl.zeros([NB_PAD, THREADS], dtype=tl.int32)
    s_acc = tl.zeros([NB_PAD, THREADS], dtype=tl.float64)
    brier_acc = tl.zeros([THREADS], dtype=tl.float64)
    nll_acc = tl.zeros([THREADS], dtype=tl.float64)
    tp = tl.zeros([THREADS], dtype=tl.int32)
    fp = tl.zeros([THREADS], dtype=tl.int32)
    fn = tl.zeros([THREADS], dtype=tl.int32)
    pos_first = tl.zeros([THREADS], dtype=tl.int32)
    neg_first = tl.zeros([THREADS], dtype=tl.int32)
    pos_last = tl.zeros([THREADS], dtype=tl.int32)
    neg_last = tl.zeros([THREADS], dtype=tl.int32)
    row = counts_ptr + b * count_cols
    pos_ptr = row + pos_col
    neg_ptr = pos_ptr + auc_bins
    for it in range(iters):
        v = (j * iters + it) * BLOCK_V + tl.arange(0, BLOCK_V)
        vm = v < V
        # --- the foreground probability
        if KIND == 2:
            c = tl.arange(0, C_PAD)[:, None]
            cm = c < C
            x = tl.load(pred_ptr + b * C * V + c.to(tl.int64) * V + v[None, :], mask=cm & vm[None, :],
                        other=0.0)
            z = tl.where(cm, x.to(acc_t), -float("inf"))
            p = _readout(z, c, C, m, EXPECTED)
        else:
            x = tl.load(pred_ptr + b * V + v, mask=vm, other=0.0).to(acc_t)
            if KIND == 1:
                p = 1.0 / (1.0 + tl.exp(-x))
            else:
                p = x
        # --- the votes (rater masks are summed by orc_targets_kernel first: the launcher)
        k = tl.load(tgt_ptr + b * V + v, mask=vm, other=0).to(tl.int32)
        if FULL:
            tl.store(flag_ptr + FLAG_VOTES + v * 0, 1, mask=(k > R) & vm)
        w = vm
        if HAS_VALID:
            w = w & (tl.load(valid_ptr + b * V + v, mask=vm, other=0) != 0)
        ok = (p >= 0.0) & (p <= 1.0)  # False for NaN
        if FULL:
            tl.store(flag_ptr + FLAG_PROB + v * 0, 1, mask=w & (ok == 0))
        w = w & ok
        p = tl.where(w, p, 0.0)
        kw = tl.where(w, k, 0)
        # --- ECE bins: one-hot over the (few) bins, reduced over the voxels of the block
        bi = tl.minimum(tl.floor(p * n_bins).to(tl.int32), n_bins - 1)
        hot = (bi[None, :] == (bin_lo + nb)[:, None]) & w[None, :]
        n_acc += _thread_sum2(hot.to(tl.int32), NB_PAD, THREADS, VEC)
        a_acc += _thread_sum2(tl.where(hot, kw[None, :], 0), NB_PAD, THREADS, VEC)
        s_acc += _thread_sum2(tl.where(hot, p[None, :], 0.0), NB_PAD, THREADS, VEC).to(tl.float64)
        if FULL:
            # --- Brier, NLL, Dice counts
            kf = kw.to(acc_t)
            rk = tl.where(w, R - kw, 0).to(acc_t)
            brier = kf * (1.0 - p) * (1.0 - p) + rk * p * p
            # log p and log(1 - p) bounded below by log(1e-7) (SPEC §4), the bound in the math dtype
            t1 = 1.0 - p  # log1p(-p) with Goldberg's trick, exact for small p
            log1m = tl.where(t1 == 1.0, -p, tl.log(t1) * (-p) / tl.where(t1 == 1.0, 1.0, t1 - 1.0))
            nll = -(kf * tl.maximum(tl.log(p), log_eps) + rk * tl.maximum(log1m, log_eps))
            brier_acc += _thread_sum(tl.where(w, brier, 0.0), THREADS, VEC).to(tl.float64)
            nll_acc += _thread_sum(tl.where(w, nll, 0.0), THREADS, VEC).to(tl.float64)
            fg = p >= 0.5
            y = k >= m
            tp += _thread_sum((w & fg & y).to(tl.int32), THREADS, VEC)
            fp += _thread_sum((w & fg & (y == 0)).to(tl.int32), THREADS, VEC)
            fn += _thread_sum((w & (fg == 0) & y).to(tl.int32), THREADS, VEC)
            # --- streaming AUC: the first and last score bins (confident voxels, most of an image) are
            # reduced in registers; the others take one atomic per nonzero count.
            ti = tl.minimum(tl.floor(p * auc_bins).to(tl.int32), auc_bins - 1)
            negw = tl.where(w, R - kw, 0)
            first = ti == 0
            last = ti == auc_bins - 1
            pos_first += _thread_sum(tl.where(first, kw, 0), THREADS, VEC)
            neg_first += _thread_sum(tl.where(first, negw, 0), THREADS, VEC)
            pos_last += _thread_sum(tl.where(last, kw, 0), THREADS, VEC)
            neg_last += _thread_sum(tl.where(last, negw, 0), THREADS, VEC)
            inner = (first == 0) & (last == 0)
            if PACKED:
                both = kw.to(tl.int64) + (negw.to(tl.int64) << 32)
                tl.atomic_add(auc_ptr + b * auc_bins + ti, both, mask=inner & w, sem="relaxed")
            else:
                tl.atomic_add(pos_ptr + ti, kw.to(tl.int64), mask=inner & (kw > 0), sem="relaxed")
                tl.atomic_add(neg_ptr + ti, negw.to(tl.int64), mask=inner & (negw > 0), sem="relaxed")
    # --- flush: integer atomics (exact, order-free), float partials by plain stores
    bm = bin_lo + nb < n_bins
    tl.atomic_add(row + bin_lo + nb, tl.sum(n_acc, axis=1).to(tl.int64) * R, mask=bm, sem="relaxed")
    tl.atomic_add(row + a_col + bin_lo + nb, tl.sum(a_acc, axis=1).to(tl.int64), mask=bm, sem="relaxed")
    prow = partial_ptr + pid.to(tl.int64) * sum_cols
    tl.store(prow + bin_lo + nb, tl.sum(s_acc, axis=1) * R, mask=bm)
    if FULL:
        tl.atomic_add(row + tp_col, tl.sum(tp, axis=0).to(tl.int64), sem="relaxed")
        tl.atomic_add(row + tp_col + 1, tl.sum(fp, axis=0).to(tl.int64), sem="relaxed")
        tl.atomic_add(row + tp_col + 2, tl.sum(fn, axis=0).to(tl.int64), sem="relaxed")
        tl.atomic_add(pos_ptr, tl.sum(pos_first, axis=0).to(tl.int64), sem="relaxed")
        tl.atomic_add(neg_ptr, tl.sum(neg_first, axis=0).to(tl.int64), sem="relaxed")
        tl.atomic_add(pos_ptr + auc_bins - 1, tl.sum(pos_last, axis=0).to(tl.int64), sem="relaxed")
        tl.atomic_add(neg_ptr + auc_bins - 1, tl.sum(neg_last, axis=0).to(tl.int64), sem="relaxed")
        tl.store(prow + brier_col, tl.sum(brier_acc, axis=0))
        tl.store(prow + brier_col + 1, tl.sum(nll_acc, axis=0))
