// masked_cross_attention on the CPU, flash-attention style: the (Lq, Lk) scores of a head are
// never materialized beyond one (query tile x key tile) block; the forward runs an online
// softmax and saves the log-sum-exp, the backward recomputes the probabilities from it
// (FlashAttention-2). The math is csrc/include/robustmm/masked_attention.h.
//
// Skipping absent modalities: the kept keys of each sample (key_keep[b, j]) are listed once per
// call, in key order, and every kernel walks that list in tiles of at most kBlockN keys. Keys
// that are not kept are never read (their k, v may hold NaN) and cost nothing: a sample with a
// third of its keys kept does a third of the work. Their dk, dv are written as 0.
//
// Layouts (per tile, in the accumulation type acc_t: float, or double for double inputs; fp16
// and bf16 are converted while packing). The softmax runs along the key axis, so the scores are
// held transposed, keys x queries, with the queries in the vector lanes: the running max, sum
// and log-sum-exp are per-lane vectors and the softmax needs no horizontal reductions.
//   qt  (d, Mp)    c * q of the query tile, transposed; lanes >= M are 0   (Mp = M rounded up to 8)
//   kp  (N, dp)    the tile's kept keys' rows; vp the same for v          (dp = d rounded up to 8)
//   s   (N, Mp)    s^T = kp . qt, then p^T in place
//   o   (M, dp)    the running output of the query tile
// c = scale, times log2(e) on the AVX2 float path, whose scores are in log2 units so that its
// exponential is a bare exp2 (exp2_avx2); lse is converted back to natural units.
// Every product is one kernel: C (rows, lanes) (+)= A (rows, T) . B (T, lanes), A read by
// broadcasts through two strides, B and C row-major with a multiple of 8 lanes. On AVX2+FMA
// machines the float kernel keeps a register tile of 12 accumulators (3 rows x 4 vectors of 8
// lanes, 4 x 3, 6 x 2 or 8 x 1) and runs at about 90% of the FMA peak on L1-resident tiles; the
// baseline ISA and double use a loop gcc vectorizes.
//
// Parallelism: tasks handed out in chunks from an atomic counter on the at::parallel_for
// threads (TaskQueue), so samples with more kept keys, or a preempted thread, do not leave the
// others idle. The forward's tasks are (b, h, query tile). The backward's are (b, h) when there
// are at least 4 per thread (each task owns its head's dq, dk and dv rows: no races and no
// reduction; dq accumulates in the task's scratch), else two passes: dk, dv over
// (b, h, key tile), then dq over (b, h, query tile), each recomputing the probabilities of its
// tiles.
//
// Dropout: the factor Z / (1 - p) of element (b, h, i, j) is regenerated from (seed, flat index)
// by Philox (the same stream as the reference), 16 counters at a time on AVX2, along each query
// row's kept keys and then transposed into the tile's lanes.
//
// ROBUSTMM_CPU_CAPABILITY=default forces the baseline copy of the kernels.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

#include "robustmm/checks.h"
#include "robustmm/cpu_capability.h"
#include "robustmm/masked_attention.h"
#include "robustmm/masked_attention_inputs.h"
#include "robustmm/math.h"
#include "robustmm/philox.h"
#include "vec_avx2.h"

namespace robustmm {
namespace cpu {
namespace {

constexpr int64_t kBlockM = 64;   // query rows per tile (the vector lanes of the scores)
constexpr int64_t kBlockN = 128;  // kept keys per tile, at most (tiles are balanced)

inline int64_t round8(int64_t n) { return (n + 7) & ~int64_t(7); }

// The AVX2 float path keeps scores in log2 units (its exponential is exp2_avx2): q is packed
// times scale * log2(e) and lse converts at the boundary. The other paths use natural units.
template <bool AVX2, typename acc_t>
constexpr bool kLog2Scores = AVX2 && std::is_same_v<acc_t, float>;
constexpr double kLog2e = 1.4426950408889634;
constexpr double kLn2 = 0.6931471805599453;

inline int64_t num_tiles(int64_t n, int64_t block) { return (n + block - 1) / block; }
// Start of tile t of nt balanced tiles over [0, n).
inline int64_t tile_begin(int64_t t, int64_t n, int64_t nt) { return t * n / nt; }
// How many of the sorted keys[0, n) are <= last.
inline int64_t kept_upto(const int32_t* keys, int64_t n, int64_t last) {
  return std::upper_bound(keys, keys + n, last) - keys;
}

template <typename scalar_t>
struct ForwardArgs {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* q;     // (B, H, Lq, d)
  const scalar_t* k;     // (B, H, Lk, d)
  const scalar_t* v;     // (B, H, Lk, d)
  const int32_t* keys;   // (B, key_stride): sample b's kept keys in key order (stride 0: shared)
  const int64_t* kept;   // (B,): how many keys sample b keeps
  scalar_t* out;         // (B, H, Lq, d)
  acc_t* lse;            // (B, H, Lq)
  int64_t key_stride;
  int64_t heads, lq, lk, dim;
  bool causal;
  float dropout_p;       // 0: no dropout
  acc_t inv_keep;        // 1 / (1 - dropout_p)
  acc_t scale;
  uint64_t seed;
};

template <typename scalar_t>
struct BackwardArgs {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* grad_out;  // (B, H, Lq, d)
  const scalar_t* q;         // (B, H, Lq, d)
  const scalar_t* k;         // (B, H, Lk, d)
  const scalar_t* v;         // (B, H, Lk, d)
  const scalar_t* out;       // (B, H, Lq, d): the forward's output
  const acc_t* lse;          // (B, H, Lq): the forward's log-sum-exp
  const int32_t* keys;       // (B, key_stride), as ForwardArgs
  const int64_t* kept;       // (B,)
  scalar_t* dq;              // (B, H, Lq, d)
  scalar_t* dk;              // (B, H, Lk, d)
  scalar_t* dv;              // (B, H, Lk, d)
  int64_t key_stride;
  int64_t heads, lq, lk, dim;
  bool causal;
  float dropout_p;
  acc_t inv_keep;
  acc_t scale;
  uint64_t seed;
};

// ---------------------------------------------------------------------------------------------
// The tile product C (rows, lanes) (+)= A (rows, T) . B (T, lanes), A(r, t) = A[r * sar + t * sat],
// B[t * ldb + l], C[r * ldc + l]; lanes a multiple of 8.

template <typename acc_t>
RMM_ALWAYS_INLINE void gemm_generic(int64_t rows, int64_t lanes, int64_t T, const acc_t* A,
                                    int64_t sar, int64_t sat, const acc_t* B, int64_t ldb,
                                    acc_t* C, int64_t ldc, bool acc) {
  for (int64_t r = 0; r < rows; ++r) {
    acc_t* __restrict c = C + r * ldc;
    if (!acc) std::fill_n(c, lanes, acc_t(0));
    const acc_t* a = A + r * sar;
    for (int64_t t = 0; t < T; ++t) {
      const acc_t av = a[t * sat];
      const acc_t* __restrict b = B + t * ldb;
      for (int64_t l = 0; l < lanes; ++l) c[l] += av * b[l];
    }
  }
}

#if RMM_HAS_AVX2_CLONES
// R rows x V vectors of C in registers; per step t: V loads of B, R broadcasts of A, R*V FMAs.
template <int R, int V>
RMM_AVX2_INLINE void gemm_block_avx2(const float* A, int64_t sar, int64_t sat, const float* B,
                                     int64_t ldb, float* C, int64_t ldc, int64_t T, bool acc) {
  __m256 c[R][V];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) c[r][v] = _mm256_setzero_ps();
  }
  const float* a = A;
  const float* b = B;
  for (int64_t t = 0; t < T; ++t) {
    __m256 bv[V];
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) bv[v] = _mm256_loadu_ps(b + 8 * v);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m256 ar = _mm256_broadcast_ss(a + r * sar);
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) c[r][v] = _mm256_fmadd_ps(ar, bv[v], c[r][v]);
    }
    a += sat;
    b += ldb;
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) {
      float* cp = C + r * ldc + 8 * v;
      const __m256 x = acc ? _mm256_add_ps(c[r][v], _mm256_loadu_ps(cp)) : c[r][v];
      _mm256_storeu_ps(cp, x);
    }
  }
}

// The last `rest` (< R + 1) rows.
template <int R, int V>
RMM_AVX2_INLINE void gemm_tail_avx2(int64_t rest, const float* A, int64_t sar, int64_t sat,
                                    const float* B, int64_t ldb, float* C, int64_t ldc, int64_t T,
                                    bool acc) {
  if constexpr (R > 0) {
    if (rest == R) {
      gemm_block_avx2<R, V>(A, sar, sat, B, ldb, C, ldc, T, acc);
    } else {
      gemm_tail_avx2<R - 1, V>(rest, A, sar, sat, B, ldb, C, ldc, T, acc);
    }
  }
}

template <int V>
RMM_AVX2_INLINE void gemm_rows_avx2(int64_t rows, int64_t T, const float* A, int64_t sar,
                                    int64_t sat, const float* B, int64_t ldb, float* C,
                                    int64_t ldc, bool acc) {
  // 8-12 accumulators (FMA latency x throughput) and at most 16 registers in all
  constexpr int kRows = V == 1 ? 8 : (V == 2 ? 6 : (V == 3 ? 4 : 3));
  int64_t r = 0;
  for (; r + kRows <= rows; r += kRows) {
    gemm_block_avx2<kRows, V>(A + r * sar, sar, sat, B, ldb, C + r * ldc, ldc, T, acc);
  }
  gemm_tail_avx2<kRows - 1, V>(rows - r, A + r * sar, sar, sat, B, ldb, C + r * ldc, ldc, T, acc);
}

RMM_TARGET_AVX2 void gemm_avx2(int64_t rows, int64_t lanes, int64_t T, const float* A,
                               int64_t sar, int64_t sat, const float* B, int64_t ldb, float* C,
                               int64_t ldc, bool acc) {
  const int64_t nv = lanes / 8;
  for (int64_t v0 = 0; v0 < nv;) {
    const int64_t rest = nv - v0;
    const int64_t V = rest >= 4 ? (rest == 5 ? 3 : 4) : rest;  // 5 = 3 + 2, not 4 + 1
    const float* b = B + 8 * v0;
    float* c = C + 8 * v0;
    switch (V) {
      case 4: gemm_rows_avx2<4>(rows, T, A, sar, sat, b, ldb, c, ldc, acc); break;
      case 3: gemm_rows_avx2<3>(rows, T, A, sar, sat, b, ldb, c, ldc, acc); break;
      case 2: gemm_rows_avx2<2>(rows, T, A, sar, sat, b, ldb, c, ldc, acc); break;
      default: gemm_rows_avx2<1>(rows, T, A, sar, sat, b, ldb, c, ldc, acc); break;
    }
    v0 += V;
  }
}
#endif

template <bool AVX2, typename acc_t>
RMM_ALWAYS_INLINE void gemm(int64_t rows, int64_t lanes, int64_t T, const acc_t* A, int64_t sar,
                            int64_t sat, const acc_t* B, int64_t ldb, acc_t* C, int64_t ldc,
                            bool acc) {
#if RMM_HAS_AVX2_CLONES
  if constexpr (AVX2 && std::is_same_v<acc_t, float>) {
    gemm_avx2(rows, lanes, T, A, sar, sat, B, ldb, C, ldc, acc);
    return;
  }
#endif
  gemm_generic(rows, lanes, T, A, sar, sat, B, ldb, C, ldc, acc);
}

// ---------------------------------------------------------------------------------------------
// Causal mask of a scores tile s (n keys, mp query lanes) for queries q0 + l: key j is allowed
// for lane l when j <= q0 + l, so row jj loses its first keys[jj] - q0 lanes.
template <typename acc_t>
RMM_ALWAYS_INLINE void causal_mask(acc_t* s, int64_t n, int64_t mp, const int32_t* keys,
                                   int64_t q0) {
  const acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  for (int64_t jj = 0; jj < n; ++jj) {
    const int64_t masked = std::min<int64_t>(mp, std::max<int64_t>(0, keys[jj] - q0));
    std::fill_n(s + jj * mp, masked, ninf);
  }
}

// Online-softmax step over a scores tile s (n, mp), per lane: m = running max, l = running sum
// of exp(s - m). Writes s = exp(s - m_new) (times z, the dropout factors, when given), the
// rescale factors alpha = exp(m_old - m_new) of the running output, and updates m and l.
// A lane with no allowed key so far keeps m = -inf, and its p and alpha are 0.
template <typename acc_t>
RMM_ALWAYS_INLINE void softmax_step_generic(acc_t* s, int64_t n, int64_t mp, acc_t* m, acc_t* l,
                                            acc_t* alpha, acc_t* m_use, const acc_t* z) {
  const acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  std::copy_n(m, mp, m_use);
  for (int64_t jj = 0; jj < n; ++jj) {
    const acc_t* row = s + jj * mp;
    for (int64_t x = 0; x < mp; ++x) m_use[x] = std::max(m_use[x], row[x]);
  }
  for (int64_t x = 0; x < mp; ++x) {
    const acc_t m_new = m_use[x];
    m_use[x] = m_new == ninf ? acc_t(0) : m_new;
    alpha[x] = exp_f32(m[x] - m_use[x]);
    m[x] = m_new;
    l[x] *= alpha[x];
  }
  for (int64_t jj = 0; jj < n; ++jj) {
    acc_t* row = s + jj * mp;
    for (int64_t x = 0; x < mp; ++x) {
      const acc_t p = exp_f32(row[x] - m_use[x]);
      l[x] += p;
      row[x] = z != nullptr ? p * z[jj * mp + x] : p;
    }
  }
}

// The backward's elementwise step on a tile: p = exp(s - lse) (lse_use = +inf for a lane with
// no key: p = 0), then s <- p * z (the dropped probabilities, for dV) and
// dp <- p * (dp * z - D) (dS), z = 1 without dropout.
template <typename acc_t>
RMM_ALWAYS_INLINE void grad_scores_generic(acc_t* s, acc_t* dp, int64_t n, int64_t mp,
                                           const acc_t* lse_use, const acc_t* dd, const acc_t* z) {
  for (int64_t jj = 0; jj < n; ++jj) {
    acc_t* srow = s + jj * mp;
    acc_t* drow = dp + jj * mp;
    for (int64_t x = 0; x < mp; ++x) {
      const acc_t p = exp_f32(srow[x] - lse_use[x]);
      const acc_t zz = z != nullptr ? z[jj * mp + x] : acc_t(1);
      srow[x] = p * zz;
      drow[x] = p * (drow[x] * zz - dd[x]);
    }
  }
}

#if RMM_HAS_AVX2_CLONES
// 2^x for x <= 127, the exponent of the AVX2 float path (its scores are in log2 units: q is
// packed times scale * log2(e)): 2^n * 2^r with |r| <= 1/2 and Cephes' exp2f polynomial
// (about 1 ulp). x <= -126.5 (-inf included) gives exactly 0; NaN stays NaN.
RMM_AVX2_INLINE __m256 exp2_avx2(__m256 x) {
  const __m256 xc = _mm256_max_ps(_mm256_set1_ps(-127.0f), x);  // NaN: max returns x
  const __m256 n = _mm256_round_ps(xc, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 r = _mm256_sub_ps(xc, n);
  __m256 p = _mm256_set1_ps(1.535336188319500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.339887440266574e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(9.618437357674640e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.550332471162809e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(2.402264791363012e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(6.931472028550421e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  // n = -127 gives the exponent field 0: the factor is +0
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

RMM_TARGET_AVX2 void softmax_step_avx2(float* s, int64_t n, int64_t mp, float* m, float* l,
                                       float* alpha, const float* z) {
  const __m256 ninf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t x = 0; x < mp; x += 8) {
    __m256 mx0 = ninf, mx1 = ninf;
    int64_t jj = 0;
    for (; jj + 2 <= n; jj += 2) {
      mx0 = _mm256_max_ps(mx0, _mm256_loadu_ps(s + jj * mp + x));
      mx1 = _mm256_max_ps(mx1, _mm256_loadu_ps(s + (jj + 1) * mp + x));
    }
    if (jj < n) mx0 = _mm256_max_ps(mx0, _mm256_loadu_ps(s + jj * mp + x));
    const __m256 m_old = _mm256_loadu_ps(m + x);
    const __m256 m_new = _mm256_max_ps(m_old, _mm256_max_ps(mx0, mx1));
    const __m256 m_use = _mm256_andnot_ps(_mm256_cmp_ps(m_new, ninf, _CMP_EQ_OQ), m_new);
    const __m256 al = exp2_avx2(_mm256_sub_ps(m_old, m_use));
    _mm256_storeu_ps(m + x, m_new);
    _mm256_storeu_ps(alpha + x, al);
    __m256 sum0 = _mm256_setzero_ps(), sum1 = _mm256_setzero_ps();
    jj = 0;
    for (; jj + 2 <= n; jj += 2) {
      float* r0 = s + jj * mp + x;
      float* r1 = r0 + mp;
      __m256 p0 = exp2_avx2(_mm256_sub_ps(_mm256_loadu_ps(r0), m_use));
      __m256 p1 = exp2_avx2(_mm256_sub_ps(_mm256_loadu_ps(r1), m_use));
      sum0 = _mm256_add_ps(sum0, p0);
      sum1 = _mm256_add_ps(sum1, p1);
      if (z != nullptr) {
        p0 = _mm256_mul_ps(p0, _mm256_loadu_ps(z + jj * mp + x));
        p1 = _mm256_mul_ps(p1, _mm256_loadu_ps(z + (jj + 1) * mp + x));
      }
      _mm256_storeu_ps(r0, p0);
      _mm256_storeu_ps(r1, p1);
    }
    if (jj < n) {
      float* r0 = s + jj * mp + x;
      __m256 p0 = exp2_avx2(_mm256_sub_ps(_mm256_loadu_ps(r0), m_use));
      sum0 = _mm256_add_ps(sum0, p0);
      if (z != nullptr) p0 = _mm256_mul_ps(p0, _mm256_loadu_ps(z + jj * mp + x));
      _mm256_storeu_ps(r0, p0);
    }
    _mm256_storeu_ps(l + x, _mm256_fmadd_ps(_mm256_loadu_ps(l + x), al, _mm256_add_ps(sum0, sum1)));
  }
}

RMM_TARGET_AVX2 void grad_scores_avx2(float* s, float* dp, int64_t n, int64_t mp,
                                      const float* lse_use, const float* dd, const float* z) {
  for (int64_t jj = 0; jj < n; ++jj) {
    float* srow = s + jj * mp;
    float* drow = dp + jj * mp;
    const float* zrow = z != nullptr ? z + jj * mp : nullptr;
    for (int64_t x = 0; x < mp; x += 8) {
      const __m256 p = exp2_avx2(_mm256_sub_ps(_mm256_loadu_ps(srow + x), _mm256_loadu_ps(lse_use + x)));
      __m256 g = _mm256_loadu_ps(drow + x);
      __m256 pd = p;
      if (zrow != nullptr) {
        const __m256 zz = _mm256_loadu_ps(zrow + x);
        pd = _mm256_mul_ps(p, zz);
        g = _mm256_mul_ps(g, zz);
      }
      _mm256_storeu_ps(srow + x, pd);
      _mm256_storeu_ps(drow + x, _mm256_mul_ps(p, _mm256_sub_ps(g, _mm256_loadu_ps(dd + x))));
    }
  }
}
#endif

template <bool AVX2, typename acc_t>
RMM_ALWAYS_INLINE void softmax_step(acc_t* s, int64_t n, int64_t mp, acc_t* m, acc_t* l,
                                    acc_t* alpha, acc_t* m_use, const acc_t* z) {
#if RMM_HAS_AVX2_CLONES
  if constexpr (AVX2 && std::is_same_v<acc_t, float>) {
    softmax_step_avx2(s, n, mp, m, l, alpha, z);
    return;
  }
#endif
  softmax_step_generic(s, n, mp, m, l, alpha, m_use, z);
}

template <bool AVX2, typename acc_t>
RMM_ALWAYS_INLINE void grad_scores(acc_t* s, acc_t* dp, int64_t n, int64_t mp,
                                   const acc_t* lse_use, const acc_t* dd, const acc_t* z) {
#if RMM_HAS_AVX2_CLONES
  if constexpr (AVX2 && std::is_same_v<acc_t, float>) {
    grad_scores_avx2(s, dp, n, mp, lse_use, dd, z);
    return;
  }
#endif
  grad_scores_generic(s, dp, n, mp, lse_use, dd, z);
}

// ---------------------------------------------------------------------------------------------
// Dropout factors. uniforms(seed, n0, len, buf) returns p with p[k] = rand_at(seed, n0 + k);
// buf holds kUniformSlack more floats than len.
constexpr int64_t kUniformSlack = 80;

RMM_ALWAYS_INLINE const float* uniforms_generic(uint64_t seed, uint64_t n0, int64_t len,
                                                float* buf) {
  const uint64_t c0 = n0 >> 2, c1 = (n0 + static_cast<uint64_t>(len) + 3) >> 2;
  for (uint64_t c = c0; c < c1; ++c) {
    const Uint4 x = philox4x32_10(seed, c);
    float* o = buf + 4 * (c - c0);
    o[0] = uint_to_uniform(x.c0);
    o[1] = uint_to_uniform(x.c1);
    o[2] = uint_to_uniform(x.c2);
    o[3] = uint_to_uniform(x.c3);
  }
  return buf + (n0 & 3);
}

// The runs of consecutive keys in keys[0, n): runs[r] is the first position of run r,
// runs[nruns] = n. One run is one stretch of the Philox stream per query row.
RMM_ALWAYS_INLINE int64_t key_runs(const int32_t* keys, int64_t n, int32_t* runs) {
  int64_t nruns = 0;
  for (int64_t jj = 0; jj < n; ++jj) {
    if (jj == 0 || keys[jj] != keys[jj - 1] + 1) runs[nruns++] = static_cast<int32_t>(jj);
  }
  runs[nruns] = static_cast<int32_t>(n);
  return nruns;
}

#if RMM_HAS_AVX2_CLONES
// out[k * ldo + l] = mul * in[l * ldi + k] for an 8 x 8 block.
RMM_AVX2_INLINE void transpose8x8_avx2(const float* in, int64_t ldi, float* out, int64_t ldo,
                                       __m256 mul) {
  const __m256 r0 = _mm256_loadu_ps(in), r1 = _mm256_loadu_ps(in + ldi);
  const __m256 r2 = _mm256_loadu_ps(in + 2 * ldi), r3 = _mm256_loadu_ps(in + 3 * ldi);
  const __m256 r4 = _mm256_loadu_ps(in + 4 * ldi), r5 = _mm256_loadu_ps(in + 5 * ldi);
  const __m256 r6 = _mm256_loadu_ps(in + 6 * ldi), r7 = _mm256_loadu_ps(in + 7 * ldi);
  const __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
  const __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
  const __m256 t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5);
  const __m256 t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  _mm256_storeu_ps(out, _mm256_mul_ps(mul, _mm256_permute2f128_ps(u0, u4, 0x20)));
  _mm256_storeu_ps(out + ldo, _mm256_mul_ps(mul, _mm256_permute2f128_ps(u1, u5, 0x20)));
  _mm256_storeu_ps(out + 2 * ldo, _mm256_mul_ps(mul, _mm256_permute2f128_ps(u2, u6, 0x20)));
  _mm256_storeu_ps(out + 3 * ldo, _mm256_mul_ps(mul, _mm256_permute2f128_ps(u3, u7, 0x20)));
  _mm256_storeu_ps(out + 4 * ldo, _mm256_mul_ps(mul, _mm256_permute2f128_ps(u0, u4, 0x31)));
  _mm256_storeu_ps(out + 5 * ldo, _mm256_mul_ps(mul, _mm256_permute2f128_ps(u1, u5, 0x31)));
  _mm256_storeu_ps(out + 6 * ldo, _mm256_mul_ps(mul, _mm256_permute2f128_ps(u2, u6, 0x31)));
  _mm256_storeu_ps(out + 7 * ldo, _mm256_mul_ps(mul, _mm256_permute2f128_ps(u3, u7, 0x31)));
}

// uniforms_generic's numbers, 16 counters (two interleaved groups of 8) per step.
RMM_AVX2_INLINE const float* uniforms_avx2(const avx2::PhiloxKeys& keys, uint64_t n0,
                                           int64_t len, float* buf) {
  const uint64_t c0 = n0 >> 2, c1 = (n0 + static_cast<uint64_t>(len) + 3) >> 2;
  const __m256i round_a = _mm256_set1_epi32(static_cast<int>(0xD2511F53u));
  const __m256i round_b = _mm256_set1_epi32(static_cast<int>(0xCD9E8D57u));
  for (uint64_t c = c0; c < c1; c += 16) {
    alignas(32) uint32_t lo[16], hi[16];
    for (int i = 0; i < 16; ++i) {
      lo[i] = static_cast<uint32_t>(c + i);
      hi[i] = static_cast<uint32_t>((c + i) >> 32);
    }
    __m256i x0[2], x1[2], x2[2], x3[2];
    for (int g = 0; g < 2; ++g) {
      x0[g] = _mm256_load_si256(reinterpret_cast<const __m256i*>(lo + 8 * g));
      x1[g] = _mm256_load_si256(reinterpret_cast<const __m256i*>(hi + 8 * g));
      x2[g] = x3[g] = _mm256_setzero_si256();
    }
#pragma GCC unroll 10
    for (int round = 0; round < 10; ++round) {
#pragma GCC unroll 2
      for (int g = 0; g < 2; ++g) {
        __m256i hi_b, lo_b, hi_a, lo_a;
        avx2::mulhilo(x2[g], round_b, &hi_b, &lo_b);
        avx2::mulhilo(x0[g], round_a, &hi_a, &lo_a);
        x0[g] = _mm256_xor_si256(_mm256_xor_si256(hi_b, x1[g]), keys.k0[round]);
        x2[g] = _mm256_xor_si256(_mm256_xor_si256(hi_a, x3[g]), keys.k1[round]);
        x1[g] = lo_b;
        x3[g] = lo_a;
      }
    }
    for (int g = 0; g < 2; ++g) {
      avx2::store_counter_major(avx2::uniform(x0[g]), avx2::uniform(x1[g]), avx2::uniform(x2[g]),
                                avx2::uniform(x3[g]), buf + 4 * (c - c0) + 32 * g);
    }
  }
  return buf + (n0 & 3);
}

// dropout_tile for float on AVX2, 8 query lanes at a time: each lane's factors are made along
// its keys (the order of the Philox stream) into `rows` (8, ld >= n + 8), then transposed into
// the lanes of z.
RMM_TARGET_AVX2 void dropout_tile_avx2(uint64_t seed, uint64_t row0, int64_t lk,
                                       const int32_t* keys, int64_t n, int64_t m, int64_t mp,
                                       float dropout_p, float inv_keep, float* z, float* ubuf,
                                       int32_t* runs, float* rows, int64_t ld) {
  const int64_t nruns = key_runs(keys, n, runs);
  const avx2::PhiloxKeys pk = avx2::philox_keys(seed);
  const __m256 p = _mm256_set1_ps(dropout_p), inv = _mm256_set1_ps(inv_keep);
  const __m256 one = _mm256_set1_ps(1.0f);
  for (int64_t x0 = 0; x0 < mp; x0 += 8) {
    const int64_t lanes = std::min<int64_t>(8, m - x0);
    for (int64_t x = 0; x < 8; ++x) {
      float* row = rows + x * ld;
      if (x >= lanes) {
        std::fill_n(row, n, 0.0f);
        continue;
      }
      const uint64_t base = row0 + static_cast<uint64_t>(x0 + x) * static_cast<uint64_t>(lk);
      for (int64_t r = 0; r < nruns; ++r) {
        const int64_t r0 = runs[r], len = runs[r + 1] - r0;
        const float* u = uniforms_avx2(pk, base + static_cast<uint64_t>(keys[r0]), len, ubuf);
        // up to 7 factors past the run: the next run (or the slack) overwrites them
        for (int64_t k = 0; k < len; k += 8) {
          const __m256 keep = _mm256_cmp_ps(_mm256_loadu_ps(u + k), p, _CMP_GE_OQ);
          _mm256_storeu_ps(row + r0 + k, _mm256_and_ps(keep, inv));
        }
      }
    }
    int64_t jj = 0;
    for (; jj + 8 <= n; jj += 8) transpose8x8_avx2(rows + jj, ld, z + jj * mp + x0, mp, one);
    for (; jj < n; ++jj) {
      for (int64_t x = 0; x < 8; ++x) z[jj * mp + x0 + x] = rows[x * ld + jj];
    }
  }
}
#endif

// z (n, mp) = the dropout factors Z / (1 - p) of the tile's keys keys[0, n) for query lanes
// [0, m) (row0: the flat index of (b, h, q0, 0)); padded lanes get 0.
template <bool AVX2, typename acc_t>
RMM_ALWAYS_INLINE void dropout_tile(uint64_t seed, uint64_t row0, int64_t lk,
                                    const int32_t* keys, int64_t n, int64_t m, int64_t mp,
                                    float dropout_p, acc_t inv_keep, acc_t* z, float* ubuf,
                                    int32_t* runs, float* rows) {
#if RMM_HAS_AVX2_CLONES
  if constexpr (AVX2 && std::is_same_v<acc_t, float>) {
    dropout_tile_avx2(seed, row0, lk, keys, n, m, mp, dropout_p, inv_keep, z, ubuf, runs, rows,
                      kBlockN + 8);
    return;
  }
#endif
  const int64_t nruns = key_runs(keys, n, runs);
  for (int64_t x = 0; x < m; ++x) {
    const uint64_t base = row0 + static_cast<uint64_t>(x) * static_cast<uint64_t>(lk);
    for (int64_t r = 0; r < nruns; ++r) {
      const int64_t r0 = runs[r], r1 = runs[r + 1];
      const float* u = uniforms_generic(seed, base + static_cast<uint64_t>(keys[r0]), r1 - r0, ubuf);
      for (int64_t jj = r0; jj < r1; ++jj) {
        z[jj * mp + x] = u[jj - r0] >= dropout_p ? inv_keep : acc_t(0);
      }
    }
  }
  for (int64_t jj = 0; jj < n; ++jj) std::fill(z + jj * mp + m, z + jj * mp + mp, acc_t(0));
}

// ---------------------------------------------------------------------------------------------
// Packing (and converting to acc_t).

// dst (n, dp) = rows keys[0, n) of src (L, d); lanes >= d are 0.
template <typename scalar_t, typename acc_t>
RMM_ALWAYS_INLINE void pack_key_rows(const scalar_t* src, const int32_t* keys, int64_t n,
                                     int64_t d, int64_t dp, acc_t* dst) {
  for (int64_t jj = 0; jj < n; ++jj) {
    const scalar_t* in = src + static_cast<int64_t>(keys[jj]) * d;
    acc_t* o = dst + jj * dp;
    // a plain loop, not memcpy: rows are short (d elements) and a call per row costs more
    for (int64_t c = 0; c < d; ++c) o[c] = static_cast<acc_t>(in[c]);
    for (int64_t c = d; c < dp; ++c) o[c] = acc_t(0);
  }
}

// dst (m, dp) = src (m, d) rows; lanes >= d are 0.
template <typename scalar_t, typename acc_t>
RMM_ALWAYS_INLINE void pack_rows(const scalar_t* src, int64_t m, int64_t d, int64_t dp, acc_t* dst) {
  for (int64_t i = 0; i < m; ++i) {
    const scalar_t* in = src + i * d;
    acc_t* o = dst + i * dp;
    for (int64_t c = 0; c < d; ++c) o[c] = static_cast<acc_t>(in[c]);
    std::fill(o + d, o + dp, acc_t(0));
  }
}

#if RMM_HAS_AVX2_CLONES
// pack_transposed for float in 8 x 8 blocks: the rows [0, m8) where m8 = m rounded down to 8
// and the columns [0, d8); returns nothing, the caller does the rest.
RMM_TARGET_AVX2 void pack_transposed_blocks_avx2(const float* src, int64_t m8, int64_t d,
                                                 int64_t d8, int64_t mp, float mul, float* dst) {
  const __m256 vm = _mm256_set1_ps(mul);
  for (int64_t i0 = 0; i0 < m8; i0 += 8) {
    for (int64_t c0 = 0; c0 < d8; c0 += 8) {
      transpose8x8_avx2(src + i0 * d + c0, d, dst + c0 * mp + i0, mp, vm);
    }
  }
}
#endif

// dst (d, mp) = mul * src (m, d) transposed; lanes >= m are 0.
template <bool AVX2, typename scalar_t, typename acc_t>
RMM_ALWAYS_INLINE void pack_transposed(const scalar_t* src, int64_t m, int64_t d, int64_t mp,
                                       acc_t mul, acc_t* dst) {
  int64_t m8 = 0, d8 = 0;  // the block done by the vector code
#if RMM_HAS_AVX2_CLONES
  if constexpr (AVX2 && std::is_same_v<scalar_t, float>) {
    m8 = m & ~int64_t(7);
    d8 = d & ~int64_t(7);
    pack_transposed_blocks_avx2(src, m8, d, d8, mp, mul, dst);
  }
#endif
  for (int64_t c = 0; c < d; ++c) std::fill(dst + c * mp + m, dst + c * mp + mp, acc_t(0));
  for (int64_t i = 0; i < m; ++i) {
    const scalar_t* in = src + i * d;
    for (int64_t c = i < m8 ? d8 : 0; c < d; ++c) dst[c * mp + i] = mul * static_cast<acc_t>(in[c]);
  }
}

// Tasks handed out in chunks from a shared counter: a thread that runs faster (fewer kept keys
// in its samples, or not preempted) takes more, so no thread idles at the end.
struct TaskQueue {
  std::atomic<int64_t> next{0};
  int64_t end = 0;
  int64_t chunk = 1;
  bool pop(int64_t* begin, int64_t* stop) {
    const int64_t b = next.fetch_add(chunk, std::memory_order_relaxed);
    if (b >= end) return false;
    *begin = b;
    *stop = std::min(b + chunk, end);
    return true;
  }
};

// One thread's walk through the queue: for (int64_t t; cursor.next(&t);) ...
struct TaskCursor {
  TaskQueue& queue;
  int64_t cur = 0, stop = 0;
  explicit TaskCursor(TaskQueue& q) : queue(q) {}
  bool next(int64_t* task) {
    if (cur == stop && !queue.pop(&cur, &stop)) return false;
    *task = cur++;
    return true;
  }
};

// Runs body(queue) on every thread of at::parallel_for over `tasks` tasks.
template <typename Body>
void run_tasks(int64_t tasks, const Body& body) {
  if (tasks <= 0) return;
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), tasks));
  TaskQueue queue;
  queue.end = tasks;
  queue.chunk = std::max<int64_t>(1, tasks / (threads * 32));
  at::parallel_for(0, threads, 1, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) body(queue);
  });
}

// A bump allocator over one per-task buffer.
template <typename T>
struct Arena {
  std::unique_ptr<T[]> data;
  int64_t used = 0;
  explicit Arena(int64_t n) : data(new T[n]) {}
  T* take(int64_t n) {
    T* p = data.get() + used;
    used += (n + 15) & ~int64_t(15);
    return p;
  }
  static int64_t size(std::initializer_list<int64_t> parts) {
    int64_t total = 0;
    for (int64_t n : parts) total += (n + 15) & ~int64_t(15);
    return total;
  }
};

// ---------------------------------------------------------------------------------------------
// Forward: tasks of (b, h, query tile).

template <bool AVX2, typename scalar_t>
RMM_ALWAYS_INLINE void forward_tasks(const ForwardArgs<scalar_t>& a, TaskQueue& queue) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t d = a.dim, dp = round8(d), lq = a.lq, lk = a.lk;
  const int64_t nqt = num_tiles(lq, kBlockM);
  const int64_t bmp = round8(std::min(kBlockM, lq));
  const bool dropout = a.dropout_p > 0.0f;
  const acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  constexpr bool kLog2 = kLog2Scores<AVX2, acc_t>;
  const acc_t qmul = kLog2 ? static_cast<acc_t>(a.scale * kLog2e) : a.scale;
  Arena<acc_t> arena(Arena<acc_t>::size({d * bmp, kBlockN * dp, kBlockN * dp, kBlockN * bmp,
                                         kBlockM * dp, bmp, bmp, bmp, bmp,
                                         dropout ? kBlockN * bmp : 0}));
  acc_t* qt = arena.take(d * bmp);
  acc_t* kp = arena.take(kBlockN * dp);
  acc_t* vp = arena.take(kBlockN * dp);
  acc_t* s = arena.take(kBlockN * bmp);
  acc_t* o = arena.take(kBlockM * dp);
  acc_t* m = arena.take(bmp);
  acc_t* l = arena.take(bmp);
  acc_t* alpha = arena.take(bmp);
  acc_t* m_use = arena.take(bmp);
  acc_t* z = dropout ? arena.take(kBlockN * bmp) : nullptr;
  std::unique_ptr<float[]> ubuf(dropout ? new float[kBlockN + kUniformSlack] : nullptr);
  std::unique_ptr<float[]> rows(dropout ? new float[8 * (kBlockN + 8)] : nullptr);
  std::unique_ptr<int32_t[]> runs(dropout ? new int32_t[kBlockN + 1] : nullptr);

  TaskCursor tasks(queue);
  for (int64_t task; tasks.next(&task);) {
    const int64_t bh = task / nqt, q0 = (task % nqt) * kBlockM;
    const int64_t b = bh / a.heads;
    const int64_t M = std::min(kBlockM, lq - q0), Mp = round8(M);
    const int32_t* keys = a.keys + b * a.key_stride;
    int64_t n = a.kept[b];
    if (a.causal) n = kept_upto(keys, n, q0 + M - 1);
    scalar_t* out = a.out + (bh * lq + q0) * d;
    acc_t* lse = a.lse + bh * lq + q0;
    if (n == 0) {
      std::fill_n(out, M * d, scalar_t(0));
      std::fill_n(lse, M, ninf);
      continue;
    }
    pack_transposed<AVX2>(a.q + (bh * lq + q0) * d, M, d, Mp, qmul, qt);
    std::fill_n(m, Mp, ninf);
    std::fill_n(l, Mp, acc_t(0));
    const scalar_t* kh = a.k + bh * lk * d;
    const scalar_t* vh = a.v + bh * lk * d;
    const int64_t nt = num_tiles(n, kBlockN);
    for (int64_t t = 0; t < nt; ++t) {
      const int64_t s0 = tile_begin(t, n, nt), nn = tile_begin(t + 1, n, nt) - s0;
      const int32_t* tk = keys + s0;
      pack_key_rows(kh, tk, nn, d, dp, kp);
      pack_key_rows(vh, tk, nn, d, dp, vp);
      gemm<AVX2>(nn, Mp, d, kp, dp, 1, qt, Mp, s, Mp, false);  // s^T = k q^T (scaled)
      if (a.causal && tk[nn - 1] > q0) causal_mask(s, nn, Mp, tk, q0);
      if (dropout) {
        dropout_tile<AVX2>(a.seed, attention_dropout_index(bh, lq, q0, lk, 0), lk, tk, nn, M, Mp,
                           a.dropout_p, a.inv_keep, z, ubuf.get(), runs.get(), rows.get());
      }
      softmax_step<AVX2>(s, nn, Mp, m, l, alpha, m_use, dropout ? z : nullptr);
      if (t > 0) {
        for (int64_t i = 0; i < M; ++i) {
          acc_t* row = o + i * dp;
          const acc_t al = alpha[i];
          for (int64_t c = 0; c < dp; ++c) row[c] *= al;
        }
      }
      gemm<AVX2>(M, dp, nn, s, 1, Mp, vp, dp, o, dp, t > 0);  // o += p v
    }
    for (int64_t i = 0; i < M; ++i) {
      const acc_t li = l[i];
      scalar_t* orow = out + i * d;
      if (li > acc_t(0)) {
        const acc_t inv = acc_t(1) / li;
        const acc_t* row = o + i * dp;
        for (int64_t c = 0; c < d; ++c) orow[c] = static_cast<scalar_t>(row[c] * inv);
        lse[i] = kLog2 ? static_cast<acc_t>((m[i] + std::log2(li)) * kLn2) : m[i] + std::log(li);
      } else {
        std::fill_n(orow, d, scalar_t(0));
        lse[i] = ninf;
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Backward.

template <typename acc_t>
struct BackwardScratch {
  acc_t *kp, *vp, *dk, *dv;  // (kBlockN, dp)
  acc_t *qt, *dot;           // (d, bmp)
  acc_t *qr, *dor;           // (kBlockM, dp)
  acc_t *s, *dp, *z;         // (kBlockN, bmp)
  acc_t *dd, *lse_use;       // (bmp)
  acc_t* dq;                 // (dq_rows, dp)
  float* ubuf;    // kBlockN + kUniformSlack
  int32_t* runs;  // kBlockN + 1
  float* rows;    // 8 * (kBlockN + 8)
};

template <typename scalar_t>
struct BackwardWorkspace {
  using acc_t = at::opmath_type<scalar_t>;
  Arena<acc_t> arena;
  std::unique_ptr<float[]> ubuf, rows;
  std::unique_ptr<int32_t[]> runs;
  BackwardScratch<acc_t> sc;
  static int64_t size(const BackwardArgs<scalar_t>& a, int64_t dq_rows) {
    const int64_t d = a.dim, dp = round8(d), bmp = round8(std::min(kBlockM, a.lq));
    const bool dropout = a.dropout_p > 0.0f;
    return Arena<acc_t>::size({kBlockN * dp, kBlockN * dp, kBlockN * dp, kBlockN * dp, d * bmp,
                               d * bmp, kBlockM * dp, kBlockM * dp, kBlockN * bmp,
                               kBlockN * bmp, dropout ? kBlockN * bmp : 0, bmp, bmp,
                               dq_rows * dp});
  }
  BackwardWorkspace(const BackwardArgs<scalar_t>& a, int64_t dq_rows) : arena(size(a, dq_rows)) {
    const int64_t d = a.dim, dp = round8(d), bmp = round8(std::min(kBlockM, a.lq));
    const bool dropout = a.dropout_p > 0.0f;
    sc.kp = arena.take(kBlockN * dp);
    sc.vp = arena.take(kBlockN * dp);
    sc.dk = arena.take(kBlockN * dp);
    sc.dv = arena.take(kBlockN * dp);
    sc.qt = arena.take(d * bmp);
    sc.dot = arena.take(d * bmp);
    sc.qr = arena.take(kBlockM * dp);
    sc.dor = arena.take(kBlockM * dp);
    sc.s = arena.take(kBlockN * bmp);
    sc.dp = arena.take(kBlockN * bmp);
    sc.z = dropout ? arena.take(kBlockN * bmp) : nullptr;
    sc.dd = arena.take(bmp);
    sc.lse_use = arena.take(bmp);
    sc.dq = arena.take(dq_rows * dp);
    if (dropout) {
      ubuf.reset(new float[kBlockN + kUniformSlack]);
      rows.reset(new float[8 * (kBlockN + 8)]);
      runs.reset(new int32_t[kBlockN + 1]);
    }
    sc.ubuf = ubuf.get();
    sc.runs = runs.get();
    sc.rows = rows.get();
  }
};

// The query tile [q0, q0 + M) of head bh: qt, qr, dot, dor, D = rowsum(dO * O) and lse_use.
template <bool AVX2, typename scalar_t>
RMM_ALWAYS_INLINE void pack_query_tile(const BackwardArgs<scalar_t>& a,
                                       BackwardScratch<at::opmath_type<scalar_t>>& sc, int64_t bh,
                                       int64_t q0, int64_t M, int64_t Mp) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t d = a.dim, dp = round8(d);
  constexpr bool kLog2 = kLog2Scores<AVX2, acc_t>;
  const int64_t off = (bh * a.lq + q0) * d;
  pack_transposed<AVX2>(a.q + off, M, d, Mp, kLog2 ? static_cast<acc_t>(a.scale * kLog2e) : a.scale,
                  sc.qt);
  pack_rows(a.q + off, M, d, dp, sc.qr);
  pack_transposed<AVX2>(a.grad_out + off, M, d, Mp, acc_t(1), sc.dot);
  pack_rows(a.grad_out + off, M, d, dp, sc.dor);
  const acc_t inf = std::numeric_limits<acc_t>::infinity();
  for (int64_t i = 0; i < M; ++i) {
    const scalar_t* orow = a.out + off + i * d;
    const acc_t* g = sc.dor + i * dp;
    acc_t sum = 0;
    for (int64_t c = 0; c < d; ++c) sum += g[c] * static_cast<acc_t>(orow[c]);
    const acc_t lse = a.lse[bh * a.lq + q0 + i];
    // a row with no key (lse = -inf) has p = 0 everywhere: exp(s - inf)
    const bool empty = lse == -inf;
    sc.dd[i] = empty ? acc_t(0) : sum;
    sc.lse_use[i] = empty ? inf : (kLog2 ? static_cast<acc_t>(lse * kLog2e) : lse);
  }
  std::fill(sc.dd + M, sc.dd + Mp, acc_t(0));
  std::fill(sc.lse_use + M, sc.lse_use + Mp, inf);
}

// One (key tile, query tile) step: kp, vp hold the keys tk[0, nn); qt.. the query tile at q0.
// Adds to dk, dv (overwrites them when `first`) and/or to dq_tile (M, dp).
template <bool AVX2, typename scalar_t>
RMM_ALWAYS_INLINE void backward_pair(const BackwardArgs<scalar_t>& a,
                                     BackwardScratch<at::opmath_type<scalar_t>>& sc, int64_t bh,
                                     const int32_t* tk, int64_t nn, int64_t q0, int64_t M,
                                     int64_t Mp, bool first, bool want_dkdv,
                                     at::opmath_type<scalar_t>* dq_tile) {
  const int64_t d = a.dim, dp = round8(d);
  const bool dropout = a.dropout_p > 0.0f;
  gemm<AVX2>(nn, Mp, d, sc.kp, dp, 1, sc.qt, Mp, sc.s, Mp, false);    // s^T = k q^T (scaled)
  gemm<AVX2>(nn, Mp, d, sc.vp, dp, 1, sc.dot, Mp, sc.dp, Mp, false);  // dP^T = v dO^T
  if (a.causal && tk[nn - 1] > q0) causal_mask(sc.s, nn, Mp, tk, q0);
  if (dropout) {
    dropout_tile<AVX2>(a.seed, attention_dropout_index(bh, a.lq, q0, a.lk, 0), a.lk, tk, nn, M,
                       Mp, a.dropout_p, a.inv_keep, sc.z, sc.ubuf, sc.runs, sc.rows);
  }
  grad_scores<AVX2>(sc.s, sc.dp, nn, Mp, sc.lse_use, sc.dd, dropout ? sc.z : nullptr);
  if (want_dkdv) {
    gemm<AVX2>(nn, dp, M, sc.s, Mp, 1, sc.dor, dp, sc.dv, dp, !first);  // dV += Pd^T dO
    gemm<AVX2>(nn, dp, M, sc.dp, Mp, 1, sc.qr, dp, sc.dk, dp, !first);  // dK += dS^T q
  }
  if (dq_tile != nullptr) {
    gemm<AVX2>(M, dp, nn, sc.dp, 1, Mp, sc.kp, dp, dq_tile, dp, true);  // dQ += dS k
  }
}

// dk, dv rows tk[0, nn) of head bh from the accumulators (dk times scale); zeros when no query
// reached the tile.
template <typename scalar_t>
RMM_ALWAYS_INLINE void store_key_grads(const BackwardArgs<scalar_t>& a,
                                       const BackwardScratch<at::opmath_type<scalar_t>>& sc,
                                       int64_t bh, const int32_t* tk, int64_t nn, bool touched) {
  const int64_t d = a.dim, dp = round8(d);
  for (int64_t jj = 0; jj < nn; ++jj) {
    const int64_t off = (bh * a.lk + tk[jj]) * d;
    scalar_t* dk = a.dk + off;
    scalar_t* dv = a.dv + off;
    if (!touched) {
      std::fill_n(dk, d, scalar_t(0));
      std::fill_n(dv, d, scalar_t(0));
      continue;
    }
    const auto* gk = sc.dk + jj * dp;
    const auto* gv = sc.dv + jj * dp;
    for (int64_t c = 0; c < d; ++c) {
      dk[c] = static_cast<scalar_t>(a.scale * gk[c]);
      dv[c] = static_cast<scalar_t>(gv[c]);
    }
  }
}

// dk, dv = 0 for head bh's keys outside keys[0, n) (not kept, or beyond every causal query).
template <typename scalar_t>
RMM_ALWAYS_INLINE void zero_unused_keys(const BackwardArgs<scalar_t>& a, int64_t bh,
                                        const int32_t* keys, int64_t n) {
  const int64_t d = a.dim;
  int64_t p = 0;
  for (int64_t j = 0; j < a.lk; ++j) {
    if (p < n && keys[p] == j) {
      ++p;
      continue;
    }
    std::fill_n(a.dk + (bh * a.lk + j) * d, d, scalar_t(0));
    std::fill_n(a.dv + (bh * a.lk + j) * d, d, scalar_t(0));
  }
}

// Keys that can receive gradient in head bh's sample: kept, and (causal) <= Lq - 1.
template <typename scalar_t>
RMM_ALWAYS_INLINE int64_t backward_keys(const BackwardArgs<scalar_t>& a, int64_t b,
                                        const int32_t** keys) {
  *keys = a.keys + b * a.key_stride;
  int64_t n = a.kept[b];
  if (a.causal) n = kept_upto(*keys, n, a.lq - 1);
  return n;
}

// Fused backward: tasks of (b, h); dq of the head accumulates in sc.dq.
template <bool AVX2, typename scalar_t>
RMM_ALWAYS_INLINE void backward_heads(const BackwardArgs<scalar_t>& a, TaskQueue& queue) {
  using acc_t = at::opmath_type<scalar_t>;
  BackwardWorkspace<scalar_t> ws(a, a.lq);
  BackwardScratch<acc_t>& sc = ws.sc;
  const int64_t d = a.dim, dp = round8(d), lq = a.lq;
  const int64_t nqt = num_tiles(lq, kBlockM);
  TaskCursor tasks(queue);
  for (int64_t bh; tasks.next(&bh);) {
    const int32_t* keys;
    const int64_t n = backward_keys(a, bh / a.heads, &keys);
    zero_unused_keys(a, bh, keys, n);
    scalar_t* dq = a.dq + bh * lq * d;
    if (n == 0) {
      std::fill_n(dq, lq * d, scalar_t(0));
      continue;
    }
    std::fill_n(sc.dq, lq * dp, acc_t(0));
    const scalar_t* kh = a.k + bh * a.lk * d;
    const scalar_t* vh = a.v + bh * a.lk * d;
    const int64_t nt = num_tiles(n, kBlockN);
    int64_t packed = -1;
    for (int64_t t = 0; t < nt; ++t) {
      const int64_t s0 = tile_begin(t, n, nt), nn = tile_begin(t + 1, n, nt) - s0;
      const int32_t* tk = keys + s0;
      pack_key_rows(kh, tk, nn, d, dp, sc.kp);
      pack_key_rows(vh, tk, nn, d, dp, sc.vp);
      bool first = true;
      for (int64_t qi = 0; qi < nqt; ++qi) {
        const int64_t q0 = qi * kBlockM, M = std::min(kBlockM, lq - q0), Mp = round8(M);
        if (a.causal && q0 + M - 1 < tk[0]) continue;  // every key of the tile is in the future
        if (packed != qi) {
          pack_query_tile<AVX2>(a, sc, bh, q0, M, Mp);
          packed = qi;
        }
        backward_pair<AVX2>(a, sc, bh, tk, nn, q0, M, Mp, first, true, sc.dq + q0 * dp);
        first = false;
      }
      store_key_grads(a, sc, bh, tk, nn, !first);
    }
    for (int64_t i = 0; i < lq; ++i) {
      const acc_t* g = sc.dq + i * dp;
      for (int64_t c = 0; c < d; ++c) dq[i * d + c] = static_cast<scalar_t>(a.scale * g[c]);
    }
  }
}

// Split backward, pass 1: dk, dv over tasks of (b, h, key tile); ntk = tiles of the longest
// key list. The task of key tile 0 also zeroes the head's unused keys.
template <bool AVX2, typename scalar_t>
RMM_ALWAYS_INLINE void backward_key_tiles(const BackwardArgs<scalar_t>& a, int64_t ntk,
                                          TaskQueue& queue) {
  BackwardWorkspace<scalar_t> ws(a, 0);
  auto& sc = ws.sc;
  const int64_t d = a.dim, dp = round8(d), lq = a.lq;
  const int64_t nqt = num_tiles(lq, kBlockM);
  TaskCursor tasks(queue);
  for (int64_t task; tasks.next(&task);) {
    const int64_t bh = task / ntk, t = task % ntk;
    const int32_t* keys;
    const int64_t n = backward_keys(a, bh / a.heads, &keys);
    if (t == 0) zero_unused_keys(a, bh, keys, n);
    const int64_t nt = num_tiles(n, kBlockN);
    if (t >= nt) continue;
    const int64_t s0 = tile_begin(t, n, nt), nn = tile_begin(t + 1, n, nt) - s0;
    const int32_t* tk = keys + s0;
    pack_key_rows(a.k + bh * a.lk * d, tk, nn, d, dp, sc.kp);
    pack_key_rows(a.v + bh * a.lk * d, tk, nn, d, dp, sc.vp);
    bool first = true;
    for (int64_t qi = 0; qi < nqt; ++qi) {
      const int64_t q0 = qi * kBlockM, M = std::min(kBlockM, lq - q0), Mp = round8(M);
      if (a.causal && q0 + M - 1 < tk[0]) continue;
      pack_query_tile<AVX2>(a, sc, bh, q0, M, Mp);
      backward_pair<AVX2>(a, sc, bh, tk, nn, q0, M, Mp, first, true,
                          static_cast<at::opmath_type<scalar_t>*>(nullptr));
      first = false;
    }
    store_key_grads(a, sc, bh, tk, nn, !first);
  }
}

// Split backward, pass 2: dq over tasks of (b, h, query tile).
template <bool AVX2, typename scalar_t>
RMM_ALWAYS_INLINE void backward_query_tiles(const BackwardArgs<scalar_t>& a, TaskQueue& queue) {
  using acc_t = at::opmath_type<scalar_t>;
  BackwardWorkspace<scalar_t> ws(a, kBlockM);
  auto& sc = ws.sc;
  const int64_t d = a.dim, dp = round8(d), lq = a.lq;
  const int64_t nqt = num_tiles(lq, kBlockM);
  TaskCursor tasks(queue);
  for (int64_t task; tasks.next(&task);) {
    const int64_t bh = task / nqt, q0 = (task % nqt) * kBlockM;
    const int64_t M = std::min(kBlockM, lq - q0), Mp = round8(M);
    const int32_t* keys = a.keys + (bh / a.heads) * a.key_stride;
    int64_t n = a.kept[bh / a.heads];
    if (a.causal) n = kept_upto(keys, n, q0 + M - 1);
    scalar_t* dq = a.dq + (bh * lq + q0) * d;
    if (n == 0) {
      std::fill_n(dq, M * d, scalar_t(0));
      continue;
    }
    std::fill_n(sc.dq, M * dp, acc_t(0));
    pack_query_tile<AVX2>(a, sc, bh, q0, M, Mp);
    const int64_t nt = num_tiles(n, kBlockN);
    for (int64_t t = 0; t < nt; ++t) {
      const int64_t s0 = tile_begin(t, n, nt), nn = tile_begin(t + 1, n, nt) - s0;
      const int32_t* tk = keys + s0;
      pack_key_rows(a.k + bh * a.lk * d, tk, nn, d, dp, sc.kp);
      pack_key_rows(a.v + bh * a.lk * d, tk, nn, d, dp, sc.vp);
      backward_pair<AVX2>(a, sc, bh, tk, nn, q0, M, Mp, true, false, sc.dq);
    }
    for (int64_t i = 0; i < M; ++i) {
      for (int64_t c = 0; c < d; ++c) {
        dq[i * d + c] = static_cast<scalar_t>(a.scale * sc.dq[i * dp + c]);
      }
    }
  }
}

// The ISA copies.
template <typename scalar_t>
RMM_TARGET_AVX2 void forward_tasks_avx2(const ForwardArgs<scalar_t>& a, TaskQueue& q) {
  forward_tasks<true, scalar_t>(a, q);
}
template <typename scalar_t>
void forward_tasks_default(const ForwardArgs<scalar_t>& a, TaskQueue& q) {
  forward_tasks<false, scalar_t>(a, q);
}
template <typename scalar_t>
RMM_TARGET_AVX2 void backward_heads_avx2(const BackwardArgs<scalar_t>& a, TaskQueue& q) {
  backward_heads<true, scalar_t>(a, q);
}
template <typename scalar_t>
void backward_heads_default(const BackwardArgs<scalar_t>& a, TaskQueue& q) {
  backward_heads<false, scalar_t>(a, q);
}
template <typename scalar_t>
RMM_TARGET_AVX2 void backward_key_tiles_avx2(const BackwardArgs<scalar_t>& a, int64_t ntk,
                                             TaskQueue& q) {
  backward_key_tiles<true, scalar_t>(a, ntk, q);
}
template <typename scalar_t>
void backward_key_tiles_default(const BackwardArgs<scalar_t>& a, int64_t ntk, TaskQueue& q) {
  backward_key_tiles<false, scalar_t>(a, ntk, q);
}
template <typename scalar_t>
RMM_TARGET_AVX2 void backward_query_tiles_avx2(const BackwardArgs<scalar_t>& a, TaskQueue& q) {
  backward_query_tiles<true, scalar_t>(a, q);
}
template <typename scalar_t>
void backward_query_tiles_default(const BackwardArgs<scalar_t>& a, TaskQueue& q) {
  backward_query_tiles<false, scalar_t>(a, q);
}

// ---------------------------------------------------------------------------------------------
// Entry points.

// The kept keys of each sample in key order: (keys, kept, stride). Without key_keep every
// sample shares the one list 0..Lk-1 (stride 0).
// 1 / (1 - p), rounded to float as the reference's factor (then widened for double).
template <typename acc_t>
acc_t inv_keep(double dropout_p) {
  return static_cast<acc_t>(static_cast<float>(1.0 / (1.0 - dropout_p)));
}

struct KeptKeys {
  std::vector<int32_t> keys;
  std::vector<int64_t> kept;
  int64_t stride = 0;
};

KeptKeys kept_keys(const MaskedAttentionInputs& in) {
  TORCH_CHECK_VALUE(in.lk <= std::numeric_limits<int32_t>::max(),
                    "robustmm: Lk must fit in int32, got ", in.lk);
  KeptKeys kk;
  kk.kept.assign(in.batch, in.lk);
  if (!in.key_keep.defined()) {
    kk.keys.resize(in.lk);
    for (int64_t j = 0; j < in.lk; ++j) kk.keys[j] = static_cast<int32_t>(j);
    return kk;
  }
  kk.stride = in.lk;
  kk.keys.resize(in.batch * in.lk);
  const bool* keep = in.key_keep.data_ptr<bool>();
  at::parallel_for(0, in.batch, std::max<int64_t>(1, 65536 / std::max<int64_t>(in.lk, 1)),
                   [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      int32_t* out = kk.keys.data() + b * in.lk;
      int64_t n = 0;
      for (int64_t j = 0; j < in.lk; ++j) {
        if (keep[b * in.lk + j]) out[n++] = static_cast<int32_t>(j);
      }
      kk.kept[b] = n;
    }
  });
  return kk;
}

std::tuple<at::Tensor, at::Tensor> masked_attention_forward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& key_keep, bool is_causal, double dropout_p, double scale,
    int64_t seed) {
  const MaskedAttentionInputs in =
      check_masked_attention_inputs(q, k, v, key_keep, dropout_p, scale, at::kCPU);
  at::Tensor out = at::empty(in.q.sizes(), in.q.options());
  at::Tensor lse = at::empty({in.batch, in.heads, in.lq},
                             in.q.options().dtype(accumulate_type(in.q.scalar_type())));
  if (out.numel() == 0) {
    lse.fill_(-std::numeric_limits<double>::infinity());
    return {out, lse};
  }
  const KeptKeys kk = kept_keys(in);
  const bool avx2 = use_avx2();
  const int64_t tasks = in.batch * in.heads * num_tiles(in.lq, kBlockM);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.q.scalar_type(),
                                  "masked_attention_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    ForwardArgs<scalar_t> a{in.q.data_ptr<scalar_t>(),
                            in.k.data_ptr<scalar_t>(),
                            in.v.data_ptr<scalar_t>(),
                            kk.keys.data(),
                            kk.kept.data(),
                            out.data_ptr<scalar_t>(),
                            lse.data_ptr<acc_t>(),
                            kk.stride,
                            in.heads,
                            in.lq,
                            in.lk,
                            in.dim,
                            is_causal,
                            static_cast<float>(dropout_p),
                            inv_keep<acc_t>(dropout_p),
                            static_cast<acc_t>(scale),
                            static_cast<uint64_t>(seed)};
    auto body = avx2 ? forward_tasks_avx2<scalar_t> : forward_tasks_default<scalar_t>;
    run_tasks(tasks, [&](TaskQueue& queue) { body(a, queue); });
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_attention_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& key_keep,
    bool is_causal, double dropout_p, double scale, int64_t seed) {
  const MaskedAttentionInputs in =
      check_masked_attention_inputs(q, k, v, key_keep, dropout_p, scale, at::kCPU);
  const auto grads = check_masked_attention_grads(grad_out, out, lse, in.q);
  const at::Tensor& go = std::get<0>(grads);
  const at::Tensor& o = std::get<1>(grads);
  const at::Tensor& ls = std::get<2>(grads);
  at::Tensor dq = at::empty(in.q.sizes(), in.q.options());
  at::Tensor dk = at::empty(in.k.sizes(), in.k.options());
  at::Tensor dv = at::empty(in.v.sizes(), in.v.options());
  if (in.batch * in.heads == 0 || in.dim == 0) return {dq, dk, dv};
  if (in.lq == 0 || in.lk == 0) {
    dq.zero_();
    dk.zero_();
    dv.zero_();
    return {dq, dk, dv};
  }
  const KeptKeys kk = kept_keys(in);
  const bool avx2 = use_avx2();
  const int64_t heads = in.batch * in.heads;
  const int64_t nqt = num_tiles(in.lq, kBlockM), ntk = num_tiles(in.lk, kBlockN);
  // Fused over (b, h) when that keeps every thread busy, or when there is nothing to split.
  const bool fused = heads >= 4 * at::get_num_threads() || (nqt == 1 && ntk == 1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.q.scalar_type(),
                                  "masked_attention_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    BackwardArgs<scalar_t> a{go.data_ptr<scalar_t>(),
                             in.q.data_ptr<scalar_t>(),
                             in.k.data_ptr<scalar_t>(),
                             in.v.data_ptr<scalar_t>(),
                             o.data_ptr<scalar_t>(),
                             ls.data_ptr<acc_t>(),
                             kk.keys.data(),
                             kk.kept.data(),
                             dq.data_ptr<scalar_t>(),
                             dk.data_ptr<scalar_t>(),
                             dv.data_ptr<scalar_t>(),
                             kk.stride,
                             in.heads,
                             in.lq,
                             in.lk,
                             in.dim,
                             is_causal,
                             static_cast<float>(dropout_p),
                             inv_keep<acc_t>(dropout_p),
                             static_cast<acc_t>(scale),
                             static_cast<uint64_t>(seed)};
    if (fused) {
      auto body = avx2 ? backward_heads_avx2<scalar_t> : backward_heads_default<scalar_t>;
      run_tasks(heads, [&](TaskQueue& queue) { body(a, queue); });
    } else {
      auto keys_body = avx2 ? backward_key_tiles_avx2<scalar_t> : backward_key_tiles_default<scalar_t>;
      run_tasks(heads * ntk, [&](TaskQueue& queue) { keys_body(a, ntk, queue); });
      auto query_body =
          avx2 ? backward_query_tiles_avx2<scalar_t> : backward_query_tiles_default<scalar_t>;
      run_tasks(heads * nqt, [&](TaskQueue& queue) { query_body(a, queue); });
    }
  });
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(robustmm_C, CPU, m) {
  m.impl("masked_attention_forward", &masked_attention_forward);
  m.impl("masked_attention_backward", &masked_attention_backward);
}

}  // namespace cpu
}  // namespace robustmm
