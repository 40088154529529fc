// cycle_reconstruction_loss on the CPU: the forward reads the four tensors once and writes each
// row's two terms; the backward reads them once more, recomputes each row distance's derivatives
// and writes the gradients (the upstream gradient of the row's term times the derivative)
// directly, so no tensor of the inputs' size exists between the two. Parallel over rows
// (at::parallel_for). The math is csrc/include/robustmm/cycle_loss.h.
//
// Backward per row and pair (a, b) with s = grad_terms[pair, row]:
//   mse, l1, smooth_l1  elementwise: g = s / D * dd/da_i, written as +g (d a) and -g (d b) from
//                       the one computation, only to the gradients asked for;
//   cosine              the row's dot and norms first (one pass), then the gradients from the
//                       same row, still in L1 (a row of D = 128 floats is 512 bytes per tensor).
// Accumulation in float32 (float64 for double), one rounding to the output dtype.
//
// Vectorization: the float32 path on AVX2+FMA machines is written in intrinsics, so that the
// freshly written gradients can go out as streaming stores that bypass the cache when the call's
// tensors would not fit in it anyway: a normal store first reads the line it writes, so
// streaming halves a written tensor's traffic. Other dtypes and the baseline ISA run the scalar
// template, which gcc vectorizes. ROBUSTMM_CPU_CAPABILITY=default forces the baseline copy.
//
// Excluded rows (mask False) are never read (neither the inputs nor grad_terms): their terms and
// gradients are written as 0.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "robustmm/cpu_capability.h"
#include "robustmm/cycle_loss.h"
#include "robustmm/cycle_loss_inputs.h"

#include "vec_avx2.h"

namespace robustmm {
namespace cpu {
namespace {

template <typename scalar_t>
struct ForwardArgs {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* forward_pred;  // (rows, dim)
  const scalar_t* target;        // (rows, dim)
  const scalar_t* cycle_pred;    // (rows, dim)
  const scalar_t* source;        // (rows, dim)
  const bool* mask;              // (rows,) True = include; nullable
  acc_t* terms;                  // (2, rows): forward terms, then cycle terms
  int64_t rows;
  int64_t dim;
  acc_t beta;
};

template <typename scalar_t>
struct BackwardArgs {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t* grad_terms;  // (2, rows): d loss / d terms
  const scalar_t* in[4];    // forward_pred, target, cycle_pred, source: (rows, dim) each
  const bool* mask;         // (rows,) True = include; nullable
  scalar_t* out[4];         // d forward_pred, d target, d cycle_pred, d source: (rows, dim);
                            // null where the need_grad bit is clear
  int64_t rows;
  int64_t dim;
  acc_t beta;
  bool stream;  // streaming stores (see use_streaming_stores)
};

// ---- scalar rows (every dtype; gcc vectorizes the loops) ----

// Sum over the row with independent lanes so the loop vectorizes without -ffast-math.
constexpr int kLanes = 16;

// A symmetric distance's row term (DIST = mse, l1, smooth_l1).
template <int DIST, typename scalar_t, typename acc_t>
RMM_ALWAYS_INLINE acc_t symmetric_term(const scalar_t* a, const scalar_t* b, int64_t dim,
                                       acc_t beta) {
  const acc_t inv_beta = DIST == kCycleSmoothL1 ? acc_t(1) / beta : acc_t(0);
  acc_t lanes[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= dim; j += kLanes) {
    for (int k = 0; k < kLanes; ++k) {
      lanes[k] += cycle_elem<DIST, acc_t>(static_cast<acc_t>(a[j + k]),
                                          static_cast<acc_t>(b[j + k]), beta, inv_beta).value;
    }
  }
  acc_t sum = 0;
  for (int k = 0; k < kLanes; ++k) sum += lanes[k];
  for (; j < dim; ++j) {
    sum += cycle_elem<DIST, acc_t>(static_cast<acc_t>(a[j]), static_cast<acc_t>(b[j]), beta,
                                   inv_beta).value;
  }
  return sum * (acc_t(1) / static_cast<acc_t>(dim));
}

// A cosine row's term and derivative coefficients, from one pass over its dot and norms.
template <typename scalar_t, typename acc_t>
RMM_ALWAYS_INLINE CosineRow<acc_t> cosine_sums(const scalar_t* a, const scalar_t* b, int64_t dim) {
  acc_t dot[kLanes] = {}, na[kLanes] = {}, nb[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= dim; j += kLanes) {
    for (int k = 0; k < kLanes; ++k) {
      const acc_t x = static_cast<acc_t>(a[j + k]), y = static_cast<acc_t>(b[j + k]);
      dot[k] += x * y;
      na[k] += x * x;
      nb[k] += y * y;
    }
  }
  acc_t d = 0, n2a = 0, n2b = 0;
  for (int k = 0; k < kLanes; ++k) {
    d += dot[k];
    n2a += na[k];
    n2b += nb[k];
  }
  for (; j < dim; ++j) {
    const acc_t x = static_cast<acc_t>(a[j]), y = static_cast<acc_t>(b[j]);
    d += x * y;
    n2a += x * x;
    n2b += y * y;
  }
  return cosine_row<acc_t>(d, n2a, n2b);
}

// out_a = c * dd/da, out_b = -c * dd/da of a symmetric distance (c = grad term / D); either
// nullable (the loop is unswitched on them).
template <int DIST, typename scalar_t, typename acc_t>
RMM_ALWAYS_INLINE void symmetric_grad_row(const scalar_t* a, const scalar_t* b, scalar_t* out_a,
                                          scalar_t* out_b, int64_t dim, acc_t c, acc_t beta) {
  const acc_t inv_beta = DIST == kCycleSmoothL1 ? acc_t(1) / beta : acc_t(0);
  for (int64_t j = 0; j < dim; ++j) {
    const acc_t g = cycle_elem<DIST, acc_t>(static_cast<acc_t>(a[j]), static_cast<acc_t>(b[j]),
                                            beta, inv_beta).grad * c;
    if (out_a != nullptr) out_a[j] = static_cast<scalar_t>(g);
    if (out_b != nullptr) out_b[j] = static_cast<scalar_t>(-g);
  }
}

// A cosine pair's gradients scaled by s: out_a = s dd/da, out_b = s dd/db (either nullable).
template <typename scalar_t, typename acc_t>
RMM_ALWAYS_INLINE void cosine_grad_row(const scalar_t* a, const scalar_t* b, scalar_t* out_a,
                                       scalar_t* out_b, int64_t dim, acc_t s) {
  const CosineRow<acc_t> c = cosine_sums<scalar_t, acc_t>(a, b, dim);
  const acc_t self_a = s * c.self_a, self_b = s * c.self_b, cross = s * c.cross;
  for (int64_t i = 0; i < dim; ++i) {  // the row is still in L1
    const acc_t x = static_cast<acc_t>(a[i]), y = static_cast<acc_t>(b[i]);
    if (out_a != nullptr) out_a[i] = static_cast<scalar_t>(self_a * x + cross * y);
    if (out_b != nullptr) out_b[i] = static_cast<scalar_t>(cross * x + self_b * y);
  }
}

// ---- float32 rows in AVX2 intrinsics, gradients written with streaming stores ----
// (out-of-line functions compiled for AVX2: one call per row, from either copy of the loops,
// behind the run-time check)

#if RMM_HAS_AVX2_CLONES
RMM_AVX2_INLINE void store8(float* p, __m256 v, bool stream) {
  if (stream && (reinterpret_cast<uintptr_t>(p) & 31) == 0) {
    _mm256_stream_ps(p, v);
  } else {
    _mm256_storeu_ps(p, v);
  }
}

RMM_AVX2_INLINE float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// The symmetric distances on 8 lanes: value and dd/da as cycle_elem.
template <int DIST>
RMM_AVX2_INLINE void elem8(__m256 a, __m256 b, __m256 beta, __m256 inv_beta, __m256* value,
                           __m256* grad) {
  const __m256 x = _mm256_sub_ps(a, b);
  if (DIST == kCycleMse) {
    *value = _mm256_mul_ps(x, x);
    *grad = _mm256_add_ps(x, x);
    return;
  }
  const __m256 sign_bit = _mm256_set1_ps(-0.0f);
  const __m256 ax = _mm256_andnot_ps(sign_bit, x);
  // +-1 with x's sign, 0 where x == 0
  const __m256 sign = _mm256_and_ps(_mm256_or_ps(_mm256_and_ps(x, sign_bit), _mm256_set1_ps(1.0f)),
                                    _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_NEQ_UQ));
  if (DIST == kCycleL1) {
    *value = ax;
    *grad = sign;
    return;
  }
  const __m256 quadratic = _mm256_cmp_ps(ax, beta, _CMP_LT_OQ);
  const __m256 x_over_beta = _mm256_mul_ps(x, inv_beta);
  *value = _mm256_blendv_ps(_mm256_fnmadd_ps(_mm256_set1_ps(0.5f), beta, ax),
                            _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(0.5f), x), x_over_beta),
                            quadratic);
  *grad = _mm256_blendv_ps(sign, x_over_beta, quadratic);
}

template <int DIST>
RMM_TARGET_AVX2 float symmetric_term_avx2(const float* a, const float* b, int64_t dim,
                                          float beta) {
  const __m256 vbeta = _mm256_set1_ps(beta);
  const __m256 vinv_beta = _mm256_set1_ps(DIST == kCycleSmoothL1 ? 1.0f / beta : 0.0f);
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 16 <= dim; j += 16) {
    __m256 v0, g0, v1, g1;
    elem8<DIST>(_mm256_loadu_ps(a + j), _mm256_loadu_ps(b + j), vbeta, vinv_beta, &v0, &g0);
    elem8<DIST>(_mm256_loadu_ps(a + j + 8), _mm256_loadu_ps(b + j + 8), vbeta, vinv_beta, &v1, &g1);
    acc0 = _mm256_add_ps(acc0, v0);
    acc1 = _mm256_add_ps(acc1, v1);
  }
  float sum = hsum(_mm256_add_ps(acc0, acc1));
  const float inv_beta = DIST == kCycleSmoothL1 ? 1.0f / beta : 0.0f;
  for (; j < dim; ++j) sum += cycle_elem<DIST, float>(a[j], b[j], beta, inv_beta).value;
  return sum * (1.0f / static_cast<float>(dim));
}

RMM_TARGET_AVX2 CosineRow<float> cosine_sums_avx2(const float* a, const float* b, int64_t dim) {
  __m256 dot = _mm256_setzero_ps(), na = _mm256_setzero_ps(), nb = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= dim; j += 8) {
    const __m256 x = _mm256_loadu_ps(a + j), y = _mm256_loadu_ps(b + j);
    dot = _mm256_fmadd_ps(x, y, dot);
    na = _mm256_fmadd_ps(x, x, na);
    nb = _mm256_fmadd_ps(y, y, nb);
  }
  float d = hsum(dot), n2a = hsum(na), n2b = hsum(nb);
  for (; j < dim; ++j) {
    d += a[j] * b[j];
    n2a += a[j] * a[j];
    n2b += b[j] * b[j];
  }
  return cosine_row<float>(d, n2a, n2b);
}

// symmetric_grad_row for float32: out_a = c dd/da, out_b = -out_a (the sign bit flipped).
template <int DIST>
RMM_TARGET_AVX2 void symmetric_grad_row_avx2(const float* a, const float* b, float* out_a,
                                             float* out_b, int64_t dim, float c, float beta,
                                             bool stream) {
  const __m256 vc = _mm256_set1_ps(c), sign_bit = _mm256_set1_ps(-0.0f);
  const __m256 vbeta = _mm256_set1_ps(beta);
  const __m256 vinv_beta = _mm256_set1_ps(DIST == kCycleSmoothL1 ? 1.0f / beta : 0.0f);
  int64_t j = 0;
  for (; j + 8 <= dim; j += 8) {
    __m256 value, grad;
    elem8<DIST>(_mm256_loadu_ps(a + j), _mm256_loadu_ps(b + j), vbeta, vinv_beta, &value, &grad);
    const __m256 g = _mm256_mul_ps(grad, vc);
    if (out_a != nullptr) store8(out_a + j, g, stream);
    if (out_b != nullptr) store8(out_b + j, _mm256_xor_ps(g, sign_bit), stream);
  }
  const float inv_beta = DIST == kCycleSmoothL1 ? 1.0f / beta : 0.0f;
  for (; j < dim; ++j) {
    const float g = cycle_elem<DIST, float>(a[j], b[j], beta, inv_beta).grad * c;
    if (out_a != nullptr) out_a[j] = g;
    if (out_b != nullptr) out_b[j] = -g;
  }
}

// cosine_grad_row for float32: the sums, then the gradients from the row still in L1.
RMM_TARGET_AVX2 void cosine_grad_row_avx2(const float* a, const float* b, float* out_a,
                                          float* out_b, int64_t dim, float s, bool stream) {
  const CosineRow<float> c = cosine_sums_avx2(a, b, dim);
  const float self_a = s * c.self_a, self_b = s * c.self_b, cross = s * c.cross;
  const __m256 vself_a = _mm256_set1_ps(self_a), vself_b = _mm256_set1_ps(self_b);
  const __m256 vcross = _mm256_set1_ps(cross);
  int64_t i = 0;
  for (; i + 8 <= dim; i += 8) {
    const __m256 x = _mm256_loadu_ps(a + i), y = _mm256_loadu_ps(b + i);
    if (out_a != nullptr) store8(out_a + i, _mm256_fmadd_ps(vself_a, x, _mm256_mul_ps(vcross, y)), stream);
    if (out_b != nullptr) store8(out_b + i, _mm256_fmadd_ps(vcross, x, _mm256_mul_ps(vself_b, y)), stream);
  }
  for (; i < dim; ++i) {
    if (out_a != nullptr) out_a[i] = self_a * a[i] + cross * b[i];
    if (out_b != nullptr) out_b[i] = cross * a[i] + self_b * b[i];
  }
}
#endif  // RMM_HAS_AVX2_CLONES

// ---- row loops ----

template <typename T>
RMM_ALWAYS_INLINE void zero_row(T* p, int64_t dim) {
  if (p != nullptr) std::memset(static_cast<void*>(p), 0, sizeof(T) * dim);
}

template <bool AVX2, int DIST, typename scalar_t>
RMM_ALWAYS_INLINE void forward_rows(const ForwardArgs<scalar_t>& a, int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t dim = a.dim;
  for (int64_t r = begin; r < end; ++r) {
    acc_t forward_term = acc_t(0), cycle_term = acc_t(0);
    if (a.mask == nullptr || a.mask[r]) {
      const int64_t offset = r * dim;
      const scalar_t *fp = a.forward_pred + offset, *tg = a.target + offset;
      const scalar_t *cp = a.cycle_pred + offset, *src = a.source + offset;
      bool done = false;
#if RMM_HAS_AVX2_CLONES
      if constexpr (AVX2 && std::is_same_v<scalar_t, float>) {
        if constexpr (DIST == kCycleCosine) {
          forward_term = cosine_sums_avx2(fp, tg, dim).term;
          cycle_term = cosine_sums_avx2(cp, src, dim).term;
        } else {
          forward_term = symmetric_term_avx2<DIST>(fp, tg, dim, a.beta);
          cycle_term = symmetric_term_avx2<DIST>(cp, src, dim, a.beta);
        }
        done = true;
      }
#endif
      if (!done) {
        if constexpr (DIST == kCycleCosine) {
          forward_term = cosine_sums<scalar_t, acc_t>(fp, tg, dim).term;
          cycle_term = cosine_sums<scalar_t, acc_t>(cp, src, dim).term;
        } else {
          forward_term = symmetric_term<DIST>(fp, tg, dim, a.beta);
          cycle_term = symmetric_term<DIST>(cp, src, dim, a.beta);
        }
      }
    }
    a.terms[r] = forward_term;
    a.terms[a.rows + r] = cycle_term;
  }
}

// Per row: the forward pair (forward_pred, target; grad_terms[0]) then the cycle pair
// (cycle_pred, source; grad_terms[1]); a pair none of whose gradients is wanted is not read.
template <bool AVX2, int DIST, typename scalar_t>
RMM_ALWAYS_INLINE void backward_rows(const BackwardArgs<scalar_t>& a, int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t dim = a.dim;
  const acc_t inv_dim = acc_t(1) / static_cast<acc_t>(dim);
  for (int64_t r = begin; r < end; ++r) {
    const int64_t offset = r * dim;
    auto row = [&](scalar_t* p) { return p == nullptr ? nullptr : p + offset; };
    if (a.mask != nullptr && !a.mask[r]) {
      for (int k = 0; k < 4; ++k) zero_row(row(a.out[k]), dim);
      continue;
    }
    for (int pair = 0; pair < 2; ++pair) {
      scalar_t* out_a = row(a.out[2 * pair]);
      scalar_t* out_b = row(a.out[2 * pair + 1]);
      if (out_a == nullptr && out_b == nullptr) continue;
      const acc_t s = a.grad_terms[pair * a.rows + r];
      const scalar_t* x = a.in[2 * pair] + offset;
      const scalar_t* y = a.in[2 * pair + 1] + offset;
#if RMM_HAS_AVX2_CLONES
      if constexpr (AVX2 && std::is_same_v<scalar_t, float>) {
        if constexpr (DIST == kCycleCosine) {
          cosine_grad_row_avx2(x, y, out_a, out_b, dim, s, a.stream);
        } else {
          symmetric_grad_row_avx2<DIST>(x, y, out_a, out_b, dim, s * inv_dim, a.beta, a.stream);
        }
        continue;
      }
#endif
      if constexpr (DIST == kCycleCosine) {
        cosine_grad_row<scalar_t, acc_t>(x, y, out_a, out_b, dim, s);
      } else {
        symmetric_grad_row<DIST, scalar_t, acc_t>(x, y, out_a, out_b, dim, s * inv_dim, a.beta);
      }
    }
  }
}

RMM_ALWAYS_INLINE void store_fence(bool avx2) {
#if RMM_HAS_AVX2_CLONES
  if (avx2) _mm_sfence();  // streaming stores are weakly ordered: publish before the join
#endif
  (void)avx2;
}

// The two ISA copies of each loop.
template <int DIST, typename scalar_t>
RMM_TARGET_AVX2 void forward_rows_avx2(const ForwardArgs<scalar_t>& a, int64_t b, int64_t e) {
  forward_rows<true, DIST, scalar_t>(a, b, e);
}
template <int DIST, typename scalar_t>
void forward_rows_default(const ForwardArgs<scalar_t>& a, int64_t b, int64_t e) {
  forward_rows<false, DIST, scalar_t>(a, b, e);
}
template <int DIST, typename scalar_t>
RMM_TARGET_AVX2 void backward_rows_avx2(const BackwardArgs<scalar_t>& a, int64_t b, int64_t e) {
  backward_rows<true, DIST, scalar_t>(a, b, e);
}
template <int DIST, typename scalar_t>
void backward_rows_default(const BackwardArgs<scalar_t>& a, int64_t b, int64_t e) {
  backward_rows<false, DIST, scalar_t>(a, b, e);
}

// Streaming stores pay off when what a call touches (`tensors` tensors of `like`'s size) cannot
// stay in the last-level cache anyway; below that, a normal store leaves the gradients cached
// for whatever reads them next. 32 MiB: a server's LLC share, measured on the CI machine's EPYC.
constexpr int64_t kStreamBytes = int64_t(32) << 20;
bool use_streaming_stores(const at::Tensor& like, int64_t tensors) {
  return like.numel() * static_cast<int64_t>(like.element_size()) * tensors > kStreamBytes;
}

// Enough elements per task to amortize the thread hand-off.
int64_t grain_rows(int64_t dim) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(dim, 1)); }

template <typename Fn>
void dispatch_distance(int64_t distance, Fn&& fn) {
  switch (distance) {
    case kCycleMse: fn(std::integral_constant<int, kCycleMse>{}); break;
    case kCycleL1: fn(std::integral_constant<int, kCycleL1>{}); break;
    case kCycleSmoothL1: fn(std::integral_constant<int, kCycleSmoothL1>{}); break;
    default: fn(std::integral_constant<int, kCycleCosine>{}); break;
  }
}

template <typename T>
T* data_or_null(at::Tensor& t) {
  return t.numel() == 0 ? nullptr : t.data_ptr<T>();
}
template <typename T>
const T* const_data_or_null(const at::Tensor& t) {
  return !t.defined() || t.numel() == 0 ? nullptr : t.data_ptr<T>();
}

at::Tensor cycle_loss_forward(const at::Tensor& forward_pred, const at::Tensor& target,
                              const at::Tensor& cycle_pred, const at::Tensor& source,
                              const std::optional<at::Tensor>& mask, int64_t distance,
                              double beta) {
  const CycleLossInputs in = check_cycle_loss_inputs(forward_pred, target, cycle_pred, source, mask,
                                                     distance, beta, at::kCPU);
  at::Tensor terms = empty_cycle_loss_terms(in);
  const bool avx2 = use_avx2();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, forward_pred.scalar_type(), "cycle_loss_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const ForwardArgs<scalar_t> a{in.forward_pred.data_ptr<scalar_t>(),
                                  in.target.data_ptr<scalar_t>(),
                                  in.cycle_pred.data_ptr<scalar_t>(),
                                  in.source.data_ptr<scalar_t>(),
                                  const_data_or_null<bool>(in.mask),
                                  terms.data_ptr<acc_t>(),
                                  in.rows,
                                  in.dim,
                                  static_cast<acc_t>(beta)};
    dispatch_distance(distance, [&](auto dist_tag) {
      constexpr int kDist = decltype(dist_tag)::value;
      auto body = avx2 ? forward_rows_avx2<kDist, scalar_t> : forward_rows_default<kDist, scalar_t>;
      at::parallel_for(0, in.rows, grain_rows(in.dim), [&](int64_t b, int64_t e) { body(a, b, e); });
    });
  });
  return terms;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cycle_loss_backward(
    const at::Tensor& grad_terms, const at::Tensor& forward_pred, const at::Tensor& target,
    const at::Tensor& cycle_pred, const at::Tensor& source, const std::optional<at::Tensor>& mask,
    int64_t distance, double beta, int64_t need_grad) {
  const CycleLossGradInputs g = check_cycle_loss_grad_inputs(
      grad_terms, forward_pred, target, cycle_pred, source, mask, distance, beta, need_grad,
      at::kCPU);
  const CycleLossInputs& in = g.in;
  std::array<at::Tensor, 4> out = empty_cycle_loss_grads(in, need_grad);
  if (in.rows == 0 || need_grad == 0) return {out[0], out[1], out[2], out[3]};
  const bool avx2 = use_avx2();
  // touched: the four inputs read, the wanted gradients written
  const int64_t tensors = 4 + ((need_grad & 1) + (need_grad >> 1 & 1) + (need_grad >> 2 & 1) +
                               (need_grad >> 3 & 1));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, forward_pred.scalar_type(), "cycle_loss_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const BackwardArgs<scalar_t> a{g.grad_terms.data_ptr<acc_t>(),
                                   {in.forward_pred.data_ptr<scalar_t>(),
                                    in.target.data_ptr<scalar_t>(),
                                    in.cycle_pred.data_ptr<scalar_t>(),
                                    in.source.data_ptr<scalar_t>()},
                                   const_data_or_null<bool>(in.mask),
                                   {data_or_null<scalar_t>(out[0]), data_or_null<scalar_t>(out[1]),
                                    data_or_null<scalar_t>(out[2]), data_or_null<scalar_t>(out[3])},
                                   in.rows,
                                   in.dim,
                                   static_cast<acc_t>(beta),
                                   use_streaming_stores(in.forward_pred, tensors)};
    dispatch_distance(distance, [&](auto dist_tag) {
      constexpr int kDist = decltype(dist_tag)::value;
      auto body = avx2 ? backward_rows_avx2<kDist, scalar_t> : backward_rows_default<kDist, scalar_t>;
      at::parallel_for(0, in.rows, grain_rows(in.dim), [&](int64_t b, int64_t e) {
        body(a, b, e);
        store_fence(avx2);
      });
    });
  });
  return {out[0], out[1], out[2], out[3]};
}

}  // namespace

TORCH_LIBRARY_IMPL(robustmm_C, CPU, m) {
  m.impl("cycle_loss_forward", &cycle_loss_forward);
  m.impl("cycle_loss_backward", &cycle_loss_backward);
}

}  // namespace cpu
}  // namespace robustmm
