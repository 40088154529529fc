// cycle_reconstruction_loss on the CPU: the forward reads the four tensors once and writes each
// row's two terms and, for training, each row distance's derivatives; the backward scales the
// derivatives by the upstream gradient of the row's term. Parallel over rows (at::parallel_for).
// The math is csrc/include/robustmm/cycle_loss.h.
//
// Vectorization: the float32 path on AVX2+FMA machines is written in intrinsics, so that
// freshly written tensors (the derivatives, and the backward's second gradient) can go out as
// streaming stores that bypass the cache when the call's tensors would not fit in it anyway: a
// normal store first reads the line it writes, so streaming halves a written tensor's traffic.
// Other dtypes and the baseline ISA run the scalar template, which gcc vectorizes.
// ROBUSTMM_CPU_CAPABILITY=default forces the baseline copy.
//
// Excluded rows (mask False) are never read: their terms and derivatives are written as 0.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
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
  acc_t* terms;                  // (2, rows)
  acc_t* grad_forward;           // (rows, dim); null without need_grad
  acc_t* grad_target;            // (rows, dim); cosine only
  acc_t* grad_cycle;             // (rows, dim); null without need_grad
  acc_t* grad_source;            // (rows, dim); cosine only
  int64_t rows;
  int64_t dim;
  acc_t beta;
  bool stream;  // streaming stores (see use_streaming_stores)
};

template <typename scalar_t>
struct BackwardArgs {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t* grad_terms;    // (2, rows)
  const acc_t* grad_forward;  // (rows, dim)
  const acc_t* grad_target;   // (rows, dim); cosine only
  const acc_t* grad_cycle;    // (rows, dim)
  const acc_t* grad_source;   // (rows, dim); cosine only
  const bool* mask;           // (rows,); nullable
  scalar_t* out[4];           // d forward_pred, d target, d cycle_pred, d source; nullable each
  int64_t rows;
  int64_t dim;
  bool stream;
};

// ---- scalar rows (every dtype; gcc vectorizes the loops) ----

// Sum over the row with independent lanes so the loop vectorizes without -ffast-math.
constexpr int kLanes = 16;

// A symmetric distance's row: returns its term, writes dd/da into g (when non-null).
template <int DIST, typename scalar_t, typename acc_t>
RMM_ALWAYS_INLINE acc_t symmetric_row(const scalar_t* a, const scalar_t* b, acc_t* g, int64_t dim,
                                      acc_t beta) {
  const acc_t inv_beta = DIST == kCycleSmoothL1 ? acc_t(1) / beta : acc_t(0);
  const acc_t inv_dim = acc_t(1) / static_cast<acc_t>(dim);
  acc_t lanes[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= dim; j += kLanes) {
    for (int k = 0; k < kLanes; ++k) {
      const CycleElem<acc_t> e = cycle_elem<DIST, acc_t>(
          static_cast<acc_t>(a[j + k]), static_cast<acc_t>(b[j + k]), beta, inv_beta);
      lanes[k] += e.value;
      if (g != nullptr) g[j + k] = e.grad * inv_dim;
    }
  }
  acc_t sum = 0;
  for (int k = 0; k < kLanes; ++k) sum += lanes[k];
  for (; j < dim; ++j) {
    const CycleElem<acc_t> e =
        cycle_elem<DIST, acc_t>(static_cast<acc_t>(a[j]), static_cast<acc_t>(b[j]), beta, inv_beta);
    sum += e.value;
    if (g != nullptr) g[j] = e.grad * inv_dim;
  }
  return sum * inv_dim;
}

template <typename scalar_t, typename acc_t>
RMM_ALWAYS_INLINE acc_t cosine_row_scalar(const scalar_t* a, const scalar_t* b, acc_t* ga, acc_t* gb,
                                          int64_t dim) {
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
  const CosineRow<acc_t> c = cosine_row<acc_t>(d, n2a, n2b);
  if (ga != nullptr) {
    for (int64_t i = 0; i < dim; ++i) {
      const acc_t x = static_cast<acc_t>(a[i]), y = static_cast<acc_t>(b[i]);
      ga[i] = c.self_a * x + c.cross * y;
      gb[i] = c.cross * x + c.self_b * y;
    }
  }
  return c.term;
}

// ---- float32 rows in AVX2 intrinsics, derivatives written with streaming stores ----
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
RMM_TARGET_AVX2 float symmetric_row_avx2(const float* a, const float* b, float* g, int64_t dim,
                                         float beta, bool stream) {
  const float inv_dim = 1.0f / static_cast<float>(dim);
  const __m256 vbeta = _mm256_set1_ps(beta);
  const __m256 vinv_beta = _mm256_set1_ps(DIST == kCycleSmoothL1 ? 1.0f / beta : 0.0f);
  const __m256 vinv_dim = _mm256_set1_ps(inv_dim);
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 16 <= dim; j += 16) {
    __m256 v0, g0, v1, g1;
    elem8<DIST>(_mm256_loadu_ps(a + j), _mm256_loadu_ps(b + j), vbeta, vinv_beta, &v0, &g0);
    elem8<DIST>(_mm256_loadu_ps(a + j + 8), _mm256_loadu_ps(b + j + 8), vbeta, vinv_beta, &v1, &g1);
    acc0 = _mm256_add_ps(acc0, v0);
    acc1 = _mm256_add_ps(acc1, v1);
    if (g != nullptr) {
      store8(g + j, _mm256_mul_ps(g0, vinv_dim), stream);
      store8(g + j + 8, _mm256_mul_ps(g1, vinv_dim), stream);
    }
  }
  float sum = hsum(_mm256_add_ps(acc0, acc1));
  const float inv_beta = DIST == kCycleSmoothL1 ? 1.0f / beta : 0.0f;
  for (; j < dim; ++j) {
    const CycleElem<float> e = cycle_elem<DIST, float>(a[j], b[j], beta, inv_beta);
    sum += e.value;
    if (g != nullptr) g[j] = e.grad * inv_dim;
  }
  return sum * inv_dim;
}

RMM_TARGET_AVX2 float cosine_row_avx2(const float* a, const float* b, float* ga, float* gb,
                                      int64_t dim, bool stream) {
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
  const CosineRow<float> c = cosine_row<float>(d, n2a, n2b);
  if (ga != nullptr) {
    const __m256 self_a = _mm256_set1_ps(c.self_a), self_b = _mm256_set1_ps(c.self_b);
    const __m256 cross = _mm256_set1_ps(c.cross);
    int64_t i = 0;
    for (; i + 8 <= dim; i += 8) {  // the row is still in L1
      const __m256 x = _mm256_loadu_ps(a + i), y = _mm256_loadu_ps(b + i);
      store8(ga + i, _mm256_fmadd_ps(self_a, x, _mm256_mul_ps(cross, y)), stream);
      store8(gb + i, _mm256_fmadd_ps(cross, x, _mm256_mul_ps(self_b, y)), stream);
    }
    for (; i < dim; ++i) {
      ga[i] = c.self_a * a[i] + c.cross * b[i];
      gb[i] = c.cross * a[i] + c.self_b * b[i];
    }
  }
  return c.term;
}

// out_pos = s * g, out_neg = -s * g (either nullable).
RMM_TARGET_AVX2 void scale_row_avx2(const float* g, float s, float* out_pos, float* out_neg,
                                    int64_t dim, bool stream) {
  const __m256 vs = _mm256_set1_ps(s), vneg = _mm256_set1_ps(-s);
  int64_t j = 0;
  for (; j + 8 <= dim; j += 8) {
    const __m256 v = _mm256_loadu_ps(g + j);
    if (out_pos != nullptr) store8(out_pos + j, _mm256_mul_ps(vs, v), stream);
    if (out_neg != nullptr) store8(out_neg + j, _mm256_mul_ps(vneg, v), stream);
  }
  for (; j < dim; ++j) {
    if (out_pos != nullptr) out_pos[j] = s * g[j];
    if (out_neg != nullptr) out_neg[j] = -s * g[j];
  }
}
// g = s * g in place; with `other`, first other = -s * g (the symmetric distances' second
// gradient, a fresh buffer: streamed).
RMM_TARGET_AVX2 void scale_row_inplace_avx2(float* g, float s, float* other, int64_t dim,
                                            bool stream) {
  const __m256 vs = _mm256_set1_ps(s), vneg = _mm256_set1_ps(-s);
  int64_t j = 0;
  for (; j + 8 <= dim; j += 8) {
    const __m256 v = _mm256_loadu_ps(g + j);
    if (other != nullptr) store8(other + j, _mm256_mul_ps(vneg, v), stream);
    _mm256_storeu_ps(g + j, _mm256_mul_ps(vs, v));
  }
  for (; j < dim; ++j) {
    if (other != nullptr) other[j] = -s * g[j];
    g[j] = s * g[j];
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
    const int64_t offset = r * dim;
    auto row = [&](acc_t* p) { return p == nullptr ? nullptr : p + offset; };
    if (a.mask != nullptr && !a.mask[r]) {
      a.terms[r] = acc_t(0);
      a.terms[a.rows + r] = acc_t(0);
      zero_row(row(a.grad_forward), dim);
      zero_row(row(a.grad_target), dim);
      zero_row(row(a.grad_cycle), dim);
      zero_row(row(a.grad_source), dim);
      continue;
    }
    const scalar_t *fp = a.forward_pred + offset, *tg = a.target + offset;
    const scalar_t *cp = a.cycle_pred + offset, *src = a.source + offset;
    acc_t forward_term, cycle_term;
#if RMM_HAS_AVX2_CLONES
    if constexpr (AVX2 && std::is_same_v<scalar_t, float>) {
      if constexpr (DIST == kCycleCosine) {
        forward_term = cosine_row_avx2(fp, tg, row(a.grad_forward), row(a.grad_target), dim, a.stream);
        cycle_term = cosine_row_avx2(cp, src, row(a.grad_cycle), row(a.grad_source), dim, a.stream);
      } else {
        forward_term = symmetric_row_avx2<DIST>(fp, tg, row(a.grad_forward), dim, a.beta, a.stream);
        cycle_term = symmetric_row_avx2<DIST>(cp, src, row(a.grad_cycle), dim, a.beta, a.stream);
      }
      a.terms[r] = forward_term;
      a.terms[a.rows + r] = cycle_term;
      continue;
    }
#endif
    if constexpr (DIST == kCycleCosine) {
      forward_term = cosine_row_scalar(fp, tg, row(a.grad_forward), row(a.grad_target), dim);
      cycle_term = cosine_row_scalar(cp, src, row(a.grad_cycle), row(a.grad_source), dim);
    } else {
      forward_term = symmetric_row<DIST>(fp, tg, row(a.grad_forward), dim, a.beta);
      cycle_term = symmetric_row<DIST>(cp, src, row(a.grad_cycle), dim, a.beta);
    }
    a.terms[r] = forward_term;
    a.terms[a.rows + r] = cycle_term;
  }
}

// d forward_pred / d target from the forward pair's derivatives (k = 0), d cycle_pred /
// d source from the cycle pair's (k = 1). Symmetric distances: the second is -first.
template <bool AVX2, bool COSINE, typename scalar_t>
RMM_ALWAYS_INLINE void backward_rows(const BackwardArgs<scalar_t>& a, int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t dim = a.dim;
  for (int64_t r = begin; r < end; ++r) {
    const int64_t offset = r * dim;
    auto row = [&](scalar_t* p) { return p == nullptr ? nullptr : p + offset; };
    if (a.mask != nullptr && !a.mask[r]) {
      for (int k = 0; k < 4; ++k) zero_row(row(a.out[k]), dim);
      continue;
    }
    for (int pair = 0; pair < 2; ++pair) {
      const acc_t s = a.grad_terms[pair * a.rows + r];
      const acc_t* g = (pair == 0 ? a.grad_forward : a.grad_cycle) + offset;
      scalar_t* out_a = row(a.out[2 * pair]);
      scalar_t* out_b = row(a.out[2 * pair + 1]);
      if constexpr (COSINE) {
        const acc_t* gb = (pair == 0 ? a.grad_target : a.grad_source) + offset;
        if (out_a != nullptr) {
          for (int64_t j = 0; j < dim; ++j) out_a[j] = static_cast<scalar_t>(s * g[j]);
        }
        if (out_b != nullptr) {
          for (int64_t j = 0; j < dim; ++j) out_b[j] = static_cast<scalar_t>(s * gb[j]);
        }
        continue;
      }
#if RMM_HAS_AVX2_CLONES
      if constexpr (AVX2 && std::is_same_v<scalar_t, float>) {
        scale_row_avx2(g, s, out_a, out_b, dim, a.stream);
        continue;
      }
#endif
      if (out_a != nullptr) {
        for (int64_t j = 0; j < dim; ++j) out_a[j] = static_cast<scalar_t>(s * g[j]);
      }
      if (out_b != nullptr) {
        for (int64_t j = 0; j < dim; ++j) out_b[j] = static_cast<scalar_t>(-s * g[j]);
      }
    }
  }
}

template <typename T>
struct ScaleArgs {
  const T* grad_terms;  // (2, rows)
  T* first[2];          // per pair: the buffer scaled in place (null: neither gradient wanted)
  T* second[2];         // per pair: a second output, null when not wanted
  T sign[2];            // per pair: -1 when the first buffer becomes the negated gradient
  bool cosine;          // second is scaled in place too (it holds its own derivative)
  const bool* mask;
  int64_t rows;
  int64_t dim;
  bool stream;
};

template <bool AVX2, typename T>
RMM_ALWAYS_INLINE void scale_rows(const ScaleArgs<T>& a, int64_t begin, int64_t end) {
  const int64_t dim = a.dim;
  for (int64_t r = begin; r < end; ++r) {
    const int64_t offset = r * dim;
    const bool excluded = a.mask != nullptr && !a.mask[r];
    for (int pair = 0; pair < 2; ++pair) {
      T* g = a.first[pair] == nullptr ? nullptr : a.first[pair] + offset;
      T* other = a.second[pair] == nullptr ? nullptr : a.second[pair] + offset;
      if (excluded) {  // the forward already zeroed the derivatives: only `other` is new
        if (!a.cosine) zero_row(other, dim);
        continue;
      }
      const T s = a.sign[pair] * a.grad_terms[pair * a.rows + r];
      if (a.cosine) {
        if (g != nullptr) for (int64_t j = 0; j < dim; ++j) g[j] *= s;
        if (other != nullptr) for (int64_t j = 0; j < dim; ++j) other[j] *= s;
        continue;
      }
      if (g == nullptr) continue;
#if RMM_HAS_AVX2_CLONES
      if constexpr (AVX2 && std::is_same_v<T, float>) {
        scale_row_inplace_avx2(g, s, other, dim, a.stream);
        continue;
      }
#endif
      for (int64_t j = 0; j < dim; ++j) {
        if (other != nullptr) other[j] = -s * g[j];
        g[j] = s * g[j];
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
template <bool COSINE, typename scalar_t>
RMM_TARGET_AVX2 void backward_rows_avx2(const BackwardArgs<scalar_t>& a, int64_t b, int64_t e) {
  backward_rows<true, COSINE, scalar_t>(a, b, e);
}
template <bool COSINE, typename scalar_t>
void backward_rows_default(const BackwardArgs<scalar_t>& a, int64_t b, int64_t e) {
  backward_rows<false, COSINE, scalar_t>(a, b, e);
}

template <typename T>
RMM_TARGET_AVX2 void scale_rows_avx2(const ScaleArgs<T>& a, int64_t b, int64_t e) {
  scale_rows<true, T>(a, b, e);
}
template <typename T>
void scale_rows_default(const ScaleArgs<T>& a, int64_t b, int64_t e) {
  scale_rows<false, T>(a, b, e);
}

// Streaming stores pay off when what a call touches (`tensors` tensors of `like`'s size) cannot
// stay in the last-level cache anyway; below that, a normal store leaves the derivatives
// cached for the backward. 32 MiB: a server's LLC share, measured on the CI machine's EPYC.
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

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> cycle_loss_forward(
    const at::Tensor& forward_pred, const at::Tensor& target, const at::Tensor& cycle_pred,
    const at::Tensor& source, const std::optional<at::Tensor>& mask, int64_t distance, double beta,
    bool need_grad) {
  const CycleLossInputs in = check_cycle_loss_inputs(forward_pred, target, cycle_pred, source, mask,
                                                     distance, beta, at::kCPU);
  auto outputs = empty_cycle_loss_outputs(in, distance, need_grad);
  at::Tensor& terms = std::get<0>(outputs);
  at::Tensor& grad_forward = std::get<1>(outputs);
  at::Tensor& grad_target = std::get<2>(outputs);
  at::Tensor& grad_cycle = std::get<3>(outputs);
  at::Tensor& grad_source = std::get<4>(outputs);
  const bool avx2 = use_avx2();
  const bool cosine = distance == kCycleCosine;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, forward_pred.scalar_type(), "cycle_loss_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const ForwardArgs<scalar_t> a{in.forward_pred.data_ptr<scalar_t>(),
                                  in.target.data_ptr<scalar_t>(),
                                  in.cycle_pred.data_ptr<scalar_t>(),
                                  in.source.data_ptr<scalar_t>(),
                                  const_data_or_null<bool>(in.mask),
                                  terms.data_ptr<acc_t>(),
                                  data_or_null<acc_t>(grad_forward),
                                  data_or_null<acc_t>(grad_target),
                                  data_or_null<acc_t>(grad_cycle),
                                  data_or_null<acc_t>(grad_source),
                                  in.rows,
                                  in.dim,
                                  static_cast<acc_t>(beta),
                                  use_streaming_stores(in.forward_pred, cosine ? 8 : 6)};
    dispatch_distance(distance, [&](auto dist_tag) {
      constexpr int kDist = decltype(dist_tag)::value;
      auto body = avx2 ? forward_rows_avx2<kDist, scalar_t> : forward_rows_default<kDist, scalar_t>;
      at::parallel_for(0, in.rows, grain_rows(in.dim), [&](int64_t b, int64_t e) {
        body(a, b, e);
        store_fence(avx2);
      });
    });
  });
  return outputs;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cycle_loss_backward(
    const at::Tensor& grad_terms, const at::Tensor& grad_forward, const at::Tensor& grad_target,
    const at::Tensor& grad_cycle, const at::Tensor& grad_source,
    const std::optional<at::Tensor>& mask, int64_t distance, int64_t need_grad,
    at::ScalarType dtype) {
  const CycleLossGradInputs in = check_cycle_loss_grad_inputs(
      grad_terms, grad_forward, grad_target, grad_cycle, grad_source, mask, distance, need_grad,
      dtype, at::kCPU);
  std::array<at::Tensor, 4> out = empty_cycle_loss_grads(in, need_grad, dtype);
  const bool avx2 = use_avx2();
  const bool cosine = distance == kCycleCosine;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "cycle_loss_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    BackwardArgs<scalar_t> a{in.grad_terms.data_ptr<acc_t>(),
                             in.grad_forward.data_ptr<acc_t>(),
                             cosine ? in.grad_target.data_ptr<acc_t>() : nullptr,
                             in.grad_cycle.data_ptr<acc_t>(),
                             cosine ? in.grad_source.data_ptr<acc_t>() : nullptr,
                             const_data_or_null<bool>(in.mask),
                             {data_or_null<scalar_t>(out[0]), data_or_null<scalar_t>(out[1]),
                              data_or_null<scalar_t>(out[2]), data_or_null<scalar_t>(out[3])},
                             in.rows,
                             in.dim,
                             use_streaming_stores(in.grad_forward, cosine ? 8 : 6)};
    auto run = [&](auto cosine_tag) {
      constexpr bool kCosine = decltype(cosine_tag)::value;
      auto body = avx2 ? backward_rows_avx2<kCosine, scalar_t> : backward_rows_default<kCosine, scalar_t>;
      at::parallel_for(0, in.rows, grain_rows(in.dim), [&](int64_t b, int64_t e) {
        body(a, b, e);
        store_fence(avx2);
      });
    };
    if (cosine) {
      run(std::true_type{});
    } else {
      run(std::false_type{});
    }
  });
  return {out[0], out[1], out[2], out[3]};
}

// cycle_loss_backward for float32/float64 in place: the forward's derivative buffers become the
// gradients, so the backward allocates only the symmetric distances' second gradient. For each
// pair (forward: grad_forward / grad_target, need_grad bits 1 / 2; cycle: grad_cycle /
// grad_source, bits 4 / 8) with s = grad_terms[pair, r]:
//   cosine     grad_forward *= s, grad_target *= s (each where wanted)
//   symmetric  both wanted: grad_target = -s * grad_forward (grad_target: a buffer the caller
//              allocated), then grad_forward *= s; only the first: grad_forward *= s; only the
//              second: grad_forward *= -s (the caller returns it as target's gradient).
// Excluded rows become 0 (the derivative buffers must come from cycle_loss_forward, which
// zeroed them there; only the caller's fresh buffer is written).
void cycle_loss_scale_(const at::Tensor& grad_terms, at::Tensor& grad_forward,
                       at::Tensor& grad_target, at::Tensor& grad_cycle, at::Tensor& grad_source,
                       const std::optional<at::Tensor>& mask, int64_t distance, int64_t need_grad) {
  const at::ScalarType dtype = grad_forward.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble,
                   "robustmm: cycle_loss_scale_ scales float32/float64 buffers, got ", dtype);
  const CycleLossGradInputs in = check_cycle_loss_grad_inputs(
      grad_terms, grad_forward, grad_target, grad_cycle, grad_source, mask, distance, need_grad,
      dtype, at::kCPU);
  const bool cosine = distance == kCycleCosine;
  at::Tensor* buffers[4] = {&grad_forward, &grad_target, &grad_cycle, &grad_source};
  for (int k = 0; k < 4; ++k) {
    TORCH_CHECK(buffers[k]->numel() == 0 || buffers[k]->is_contiguous(),
                "robustmm: cycle_loss_scale_ needs contiguous buffers");
  }
  const bool avx2 = use_avx2();
  AT_DISPATCH_FLOATING_TYPES(dtype, "cycle_loss_scale_", [&] {
    ScaleArgs<scalar_t> a{};
    a.grad_terms = in.grad_terms.data_ptr<scalar_t>();
    a.cosine = cosine;
    a.mask = const_data_or_null<bool>(in.mask);
    a.rows = in.rows;
    a.dim = in.dim;
    a.stream = use_streaming_stores(in.grad_forward, 6);
    for (int pair = 0; pair < 2; ++pair) {
      const bool want_a = (need_grad >> (2 * pair)) & 1, want_b = (need_grad >> (2 * pair + 1)) & 1;
      at::Tensor& g = *buffers[2 * pair];
      at::Tensor& other = *buffers[2 * pair + 1];
      a.sign[pair] = scalar_t(1);
      if (cosine) {
        a.first[pair] = want_a ? g.data_ptr<scalar_t>() : nullptr;
        a.second[pair] = want_b ? other.data_ptr<scalar_t>() : nullptr;
        continue;
      }
      a.first[pair] = want_a || want_b ? g.data_ptr<scalar_t>() : nullptr;
      a.second[pair] = nullptr;
      if (want_a && want_b) {
        TORCH_CHECK_VALUE(other.sizes() == g.sizes(), "robustmm: cycle_loss_scale_ needs a ",
                          g.sizes(), " buffer for the second gradient of pair ", pair, ", got ",
                          other.sizes());
        a.second[pair] = other.data_ptr<scalar_t>();
      } else if (want_b) {
        a.sign[pair] = scalar_t(-1);
      }
    }
    auto body = avx2 ? scale_rows_avx2<scalar_t> : scale_rows_default<scalar_t>;
    at::parallel_for(0, in.rows, grain_rows(in.dim), [&](int64_t b, int64_t e) {
      body(a, b, e);
      store_fence(avx2);
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(robustmm_C, CPU, m) {
  m.impl("cycle_loss_forward", &cycle_loss_forward);
  m.impl("cycle_loss_backward", &cycle_loss_backward);
  m.impl("cycle_loss_scale_", &cycle_loss_scale_);
}

}  // namespace cpu
}  // namespace robustmm
