// Per-voxel math of SPEC §2-4, written once for the CPU and CUDA kernels.
//
// Everything is a template over the accumulation type T (float for float/half/bfloat16 inputs, double for
// double). The functions live in an anonymous namespace on purpose: the CPU kernels are compiled once per
// instruction set (csrc/cpu/kernels_*.cpp) and each copy must keep its own code, never share an
// out-of-line instance that the linker could pick from another instruction set.
//
// Numerics. The logits are split into a "low" group (levels 0..m-1) and a "high" group (m..R). Each group
// is exponentiated against its own maximum, e_c = exp(z_c - max_group) with group sums s_lo, s_hi >= 1, so
//   majority logit   l   = (max_hi - max_lo) + log(s_hi / s_lo)             (finite for any finite logits)
//   softmax          q_c = e_c * a_group,  a_group = exp(max_group - M) / S,  S = sum of both rescaled sums
//   partial softmax  e_c / s_group  (dl/dz_c, SPEC §3; never divides by a vanishing probability)
// One exponential per logit plus one per voxel.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

namespace orcal {
namespace {  // NOLINT(build/namespaces): internal linkage per translation unit, see above

C10_HOST_DEVICE inline float ox_exp(float x) { return expf(x); }
C10_HOST_DEVICE inline double ox_exp(double x) { return exp(x); }
C10_HOST_DEVICE inline float ox_log(float x) { return logf(x); }
C10_HOST_DEVICE inline double ox_log(double x) { return log(x); }
C10_HOST_DEVICE inline float ox_log1p(float x) { return log1pf(x); }
C10_HOST_DEVICE inline double ox_log1p(double x) { return log1p(x); }
C10_HOST_DEVICE inline float ox_floor(float x) { return floorf(x); }
C10_HOST_DEVICE inline double ox_floor(double x) { return floor(x); }

template <typename T>
C10_HOST_DEVICE inline T ox_max(T a, T b) { return a > b ? a : b; }
template <typename T>
C10_HOST_DEVICE inline T ox_min(T a, T b) { return a < b ? a : b; }
template <typename T>
C10_HOST_DEVICE inline T ox_abs(T a) { return a < T(0) ? -a : a; }

// x if finite, else 0: the shift of a group whose maximum is +-inf (or NaN), so that exp(z - shift) gives
// inf or 0 instead of exp(inf - inf) = NaN and the majority readout of +-inf logits is 1 or 0 as in the
// reference. Branch-free (x - x is NaN exactly for inf and NaN), so CPU loops stay vectorised.
template <typename T>
C10_HOST_DEVICE inline T finite_or_zero(T x) { return x - x == T(0) ? x : T(0); }

// sigmoid(x) without overflow: both branches use e^-|x| <= 1.
template <typename T>
C10_HOST_DEVICE inline T sigmoid(T x) {
  const T e = ox_exp(-ox_abs(x));
  const T r = T(1) / (T(1) + e);
  return x >= T(0) ? r : e * r;
}

// What the two group sums of a voxel give (see the header comment).
template <typename T>
struct GroupSoftmax {
  T a_lo, a_hi;  // q_c = e_c * a_group
  T l;           // majority logit
};

template <typename T>
C10_HOST_DEVICE inline GroupSoftmax<T> combine_groups(T max_lo, T s_lo, T max_hi, T s_hi) {
  // One of the two rescalings is exp(0) = 1, the other exp(-|gap|).
  const T gap = max_hi - max_lo;
  const T small = ox_exp(-ox_abs(gap));
  const T f_lo = gap > T(0) ? small : T(1);
  const T f_hi = gap > T(0) ? T(1) : small;
  const T inv = T(1) / (s_lo * f_lo + s_hi * f_hi);
  return {f_lo * inv, f_hi * inv, gap + ox_log(s_hi / s_lo)};
}

// Loss side of a voxel straight from its group sums, with one exponential, one logarithm and one division.
// With S = s_lo f_lo + s_hi f_hi (f_group as in combine_groups):
//   sigmoid(l)   = s_hi f_hi / S                        (= P_hi)
//   softplus(l)  = max(gap, 0)  + log(S / s_lo)         BCE for y = 0
//   softplus(-l) = max(-gap, 0) + log(S / s_hi)         BCE for y = 1 (softplus(l) - l)
// so no softplus/sigmoid of l is evaluated. One reciprocal r = 1 / (s_lo s_hi S) gives 1/S, 1/s_lo and
// 1/s_hi (all three factors lie in [1, R+1], so the product neither overflows nor underflows).
template <typename T>
struct GroupLoss {
  T a_lo, a_hi;      // q_c = e_c * a_group
  T inv_lo, inv_hi;  // 1 / s_group: dl/dz_c = -e_c / s_lo below m, e_c / s_hi from m on
  T bce, dbce;       // BCE of the majority logit and dBCE/dl
};

template <typename T, typename Exp, typename Log>
C10_HOST_DEVICE inline GroupLoss<T> group_loss(T max_lo, T s_lo, T max_hi, T s_hi, T y, const Exp& ex,
                                               const Log& lg) {
  const T gap = max_hi - max_lo;
  const T small = ex(-ox_abs(gap));
  const T f_lo = gap > T(0) ? small : T(1);
  const T f_hi = gap > T(0) ? T(1) : small;
  const T S = s_lo * f_lo + s_hi * f_hi;
  const T r = T(1) / (s_lo * s_hi * S);
  const T inv_s = r * (s_lo * s_hi);
  const T inv_lo = r * (s_hi * S), inv_hi = r * (s_lo * S);
  const T a_hi = f_hi * inv_s;
  const bool pos = y != T(0);
  const T bce = ox_max(pos ? -gap : gap, T(0)) + lg(S * (pos ? inv_hi : inv_lo));
  return {f_lo * inv_s, a_hi, inv_lo, inv_hi, bce, s_hi * a_hi - y};
}

// ECE / AUC bin of a probability: min(floor(p * bins), bins - 1), computed in T exactly as the reference does
// (p * bins rounded in T, then floored), so integer counts match it bit for bit. p must be in [0, 1].
template <typename T>
C10_HOST_DEVICE inline int64_t bin_index(T p, int64_t bins) {
  const int64_t b = static_cast<int64_t>(ox_floor(p * static_cast<T>(bins)));
  return b < bins - 1 ? (b < 0 ? 0 : b) : bins - 1;
}

// Multi-rater Brier and NLL of one voxel with k of R raters voting foreground (SPEC §4), in T like the
// reference (float32 for float inputs), before they are summed in double. The NLL bounds log p and
// log(1 - p) below by log(eps), so a confident miss costs -log(eps) on either side.
constexpr double kNllEps = 1e-7;

template <typename T>
C10_HOST_DEVICE inline T brier_voxel(T p, T k, T R) {
  return k * ((T(1) - p) * (T(1) - p)) + (R - k) * (p * p);
}
template <typename T>
C10_HOST_DEVICE inline T nll_voxel(T p, T k, T R) {
  const T log_eps = ox_log(static_cast<T>(kNllEps));
  return -(k * ox_max(ox_log(p), log_eps) + (R - k) * ox_max(ox_log1p(-p), log_eps));
}

// --- one voxel at a time (the CUDA kernels; the CPU kernels run the same steps with voxels innermost) ---
//
// `Load` is a callable c -> T that reads logit c of the voxel. Logits are re-read per pass instead of kept in
// an array so the code works for any R (up to 255) without local memory; on a GPU the re-reads hit L1.

template <typename T>
struct VoxelGroups {
  T max_lo, max_hi, s_lo, s_hi;
};

template <typename T, typename Load>
C10_HOST_DEVICE inline VoxelGroups<T> voxel_groups(const Load& z, int R, int m) {
  VoxelGroups<T> g{z(0), z(m), T(0), T(0)};
  for (int c = 1; c < m; ++c) g.max_lo = ox_max(g.max_lo, z(c));
  for (int c = m + 1; c <= R; ++c) g.max_hi = ox_max(g.max_hi, z(c));
  g.max_lo = finite_or_zero(g.max_lo);
  g.max_hi = finite_or_zero(g.max_hi);
  for (int c = 0; c < m; ++c) g.s_lo += ox_exp(z(c) - g.max_lo);
  for (int c = m; c <= R; ++c) g.s_hi += ox_exp(z(c) - g.max_hi);
  return g;
}

// The expected readout where logits are +inf (SPEC §2): one level at +inf takes all the mass, so the readout
// is that level / R; two or more at +inf have no limit (NaN). n_inf counts the +inf levels (a NaN level
// counts 2, so that NaN stays NaN), inf_level sums their levels; p is the readout computed as if all were
// finite (NaN where n_inf > 0). Branch-free.
template <typename T>
C10_HOST_DEVICE inline T expected_inf_limit(T p, T n_inf, T inf_level, T R) {
  const T nan = static_cast<T>(NAN);
  return n_inf == T(0) ? p : (n_inf == T(1) ? inf_level / R : nan);
}

// Foreground probability of one voxel: readout 0 = majority, 1 = expected (SPEC §2).
template <typename T, typename Load>
C10_HOST_DEVICE inline T voxel_readout(const Load& z, int R, int m, int readout) {
  const VoxelGroups<T> g = voxel_groups<T>(z, R, m);
  const GroupSoftmax<T> s = combine_groups(g.max_lo, g.s_lo, g.max_hi, g.s_hi);
  if (readout == 0) return sigmoid(s.l);
  T acc = T(0), n_inf = T(0), inf_level = T(0);
  for (int c = 0; c <= R; ++c) {
    const T zc = z(c);
    const T e = c < m ? ox_exp(zc - g.max_lo) * s.a_lo : ox_exp(zc - g.max_hi) * s.a_hi;
    acc += T(c) * e;
    const bool pinf = zc == static_cast<T>(INFINITY);
    n_inf += pinf ? T(1) : (zc != zc ? T(2) : T(0));
    inf_level += pinf ? T(c) : T(0);
  }
  const T p = acc / T(R);
  // rounding can carry it just past 1 on confident voxels; NaN stays NaN
  return expected_inf_limit(p > T(1) ? T(1) : p, n_inf, inf_level, T(R));
}

// Loss of one voxel (SPEC §3) and, when `store` is given, its gradient scaled by `gscale`
// (0 for an invalid voxel, 1/count for the mean): store(c, value) is called once per level.
template <typename T, typename Load, typename Store>
C10_HOST_DEVICE inline T voxel_loss(const Load& z, int R, int m, int k, T rps_weight, T gscale, bool want_grad,
                                    const Store& store) {
  const VoxelGroups<T> g = voxel_groups<T>(z, R, m);
  const T y = k >= m ? T(1) : T(0);
  // The same BCE formulation as the CPU kernels (group_loss), with the library exp and log.
  const GroupLoss<T> s = group_loss(g.max_lo, g.s_lo, g.max_hi, g.s_hi, y, [](T x) { return ox_exp(x); },
                                    [](T x) { return ox_log(x); });
  auto q_of = [&](int c) {
    return c < m ? ox_exp(z(c) - g.max_lo) * s.a_lo : ox_exp(z(c) - g.max_hi) * s.a_hi;
  };
  // Forward: F_j = cumulative softmax, D_j = F_j - [j >= k].
  T F = T(0), rps = T(0), d_total = T(0);
  for (int c = 0; c < R; ++c) {
    F += q_of(c);
    const T d = F - (c >= k ? T(1) : T(0));
    rps += d * d;
    d_total += d;
  }
  const T loss = s.bce + rps_weight * rps / T(R);
  if (!want_grad) return loss;
  // g_c = (2/R) sum_{j >= c} D_j = (2/R) (d_total - sum_{j < c} D_j); qg = sum_c q_c g_c.
  const T two_r = T(2) / T(R);
  T prefix = T(0), qg = T(0);
  F = T(0);
  for (int c = 0; c < R; ++c) {
    const T q = q_of(c);
    qg += q * two_r * (d_total - prefix);
    F += q;
    prefix += F - (c >= k ? T(1) : T(0));
  }
  const T dl = s.dbce;
  const T inv_lo = s.inv_lo, inv_hi = s.inv_hi;
  prefix = T(0);
  F = T(0);
  for (int c = 0; c <= R; ++c) {
    const T e = c < m ? ox_exp(z(c) - g.max_lo) : ox_exp(z(c) - g.max_hi);
    const T q = e * (c < m ? s.a_lo : s.a_hi);
    const T gc = c < R ? two_r * (d_total - prefix) : T(0);
    const T dbce = c < m ? -e * inv_lo : e * inv_hi;
    store(c, gscale * (rps_weight * q * (gc - qg) + dl * dbce));
    F += q;
    prefix += F - (c >= k ? T(1) : T(0));
  }
  return loss;
}

}  // namespace
}  // namespace orcal
