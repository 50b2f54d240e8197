// The CPU block kernels, in structure-of-arrays form: a block of kBlock voxels of one image is processed one
// channel plane at a time (channels outside, voxels inside), so every inner loop is a fixed-length,
// branch-free loop over contiguous voxels that the compiler vectorises (exp/log through libmvec).
//
// This file is included by kernels_base.cpp and kernels_avx2.cpp with ORCAL_ISA naming the namespace; each
// includes it under its own target options. The scalar math comes from csrc/common/ordinal_math.h (shared
// with CUDA); only the loop nesting differs from the one-voxel-at-a-time CUDA formulation, which is why the
// pass structure of voxel_loss() is repeated here with voxels innermost.
//
// Only C functions and this file's own code are used inside: no std:: or ATen templates, whose instances
// would be merged by the linker across the per-ISA translation units.

#ifndef ORCAL_ISA
#error "define ORCAL_ISA before including kernels_impl.h"
#endif

#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "../common/ordinal_math.h"
#include "../common/stats_layout.h"
#include "kernels.h"

namespace orcal {
namespace cpu {
namespace ORCAL_ISA {
namespace {

constexpr int NB = static_cast<int>(kBlock);

// Per-thread scratch: logits of one block (C planes), one more plane set for the RPS pass, per-voxel arrays.
template <typename T>
struct Scratch {
  T* e;  // (C, NB): logits, then exponentials
  T* d;  // (C, NB): RPS differences, then their reverse cumulative sums
  void* mem;
  explicit Scratch(int64_t C) {
    const size_t bytes = sizeof(T) * static_cast<size_t>(2 * C * NB);
    mem = aligned_or_throw(bytes);
    e = static_cast<T*>(mem);
    d = e + C * NB;
  }
  ~Scratch() { std::free(mem); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
};

// Per-voxel results of the grouped softmax of one block.
template <typename T>
struct Groups {
  alignas(64) T max_lo[NB];
  alignas(64) T max_hi[NB];
  alignas(64) T s_lo[NB];
  alignas(64) T s_hi[NB];
  alignas(64) T a_lo[NB];
  alignas(64) T a_hi[NB];
  alignas(64) T l[NB];
};

// Load n voxels of each of the C channel planes (stride V) into e as T; the tail of the block is zero.
template <typename scalar_t, typename T>
inline void load_planes(const scalar_t* __restrict__ z, int64_t V, int64_t n, int C, T* __restrict__ e) {
  for (int c = 0; c < C; ++c) {
    const scalar_t* __restrict__ zc = z + c * V;
    T* __restrict__ ec = e + c * NB;
    for (int64_t v = 0; v < n; ++v) ec[v] = static_cast<T>(zc[v]);
    for (int64_t v = n; v < NB; ++v) ec[v] = T(0);
  }
}

// Group maxima, e <- exp(z - group max), group sums, and their combination (ordinal_math.h).
template <typename T>
inline void grouped_softmax(T* __restrict__ e, int R, int m, Groups<T>& g) {
  T* __restrict__ mlo = g.max_lo;
  T* __restrict__ mhi = g.max_hi;
  for (int v = 0; v < NB; ++v) mlo[v] = e[v];
  for (int c = 1; c < m; ++c) {
    const T* __restrict__ ec = e + c * NB;
    for (int v = 0; v < NB; ++v) mlo[v] = ox_max(mlo[v], ec[v]);
  }
  for (int v = 0; v < NB; ++v) mhi[v] = e[m * NB + v];
  for (int c = m + 1; c <= R; ++c) {
    const T* __restrict__ ec = e + c * NB;
    for (int v = 0; v < NB; ++v) mhi[v] = ox_max(mhi[v], ec[v]);
  }
  for (int v = 0; v < NB; ++v) {  // +-inf logits: see finite_or_zero
    mlo[v] = finite_or_zero(mlo[v]);
    mhi[v] = finite_or_zero(mhi[v]);
  }
  T* __restrict__ slo = g.s_lo;
  T* __restrict__ shi = g.s_hi;
  for (int v = 0; v < NB; ++v) slo[v] = T(0);
  for (int v = 0; v < NB; ++v) shi[v] = T(0);
  for (int c = 0; c < m; ++c) {
    T* __restrict__ ec = e + c * NB;
    for (int v = 0; v < NB; ++v) {
      const T x = ox_exp(ec[v] - mlo[v]);
      ec[v] = x;
      slo[v] += x;
    }
  }
  for (int c = m; c <= R; ++c) {
    T* __restrict__ ec = e + c * NB;
    for (int v = 0; v < NB; ++v) {
      const T x = ox_exp(ec[v] - mhi[v]);
      ec[v] = x;
      shi[v] += x;
    }
  }
  T* __restrict__ alo = g.a_lo;
  T* __restrict__ ahi = g.a_hi;
  T* __restrict__ lg = g.l;
  for (int v = 0; v < NB; ++v) {
    const GroupSoftmax<T> s = combine_groups(mlo[v], slo[v], mhi[v], shi[v]);
    alo[v] = s.a_lo;
    ahi[v] = s.a_hi;
    lg[v] = s.l;
  }
}

// Foreground probability of a loaded block (readout 0 majority, 1 expected) into p.
template <typename T>
inline void readout_block(T* __restrict__ e, int R, int m, int readout, Groups<T>& g, T* __restrict__ p) {
  // +inf logits of the expected readout (expected_inf_limit), counted before e is overwritten.
  alignas(64) T n_inf[NB], inf_level[NB];
  if (readout != 0) {
    const T pinf = static_cast<T>(INFINITY);
    for (int v = 0; v < NB; ++v) n_inf[v] = inf_level[v] = T(0);
    for (int c = 0; c <= R; ++c) {
      const T* __restrict__ ec = e + c * NB;
      const T level = static_cast<T>(c);
      for (int v = 0; v < NB; ++v) {
        n_inf[v] += ec[v] == pinf ? T(1) : (ec[v] != ec[v] ? T(2) : T(0));  // NaN: no limit
        inf_level[v] += ec[v] == pinf ? level : T(0);
      }
    }
  }
  grouped_softmax(e, R, m, g);
  if (readout == 0) {
    for (int v = 0; v < NB; ++v) p[v] = sigmoid(g.l[v]);
    return;
  }
  for (int v = 0; v < NB; ++v) p[v] = T(0);
  for (int c = 1; c <= R; ++c) {
    const T* __restrict__ ec = e + c * NB;
    const T* __restrict__ ac = c < m ? g.a_lo : g.a_hi;
    const T level = static_cast<T>(c);
    for (int v = 0; v < NB; ++v) p[v] += level * (ec[v] * ac[v]);
  }
  const T inv_r = T(1) / static_cast<T>(R);
  for (int v = 0; v < NB; ++v) {  // rounding can carry it just past 1 on confident voxels; NaN stays NaN
    const T x = p[v] * inv_r;
    p[v] = expected_inf_limit(x > T(1) ? T(1) : x, n_inf[v], inf_level[v], static_cast<T>(R));
  }
}

// --- ordinal loss --------------------------------------------------------------------------------------

// exp for the loss kernel, inlined so its loops vectorise without a library call. float: Cody-Waite range
// reduction x = n ln2 + r (|r| <= ln2/2) and a degree-6 polynomial, within 2 ulp of expf; exactly 0 below
// -87 (where expf is denormal or 0). Only called with x <= 0; NaN passes through. double: libm/libmvec.
inline float loss_exp(float x) {
  const float xc = x < -87.0f ? -87.0f : x;
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float n = (xc * 1.44269504088896341f + magic) - magic;
  const float r = (xc - n * 0.693359375f) + n * 2.12194440e-4f;  // ln2 split in two parts
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const float scale = __builtin_bit_cast(float, (static_cast<int32_t>(n) + 127) << 23);
  const float res = p * scale;
  return x < -87.0f ? 0.0f : res;  // a NaN x stays NaN through p
}
inline double loss_exp(double x) { return ox_exp(x); }

// Writes n gradient values of a block. A full, 64-byte aligned float block goes out with streaming stores
// under AVX-512 (ORCAL_ISA_AVX512, set by kernels_avx512.cpp): the gradient is written once and not read
// back by this pass, so its cache lines need not be read in first.
template <typename scalar_t, typename T>
inline void store_grad(scalar_t* __restrict__ gp, const T* __restrict__ o, int64_t n) {
#ifdef ORCAL_ISA_AVX512
  if constexpr (sizeof(scalar_t) == 4 && sizeof(T) == 4) {
    if (n == NB && (reinterpret_cast<uintptr_t>(gp) & 63) == 0) {
      float* g = reinterpret_cast<float*>(gp);
      for (int v = 0; v < NB; v += 16) _mm512_stream_ps(g + v, _mm512_load_ps(o + v));
      return;
    }
  }
#endif
  for (int64_t v = 0; v < n; ++v) gp[v] = static_cast<scalar_t>(o[v]);
}

// Per-voxel arrays of one block of the loss kernel (kept together so that they stay in L1).
template <typename T>
struct LossBlock {
  alignas(64) T kf[NB], ok[NB], max_lo[NB], max_hi[NB], s_lo[NB], s_hi[NB];
  alignas(64) T A_lo[NB], A_hi[NB], B_lo[NB], B_hi[NB], a_lo[NB], a_hi[NB];
  alignas(64) T F[NB], P[NB], rps[NB], qp[NB], dg[NB], loss[NB], out[NB];
};

// Loads a block's logits into e (C planes, the tail zero) and takes both group maxima on the way.
template <typename scalar_t, typename T>
inline void load_with_max(const scalar_t* __restrict__ z, int64_t V, int64_t n, int R, int m, T* __restrict__ e,
                          T* __restrict__ mlo, T* __restrict__ mhi) {
  if (n < NB) {
    load_planes<scalar_t, T>(z, V, n, R + 1, e);
    for (int v = 0; v < NB; ++v) mlo[v] = e[v];
    for (int c = 1; c < m; ++c)
      for (int v = 0; v < NB; ++v) mlo[v] = ox_max(mlo[v], e[c * NB + v]);
    for (int v = 0; v < NB; ++v) mhi[v] = e[m * NB + v];
    for (int c = m + 1; c <= R; ++c)
      for (int v = 0; v < NB; ++v) mhi[v] = ox_max(mhi[v], e[c * NB + v]);
    return;
  }
  for (int c = 0; c <= R; ++c) {
    const scalar_t* __restrict__ zc = z + c * V;
    T* __restrict__ ec = e + c * NB;
    T* __restrict__ mx = c < m ? mlo : mhi;
    if (c == 0 || c == m) {
      for (int v = 0; v < NB; ++v) {
        const T x = static_cast<T>(zc[v]);
        ec[v] = x;
        mx[v] = x;
      }
    } else {
      for (int v = 0; v < NB; ++v) {
        const T x = static_cast<T>(zc[v]);
        ec[v] = x;
        mx[v] = ox_max(mx[v], x);
      }
    }
  }
}

// Four passes over a block's channel planes: load + group maxima; exponentials + group sums; the forward
// cumulative sums (F_j, D_j, the prefix sums of D and sum_j q_j * prefix_j, which give every suffix sum of
// the gradient without a backward pass); and the gradient. g_c = (2/R) sum_{j >= c} D_j = (2/R)(D - P_c)
// with D the total and P_c the prefix before c; qg = sum_c q_c g_c = (2/R)(D F_{R-1} - sum_c q_c P_c).
template <typename scalar_t, typename T>
bool loss_blocks(const LossArgs& a, int64_t blk0, int64_t blk1) {
  const int R = static_cast<int>(a.R), m = static_cast<int>(a.m), C = R + 1;
  const int64_t V = a.V;
  const scalar_t* Z = static_cast<const scalar_t*>(a.logits);
  scalar_t* G = static_cast<scalar_t*>(a.grad);
  T* L = static_cast<T*>(a.loss_map);
  const T w = static_cast<T>(a.rps_weight), scale = static_cast<T>(a.grad_scale);
  const T inv_r = T(1) / static_cast<T>(R), two_r = T(2) / static_cast<T>(R);
  const T mf = static_cast<T>(m);
  Scratch<T> s(C);
  T* __restrict__ e = s.e;
  T* __restrict__ d = s.d;  // two_r * prefix of D before each level
  void* blk_mem = aligned_or_throw(sizeof(LossBlock<T>));
  LossBlock<T>& lb = *static_cast<LossBlock<T>*>(blk_mem);
  T* __restrict__ kf = lb.kf;
  T* __restrict__ ok = lb.ok;
  T* __restrict__ mlo = lb.max_lo;
  T* __restrict__ mhi = lb.max_hi;
  T* __restrict__ slo = lb.s_lo;
  T* __restrict__ shi = lb.s_hi;
  T* __restrict__ F = lb.F;
  T* __restrict__ P = lb.P;
  T* __restrict__ rps = lb.rps;
  T* __restrict__ qp = lb.qp;
  T* __restrict__ dg = lb.dg;
  T* __restrict__ loss = lb.loss;
  T* __restrict__ out = lb.out;
  bool bad = false;
  for (int64_t blk = blk0; blk < blk1; ++blk) {
    const int64_t b = blk / a.blocks_per_image, v0 = (blk % a.blocks_per_image) * NB;
    const int64_t n = V - v0 < NB ? V - v0 : NB;
    if (n == NB && v0 + 3 * NB <= V) {  // the block after next: eight 64-byte lines per channel plane
      const char* nz = reinterpret_cast<const char*>(Z + b * C * V + v0 + 2 * NB);
      for (int c = 0; c < C; ++c)
        for (int j = 0; j < NB * static_cast<int>(sizeof(scalar_t)); j += 64)
          __builtin_prefetch(nz + static_cast<int64_t>(c) * V * static_cast<int64_t>(sizeof(scalar_t)) + j);
    }
    load_with_max<scalar_t, T>(Z + b * C * V + v0, V, n, R, m, e, mlo, mhi);
    const uint8_t* __restrict__ kp = a.k + b * V + v0;
    uint8_t kmax = 0;
    for (int64_t v = 0; v < n; ++v) {
      kmax = kp[v] > kmax ? kp[v] : kmax;
      kf[v] = static_cast<T>(kp[v]);
    }
    for (int64_t v = n; v < NB; ++v) kf[v] = T(0);
    bad |= kmax > R;
    if (a.valid != nullptr) {
      const bool* __restrict__ vp = a.valid + b * V + v0;
      for (int64_t v = 0; v < n; ++v) ok[v] = vp[v] ? T(1) : T(0);
    } else {
      for (int64_t v = 0; v < n; ++v) ok[v] = T(1);
    }
    for (int64_t v = n; v < NB; ++v) ok[v] = T(0);

    // Exponentials against the group maxima, and the group sums.
    for (int v = 0; v < NB; ++v) slo[v] = T(0);
    for (int v = 0; v < NB; ++v) shi[v] = T(0);
    for (int c = 0; c <= R; ++c) {
      T* __restrict__ ec = e + c * NB;
      const T* __restrict__ mx = c < m ? mlo : mhi;
      T* __restrict__ sg = c < m ? slo : shi;
      for (int v = 0; v < NB; ++v) {
        const T x = loss_exp(ec[v] - mx[v]);
        ec[v] = x;
        sg[v] += x;
      }
    }
    // Per voxel: softmax scales, BCE and its gradient factors; ok becomes the gradient scale (0 if invalid).
    for (int v = 0; v < NB; ++v) {
      const T y = kf[v] >= mf ? T(1) : T(0);
      const GroupLoss<T> gl = group_loss(
          mlo[v], slo[v], mhi[v], shi[v], y, [](T x) { return loss_exp(x); }, [](T x) { return ox_log(x); });
      lb.a_lo[v] = gl.a_lo;
      lb.a_hi[v] = gl.a_hi;
      const T sc = ok[v] != T(0) ? scale : T(0);
      lb.A_lo[v] = sc * w * gl.a_lo;
      lb.A_hi[v] = sc * w * gl.a_hi;
      lb.B_lo[v] = -(sc * gl.dbce * gl.inv_lo);
      lb.B_hi[v] = sc * gl.dbce * gl.inv_hi;
      loss[v] = gl.bce;
      F[v] = T(0);
      P[v] = T(0);
      rps[v] = T(0);
      qp[v] = T(0);
    }
    // Forward: F_j, D_j = F_j - [j >= k], their prefix sums P (stored scaled per level) and sum_j q_j P_j.
    for (int c = 0; c < R; ++c) {
      const T* __restrict__ ec = e + c * NB;
      const T* __restrict__ ac = c < m ? lb.a_lo : lb.a_hi;
      T* __restrict__ dc = d + c * NB;
      const T level = static_cast<T>(c);
      for (int v = 0; v < NB; ++v) {
        const T q = ec[v] * ac[v];
        qp[v] += q * P[v];
        dc[v] = two_r * P[v];
        F[v] += q;
        const T diff = F[v] - (level >= kf[v] ? T(1) : T(0));
        rps[v] += diff * diff;
        P[v] += diff;
      }
    }
    for (int v = 0; v < NB; ++v) loss[v] = ok[v] != T(0) ? loss[v] + w * rps[v] * inv_r : T(0);
    // Eight double lanes (a fixed order, so the block sum does not depend on the thread count); the tail
    // of the block holds zeros.
    double lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int j = 0; j < NB; j += 8)
      for (int l = 0; l < 8; ++l) lane[l] += static_cast<double>(loss[j + l]);
    a.partials[blk] = ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
    if (L != nullptr) {
      T* __restrict__ lp = L + b * V + v0;
      for (int64_t v = 0; v < n; ++v) lp[v] = loss[v];
    }
    if (G == nullptr) continue;

    // Gradient: g_c - qg = (2/R)(D - P_c) - qg = dg - d_c; the last level has g_R = 0.
    for (int v = 0; v < NB; ++v) {
      const T qg = two_r * (P[v] * F[v] - qp[v]);
      dg[v] = two_r * P[v] - qg;
      qp[v] = -qg;
    }
    for (int c = 0; c <= R; ++c) {
      const T* __restrict__ ec = e + c * NB;
      const T* __restrict__ Ac = c < m ? lb.A_lo : lb.A_hi;
      const T* __restrict__ Bc = c < m ? lb.B_lo : lb.B_hi;
      const T* __restrict__ dc = d + c * NB;
      scalar_t* __restrict__ gp = G + (b * C + c) * V + v0;
      T* __restrict__ o = out;
      if (c < R) {
        for (int v = 0; v < NB; ++v) {
          const T val = ec[v] * (Ac[v] * (dg[v] - dc[v]) + Bc[v]);
          o[v] = ok[v] != T(0) ? val : T(0);
        }
      } else {
        for (int v = 0; v < NB; ++v) {
          const T val = ec[v] * (Ac[v] * qp[v] + Bc[v]);
          o[v] = ok[v] != T(0) ? val : T(0);
        }
      }
      store_grad<scalar_t, T>(gp, o, n);
    }
  }
#ifdef ORCAL_ISA_AVX512
  _mm_sfence();  // order the streaming stores before the op returns
#endif
  std::free(blk_mem);
  return bad;
}

// --- foreground probability ----------------------------------------------------------------------------

template <typename scalar_t, typename T>
void readout_blocks(const ReadoutArgs& a, int64_t blk0, int64_t blk1) {
  const int R = static_cast<int>(a.R), m = static_cast<int>(a.m), C = R + 1;
  const int64_t V = a.V;
  const scalar_t* Z = static_cast<const scalar_t*>(a.logits);
  scalar_t* P = static_cast<scalar_t*>(a.out);
  Scratch<T> s(C);
  Groups<T> g;
  alignas(64) T p[NB];
  for (int64_t blk = blk0; blk < blk1; ++blk) {
    const int64_t b = blk / a.blocks_per_image, v0 = (blk % a.blocks_per_image) * NB;
    const int64_t n = V - v0 < NB ? V - v0 : NB;
    load_planes<scalar_t, T>(Z + b * C * V + v0, V, n, C, s.e);
    readout_block(s.e, R, m, a.readout, g, p);
    scalar_t* __restrict__ out = P + b * V + v0;
    for (int64_t v = 0; v < n; ++v) out[v] = static_cast<scalar_t>(p[v]);
  }
}

// --- calibration statistics ----------------------------------------------------------------------------

template <typename scalar_t, typename T>
void stats_chunks(const StatsArgs& a, int64_t ch0, int64_t ch1, int64_t* counts, double* chunk_sums,
                  StatsErrors* err) {
  const int R = static_cast<int>(a.R), m = static_cast<int>(a.m);
  const int C = a.kind == 2 ? R + 1 : 1;
  const int64_t V = a.V, nb = a.n_bins, tb = a.auc_bins;
  const StatsLayout lay{nb, tb};
  const scalar_t* X = static_cast<const scalar_t*>(a.pred);
  Scratch<T> s(C);
  Groups<T> g;
  // Chunk-local histograms. A voxel adds (R << 32) | k to one ECE bin and one AUC bin: pairs in the high
  // half, positive pairs in the low half (a chunk holds at most kChunk * 255 < 2^32 of either), so each
  // histogram costs one scattered add per voxel; they are unpacked into the int64 row after the chunk.
  void* mem = aligned_or_throw(static_cast<size_t>((4 * nb + tb) * 8 + 4 * nb * 8));
  uint64_t* ece_pk = static_cast<uint64_t*>(mem);  // 4 interleaved copies
  uint64_t* auc_pk = ece_pk + 4 * nb;
  double* s_bin = reinterpret_cast<double*>(auc_pk + tb);  // 4 interleaved copies
  alignas(64) T p[NB], br[NB], nl[NB];
  alignas(64) int32_t kk[NB], bi[NB], ti[NB], use[NB], fg_y[NB], fg_n[NB], bg_y[NB];
  alignas(64) uint64_t pk[NB];
  alignas(64) double rp[NB];
  const T Rf = static_cast<T>(R);
  const T half = static_cast<T>(0.5);
  const uint64_t r_hi = static_cast<uint64_t>(R) << 32;
  for (int64_t ch = ch0; ch < ch1; ++ch) {
    const int64_t b = ch / a.chunks_per_image;
    const int64_t vstart = (ch % a.chunks_per_image) * kChunk;
    const int64_t vend = vstart + kChunk < V ? vstart + kChunk : V;
    int64_t* __restrict__ row = counts + b * a.count_cols;
    double* __restrict__ srow = chunk_sums + ch * a.sum_cols;
    std::memset(ece_pk, 0, static_cast<size_t>(4 * nb + tb) * 8);
    for (int64_t j = 0; j < 4 * nb; ++j) s_bin[j] = 0;
    double brier_lane[8] = {0, 0, 0, 0, 0, 0, 0, 0}, nll_lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int32_t tp = 0, fp = 0, fn = 0;
    for (int64_t v0 = vstart; v0 < vend; v0 += NB) {
      const int64_t n = vend - v0 < NB ? vend - v0 : NB;
      // Probability of each voxel.
      if (a.kind == 2) {
        load_planes<scalar_t, T>(X + b * C * V + v0, V, n, C, s.e);
        readout_block(s.e, R, m, a.readout, g, p);
      } else {
        const scalar_t* __restrict__ xp = X + b * V + v0;
        for (int64_t v = 0; v < n; ++v) p[v] = static_cast<T>(xp[v]);
        for (int64_t v = n; v < NB; ++v) p[v] = T(0);
        if (a.kind == 1) {
          for (int v = 0; v < NB; ++v) p[v] = sigmoid(p[v]);
        }
      }
      // Votes of each voxel, counted from the masks when given.
      if (a.target_is_masks) {
        for (int v = 0; v < NB; ++v) kk[v] = 0;
        uint8_t any = 0;
        for (int r = 0; r < R; ++r) {
          const uint8_t* __restrict__ mp = a.target + (b * R + r) * V + v0;
          for (int64_t v = 0; v < n; ++v) {
            kk[v] += mp[v];
            any |= mp[v];
          }
        }
        if (any > 1) err->mask_not_binary = true;
      } else {
        const uint8_t* __restrict__ kp = a.target + b * V + v0;
        int32_t kmax = 0;
        for (int64_t v = 0; v < n; ++v) {
          kk[v] = kp[v];
          kmax = kk[v] > kmax ? kk[v] : kmax;
        }
        for (int64_t v = n; v < NB; ++v) kk[v] = 0;
        if (kmax > R) err->k_too_large = true;
      }
      if (a.valid != nullptr) {
        const bool* __restrict__ vp = a.valid + b * V + v0;
        for (int64_t v = 0; v < n; ++v) use[v] = vp[v] ? 1 : 0;
      } else {
        for (int64_t v = 0; v < n; ++v) use[v] = 1;
      }
      for (int64_t v = n; v < NB; ++v) use[v] = 0;
      // Everything per voxel, vectorised. A voxel that does not count adds zeros to bin 0; a probability
      // outside [0, 1] where it counts is flagged by use = 2 and reported after the block.
      int32_t any_bad = 0;
      for (int v = 0; v < NB; ++v) {
        const bool in_range = p[v] >= T(0) && p[v] <= T(1);
        const bool bad = use[v] != 0 && !in_range;
        any_bad |= bad ? 1 : 0;
        const bool counts_here = use[v] != 0 && in_range;
        use[v] = bad ? 2 : use[v];
        const T pp = counts_here ? p[v] : T(0);
        const int32_t k = counts_here ? kk[v] : 0;
        bi[v] = static_cast<int32_t>(bin_index(pp, nb));
        ti[v] = static_cast<int32_t>(bin_index(pp, tb));
        pk[v] = counts_here ? (r_hi | static_cast<uint64_t>(k)) : uint64_t(0);
        rp[v] = static_cast<double>(counts_here ? Rf : T(0)) * static_cast<double>(pp);
        const T kv = static_cast<T>(k);
        br[v] = counts_here ? brier_voxel(pp, kv, Rf) : T(0);
        nl[v] = counts_here ? nll_voxel(pp, kv, Rf) : T(0);
        const bool fg = pp >= half, y = k >= m;
        fg_y[v] = counts_here && fg && y;
        fg_n[v] = counts_here && fg && !y;
        bg_y[v] = counts_here && !fg && y;
      }
      for (int j = 0; j < NB; j += 8) {
        for (int l = 0; l < 8; ++l) {
          brier_lane[l] += static_cast<double>(br[j + l]);
          nll_lane[l] += static_cast<double>(nl[j + l]);
        }
      }
      for (int v = 0; v < NB; ++v) {
        tp += fg_y[v];
        fp += fg_n[v];
        fn += bg_y[v];
      }
      // The histograms: scattered adds (the only scalar loop). Neighbouring voxels often share an ECE bin, so
      // four interleaved copies of the ECE histograms keep four independent add chains in flight. The block
      // tail holds zeros (added to bin 0), so the loop always runs over the whole block.
      for (int v = 0; v < NB; v += 4) {
        for (int l = 0; l < 4; ++l) {
          ece_pk[l * nb + bi[v + l]] += pk[v + l];
          s_bin[l * nb + bi[v + l]] += rp[v + l];
          auc_pk[ti[v + l]] += pk[v + l];
        }
      }
      if (any_bad) {
        for (int64_t v = 0; v < n; ++v) {
          if (use[v] != 2) continue;
          ++err->bad_count;
          if (b * V + v0 + v < err->first_bad_index) {
            err->first_bad_index = b * V + v0 + v;
            err->first_bad_value = static_cast<double>(p[v]);
          }
        }
      }
    }
    const uint64_t low = 0xffffffffULL;
    for (int64_t j = 0; j < nb; ++j) {
      const uint64_t e = ece_pk[j] + ece_pk[nb + j] + ece_pk[2 * nb + j] + ece_pk[3 * nb + j];
      row[lay.n() + j] += static_cast<int64_t>(e >> 32);
      row[lay.a() + j] += static_cast<int64_t>(e & low);
      srow[lay.s() + j] = (s_bin[j] + s_bin[nb + j]) + (s_bin[2 * nb + j] + s_bin[3 * nb + j]);
    }
    for (int64_t j = 0; j < tb; ++j) {
      const int64_t pairs = static_cast<int64_t>(auc_pk[j] >> 32), pos = static_cast<int64_t>(auc_pk[j] & low);
      row[lay.pos() + j] += pos;
      row[lay.neg() + j] += pairs - pos;
    }
    double brier = 0, nll = 0;
    for (int l = 0; l < 8; ++l) {
      brier += brier_lane[l];
      nll += nll_lane[l];
    }
    srow[lay.brier()] = brier;
    srow[lay.nll()] = nll;
    row[lay.tp()] += tp;
    row[lay.fp()] += fp;
    row[lay.fn()] += fn;
  }
  std::free(mem);
}

// --- type dispatch ---------------------------------------------------------------------------------------

bool loss_entry(const LossArgs& a, int64_t b0, int64_t b1) {
  switch (a.dtype) {
    case Dtype::f32: return loss_blocks<float, float>(a, b0, b1);
    case Dtype::f16: return loss_blocks<c10::Half, float>(a, b0, b1);
    case Dtype::bf16: return loss_blocks<c10::BFloat16, float>(a, b0, b1);
    case Dtype::f64: return loss_blocks<double, double>(a, b0, b1);
  }
  return false;
}

void stats_entry(const StatsArgs& a, int64_t c0, int64_t c1, int64_t* counts, double* sums, StatsErrors* err) {
  switch (a.dtype) {
    case Dtype::f32: return stats_chunks<float, float>(a, c0, c1, counts, sums, err);
    case Dtype::f16: return stats_chunks<c10::Half, float>(a, c0, c1, counts, sums, err);
    case Dtype::bf16: return stats_chunks<c10::BFloat16, float>(a, c0, c1, counts, sums, err);
    case Dtype::f64: return stats_chunks<double, double>(a, c0, c1, counts, sums, err);
  }
}

void readout_entry(const ReadoutArgs& a, int64_t b0, int64_t b1) {
  switch (a.dtype) {
    case Dtype::f32: return readout_blocks<float, float>(a, b0, b1);
    case Dtype::f16: return readout_blocks<c10::Half, float>(a, b0, b1);
    case Dtype::bf16: return readout_blocks<c10::BFloat16, float>(a, b0, b1);
    case Dtype::f64: return readout_blocks<double, double>(a, b0, b1);
  }
}

}  // namespace
}  // namespace ORCAL_ISA
}  // namespace cpu
}  // namespace orcal
