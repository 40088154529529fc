// reparameterize_kl on the CPU: one fused pass forward (z and each row's KL) and one fused pass
// backward (all input gradients), parallel over rows with at::parallel_for.
//
// Vectorization: the per-element math (csrc/include/robustmm) is branch-free, so gcc vectorizes
// the inner loops. The hot loops are compiled twice, for baseline x86-64 and for AVX2+FMA, and
// the AVX2 copy is picked at run time when the CPU has it (no -march=native needed).
// ROBUSTMM_CPU_CAPABILITY=default forces the baseline copy (tests use it to cover both).
//
// In-kernel eps: element i of the flattened tensor gets randn_at(seed, i) (robustmm/philox.h),
// regenerated in the backward instead of being stored.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "robustmm/checks.h"
#include "robustmm/cpu_capability.h"
#include "robustmm/philox.h"
#include "robustmm/reparam_kl.h"
#include "robustmm/reparam_kl_inputs.h"
#include "vec_avx2.h"

namespace robustmm {
namespace cpu {
namespace {

// Elements handled per inner block; a multiple of 4 so Philox counters stay aligned.
constexpr int64_t kBlock = 512;

template <typename scalar_t>
struct ForwardArgs {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* mu;
  const scalar_t* logvar;
  const scalar_t* eps;           // kGivenNoise only
  const scalar_t* prior_mu;      // PRIOR only
  const scalar_t* prior_logvar;  // PRIOR only
  const bool* mask;              // nullable: rows, True = include
  scalar_t* z;
  acc_t* kl;                     // rows
  int64_t dim;
  uint64_t seed;
};

template <typename scalar_t>
struct BackwardArgs {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* grad_z;
  const acc_t* grad_kl;  // rows
  const scalar_t* mu;
  const scalar_t* logvar;
  const scalar_t* eps;
  const scalar_t* prior_mu;
  const scalar_t* prior_logvar;
  const bool* mask;
  scalar_t* grad_mu;
  scalar_t* grad_logvar;
  scalar_t* grad_eps;           // nullable
  scalar_t* grad_prior_mu;      // nullable
  scalar_t* grad_prior_logvar;  // nullable
  int64_t dim;
  uint64_t seed;
};

// eps of flat indices [first, first + n) into buf (4 * (n / 4 + 2) floats); returns the
// pointer to the first one. Whole Philox counters are generated, so the vectorizer sees a
// plain loop over counters. Kept out of line, one copy per ISA: inlined into the kernel body
// gcc stops vectorizing it.
RMM_ALWAYS_INLINE void philox_counters(uint64_t seed, int64_t counter_begin, int64_t counters,
                                       float* buf) {
  for (int64_t c = 0; c < counters; ++c) {
    const Normal4 r = randn4x(seed, static_cast<uint64_t>(counter_begin + c));
    buf[4 * c + 0] = r.n0;
    buf[4 * c + 1] = r.n1;
    buf[4 * c + 2] = r.n2;
    buf[4 * c + 3] = r.n3;
  }
}
__attribute__((noinline)) RMM_TARGET_AVX2 void philox_counters_avx2(uint64_t seed, int64_t begin,
                                                                    int64_t count, float* buf) {
  int64_t c = 0;
#if RMM_HAS_AVX2_CLONES
  constexpr int64_t kStep = avx2::kGroups * 8;
  if (count >= kStep) {
    const avx2::PhiloxKeys keys = avx2::philox_keys(seed);
    for (; c + kStep <= count; c += kStep) {
      avx2::randn_counters(keys, static_cast<uint64_t>(begin + c), buf + 4 * c);
    }
  }
#endif
  philox_counters(seed, begin + c, count - c, buf + 4 * c);
}
__attribute__((noinline)) void philox_counters_default(uint64_t seed, int64_t begin, int64_t count,
                                                       float* buf) {
  philox_counters(seed, begin, count, buf);
}

template <bool AVX2>
RMM_ALWAYS_INLINE const float* philox_block(uint64_t seed, int64_t first, int64_t n, float* buf) {
  const int64_t counter_begin = first >> 2;
  const int64_t counters = ((first + n + 3) >> 2) - counter_begin;
  if constexpr (AVX2) {
    philox_counters_avx2(seed, counter_begin, counters, buf);
  } else {
    philox_counters_default(seed, counter_begin, counters, buf);
  }
  return buf + (first & 3);
}

// Sum with 16 independent lanes so the loop vectorizes without -ffast-math.
template <typename acc_t>
RMM_ALWAYS_INLINE acc_t sum_block(const acc_t* x, int64_t n) {
  constexpr int kLanes = 16;
  acc_t lanes[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int k = 0; k < kLanes; ++k) lanes[k] += x[j + k];
  }
  acc_t total = 0;
  for (int k = 0; k < kLanes; ++k) total += lanes[k];
  for (; j < n; ++j) total += x[j];
  return total;
}

#if RMM_HAS_AVX2_CLONES
RMM_AVX2_INLINE float hsum(__m256 v) {
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  x = _mm_add_ss(x, _mm_movehdup_ps(x));
  return _mm_cvtss_f32(x);
}

// Out of line (not always_inline): the generic row loop that calls it is compiled for the
// baseline ISA before being inlined into its AVX2 copy.
// Elements [0, n) of a float row chunk starting at flat index `at`, n a multiple of 8: writes z,
// returns the chunk's KL. The math of reparam_kl_forward_elem, 8 lanes at a time.
template <int NOISE, bool PRIOR>
RMM_TARGET_AVX2 float forward_chunk_avx2(const ForwardArgs<float>& a, int64_t at, int64_t n,
                                         const float* drawn) {
  const __m256 half = _mm256_set1_ps(0.5f), one = _mm256_set1_ps(1.0f);
  __m256 acc = _mm256_setzero_ps();
  for (int64_t j = 0; j < n; j += 8) {
    const __m256 m = _mm256_loadu_ps(a.mu + at + j);
    const __m256 lv = _mm256_loadu_ps(a.logvar + at + j);
    const __m256 sigma = avx2::exp(_mm256_mul_ps(half, lv));
    __m256 z = m;
    if constexpr (NOISE == kGivenNoise) z = _mm256_fmadd_ps(sigma, _mm256_loadu_ps(a.eps + at + j), m);
    if constexpr (NOISE == kPhiloxNoise) z = _mm256_fmadd_ps(sigma, _mm256_loadu_ps(drawn + j), m);
    _mm256_storeu_ps(a.z + at + j, z);
    __m256 term;
    if constexpr (PRIOR) {
      const __m256 plv = _mm256_loadu_ps(a.prior_logvar + at + j);
      const __m256 diff = _mm256_sub_ps(m, _mm256_loadu_ps(a.prior_mu + at + j));
      term = _mm256_add_ps(_mm256_sub_ps(plv, lv), avx2::exp(_mm256_sub_ps(lv, plv)));
      term = _mm256_fmadd_ps(_mm256_mul_ps(diff, diff), avx2::exp(_mm256_sub_ps(_mm256_setzero_ps(), plv)), term);
      term = _mm256_sub_ps(term, one);
    } else {
      term = _mm256_fmadd_ps(sigma, sigma, _mm256_fmsub_ps(m, m, _mm256_add_ps(one, lv)));
    }
    acc = _mm256_fmadd_ps(half, term, acc);
  }
  return hsum(acc);
}

// Elements [0, n) of a float row chunk, n a multiple of 8: dmu and dlogvar, as
// reparam_kl_backward_elem.
template <int NOISE, bool PRIOR>
RMM_TARGET_AVX2 void backward_chunk_avx2(const BackwardArgs<float>& a, float gk_scalar, int64_t at,
                                         int64_t n, const float* drawn) {
  const __m256 half = _mm256_set1_ps(0.5f), one = _mm256_set1_ps(1.0f);
  const __m256 gk = _mm256_set1_ps(gk_scalar);
  for (int64_t j = 0; j < n; j += 8) {
    const __m256 gz = _mm256_loadu_ps(a.grad_z + at + j);
    const __m256 m = _mm256_loadu_ps(a.mu + at + j);
    const __m256 lv = _mm256_loadu_ps(a.logvar + at + j);
    const __m256 sigma = avx2::exp(_mm256_mul_ps(half, lv));
    __m256 z_term = _mm256_setzero_ps();
    if constexpr (NOISE == kGivenNoise) {
      z_term = _mm256_mul_ps(_mm256_mul_ps(gz, _mm256_loadu_ps(a.eps + at + j)), sigma);
    }
    if constexpr (NOISE == kPhiloxNoise) {
      z_term = _mm256_mul_ps(_mm256_mul_ps(gz, _mm256_loadu_ps(drawn + j)), sigma);
    }
    __m256 dmu, ratio;
    if constexpr (PRIOR) {
      const __m256 plv = _mm256_loadu_ps(a.prior_logvar + at + j);
      const __m256 diff = _mm256_sub_ps(m, _mm256_loadu_ps(a.prior_mu + at + j));
      const __m256 inv_prior_var = avx2::exp(_mm256_sub_ps(_mm256_setzero_ps(), plv));
      ratio = avx2::exp(_mm256_sub_ps(lv, plv));
      dmu = _mm256_fmadd_ps(_mm256_mul_ps(gk, diff), inv_prior_var, gz);
    } else {
      ratio = _mm256_mul_ps(sigma, sigma);
      dmu = _mm256_fmadd_ps(gk, m, gz);
    }
    const __m256 dlv = _mm256_mul_ps(half, _mm256_fmadd_ps(gk, _mm256_sub_ps(ratio, one), z_term));
    _mm256_storeu_ps(a.grad_mu + at + j, dmu);
    _mm256_storeu_ps(a.grad_logvar + at + j, dlv);
  }
}
#endif

template <bool AVX2, typename scalar_t, int NOISE, bool PRIOR>
RMM_ALWAYS_INLINE void forward_rows(const ForwardArgs<scalar_t>& a, int64_t row_begin,
                                    int64_t row_end) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kSample = NOISE != kNoNoise;
  alignas(64) float noise[kBlock + 8];
  alignas(64) acc_t kl_terms[kBlock];
  const int64_t dim = a.dim;
  for (int64_t row = row_begin; row < row_end; ++row) {
    const int64_t base = row * dim;
    if (a.mask != nullptr && !a.mask[row]) {
      std::fill_n(a.z + base, dim, scalar_t(0));
      a.kl[row] = acc_t(0);
      continue;
    }
    acc_t kl_row = 0;
    for (int64_t start = 0; start < dim; start += kBlock) {
      const int64_t n = std::min(kBlock, dim - start);
      const int64_t at = base + start;
      const float* drawn = NOISE == kPhiloxNoise ? philox_block<AVX2>(a.seed, at, n, noise) : nullptr;
      int64_t vectorized = 0;
#if RMM_HAS_AVX2_CLONES
      if constexpr (AVX2 && std::is_same_v<scalar_t, float>) {
        vectorized = n & ~int64_t(7);
        kl_row += forward_chunk_avx2<NOISE, PRIOR>(a, at, vectorized, drawn);
      }
#endif
      for (int64_t j = vectorized; j < n; ++j) {
        const acc_t m = static_cast<acc_t>(a.mu[at + j]);
        const acc_t lv = static_cast<acc_t>(a.logvar[at + j]);
        acc_t e = acc_t(0);
        if constexpr (NOISE == kGivenNoise) e = static_cast<acc_t>(a.eps[at + j]);
        if constexpr (NOISE == kPhiloxNoise) e = static_cast<acc_t>(drawn[j]);
        ReparamKLForward<acc_t> out;
        if constexpr (PRIOR) {
          out = reparam_kl_forward_elem<acc_t>(kSample, m, lv, e,
                                               static_cast<acc_t>(a.prior_mu[at + j]),
                                               static_cast<acc_t>(a.prior_logvar[at + j]));
        } else {
          out = reparam_kl_forward_elem<acc_t>(kSample, m, lv, e);
        }
        a.z[at + j] = static_cast<scalar_t>(out.z);
        kl_terms[j - vectorized] = out.kl;
      }
      kl_row += sum_block(kl_terms, n - vectorized);
    }
    a.kl[row] = kl_row;
  }
}

template <bool AVX2, typename scalar_t, int NOISE, bool PRIOR>
RMM_ALWAYS_INLINE void backward_rows(const BackwardArgs<scalar_t>& a, int64_t row_begin,
                                     int64_t row_end) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kSample = NOISE != kNoNoise;
  alignas(64) float noise[kBlock + 8];
  const int64_t dim = a.dim;
  scalar_t* const outputs[] = {a.grad_mu, a.grad_logvar, a.grad_eps, a.grad_prior_mu,
                               a.grad_prior_logvar};
  for (int64_t row = row_begin; row < row_end; ++row) {
    const int64_t base = row * dim;
    if (a.mask != nullptr && !a.mask[row]) {
      for (scalar_t* out : outputs) {
        if (out != nullptr) std::fill_n(out + base, dim, scalar_t(0));
      }
      continue;
    }
    const acc_t gk = a.grad_kl[row];
    for (int64_t start = 0; start < dim; start += kBlock) {
      const int64_t n = std::min(kBlock, dim - start);
      const int64_t at = base + start;
      const float* drawn = NOISE == kPhiloxNoise ? philox_block<AVX2>(a.seed, at, n, noise) : nullptr;
      int64_t vectorized = 0;
#if RMM_HAS_AVX2_CLONES
      if constexpr (AVX2 && std::is_same_v<scalar_t, float>) {
        vectorized = n & ~int64_t(7);
        backward_chunk_avx2<NOISE, PRIOR>(a, gk, at, vectorized, drawn);
      }
#endif
      // the gradients of element j of this block
      auto grads_at = [&](int64_t j) {
        const acc_t gz = static_cast<acc_t>(a.grad_z[at + j]);
        const acc_t m = static_cast<acc_t>(a.mu[at + j]);
        const acc_t lv = static_cast<acc_t>(a.logvar[at + j]);
        acc_t e = acc_t(0);
        if constexpr (NOISE == kGivenNoise) e = static_cast<acc_t>(a.eps[at + j]);
        if constexpr (NOISE == kPhiloxNoise) e = static_cast<acc_t>(drawn[j]);
        if constexpr (PRIOR) {
          return reparam_kl_backward_elem<acc_t>(kSample, gz, gk, m, lv, e,
                                                 static_cast<acc_t>(a.prior_mu[at + j]),
                                                 static_cast<acc_t>(a.prior_logvar[at + j]));
        } else {
          return reparam_kl_backward_elem<acc_t>(kSample, gz, gk, m, lv, e);
        }
      };
      for (int64_t j = vectorized; j < n; ++j) {
        const ReparamKLBackward<acc_t> g = grads_at(j);
        a.grad_mu[at + j] = static_cast<scalar_t>(g.dmu);
        a.grad_logvar[at + j] = static_cast<scalar_t>(g.dlv);
      }
      // The optional gradients are rare: a second pass keeps the hot loop free of branches.
      if (a.grad_eps != nullptr || a.grad_prior_mu != nullptr || a.grad_prior_logvar != nullptr) {
        for (int64_t j = 0; j < n; ++j) {
          const ReparamKLBackward<acc_t> g = grads_at(j);
          if (a.grad_eps != nullptr) a.grad_eps[at + j] = static_cast<scalar_t>(g.deps);
          if (a.grad_prior_mu != nullptr) a.grad_prior_mu[at + j] = static_cast<scalar_t>(g.dpm);
          if (a.grad_prior_logvar != nullptr) {
            a.grad_prior_logvar[at + j] = static_cast<scalar_t>(g.dplv);
          }
        }
      }
    }
  }
}

// The two ISA copies of each hot loop.
template <typename scalar_t, int NOISE, bool PRIOR>
RMM_TARGET_AVX2 void forward_rows_avx2(const ForwardArgs<scalar_t>& a, int64_t b, int64_t e) {
  forward_rows<true, scalar_t, NOISE, PRIOR>(a, b, e);
}
template <typename scalar_t, int NOISE, bool PRIOR>
void forward_rows_default(const ForwardArgs<scalar_t>& a, int64_t b, int64_t e) {
  forward_rows<false, scalar_t, NOISE, PRIOR>(a, b, e);
}
template <typename scalar_t, int NOISE, bool PRIOR>
RMM_TARGET_AVX2 void backward_rows_avx2(const BackwardArgs<scalar_t>& a, int64_t b, int64_t e) {
  backward_rows<true, scalar_t, NOISE, PRIOR>(a, b, e);
}
template <typename scalar_t, int NOISE, bool PRIOR>
void backward_rows_default(const BackwardArgs<scalar_t>& a, int64_t b, int64_t e) {
  backward_rows<false, scalar_t, NOISE, PRIOR>(a, b, e);
}

// Enough elements per task to amortize the thread hand-off.
int64_t grain_rows(int64_t dim) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(dim, 1)); }

template <typename Fn>
void dispatch_modes(int64_t noise, bool prior, Fn&& fn) {
  auto with_prior = [&](auto noise_tag) {
    if (prior) {
      fn(noise_tag, std::true_type{});
    } else {
      fn(noise_tag, std::false_type{});
    }
  };
  switch (noise) {
    case kNoNoise: with_prior(std::integral_constant<int, kNoNoise>{}); break;
    case kGivenNoise: with_prior(std::integral_constant<int, kGivenNoise>{}); break;
    default: with_prior(std::integral_constant<int, kPhiloxNoise>{}); break;
  }
}


std::tuple<at::Tensor, at::Tensor> reparam_kl_forward(
    const at::Tensor& mu, const at::Tensor& logvar, const std::optional<at::Tensor>& eps,
    const std::optional<at::Tensor>& prior_mu, const std::optional<at::Tensor>& prior_logvar,
    const std::optional<at::Tensor>& mask, int64_t seed, int64_t noise) {
  const ReparamKLInputs in =
      check_reparam_kl_inputs(mu, logvar, eps, prior_mu, prior_logvar, mask, noise, at::kCPU);
  const int64_t dim = mu.size(-1);
  const auto lead = mu.sizes().slice(0, mu.dim() - 1);
  const int64_t rows = c10::multiply_integers(lead);
  at::Tensor z = at::empty_like(in.mu);
  at::Tensor kl = at::empty(lead, mu.options().dtype(accumulate_type(mu.scalar_type())));
  const bool avx2 = use_avx2();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mu.scalar_type(), "reparam_kl_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    ForwardArgs<scalar_t> a{in.mu.data_ptr<scalar_t>(),
                            in.logvar.data_ptr<scalar_t>(),
                            ptr_or_null<scalar_t>(in.eps),
                            ptr_or_null<scalar_t>(in.prior_mu),
                            ptr_or_null<scalar_t>(in.prior_logvar),
                            ptr_or_null<bool>(in.mask),
                            z.data_ptr<scalar_t>(),
                            kl.data_ptr<acc_t>(),
                            dim,
                            static_cast<uint64_t>(seed)};
    dispatch_modes(noise, in.prior_mu.defined(), [&](auto noise_tag, auto prior_tag) {
      constexpr int kNoise = decltype(noise_tag)::value;
      constexpr bool kPrior = decltype(prior_tag)::value;
      auto body = avx2 ? forward_rows_avx2<scalar_t, kNoise, kPrior>
                       : forward_rows_default<scalar_t, kNoise, kPrior>;
      at::parallel_for(0, rows, grain_rows(dim), [&](int64_t b, int64_t e) { body(a, b, e); });
    });
  });
  return {z, kl};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> reparam_kl_backward(
    const at::Tensor& grad_z, const at::Tensor& grad_kl, const at::Tensor& mu,
    const at::Tensor& logvar, const std::optional<at::Tensor>& eps,
    const std::optional<at::Tensor>& prior_mu, const std::optional<at::Tensor>& prior_logvar,
    const std::optional<at::Tensor>& mask, int64_t seed, int64_t noise, bool need_grad_eps,
    bool need_grad_prior) {
  const ReparamKLInputs in =
      check_reparam_kl_inputs(mu, logvar, eps, prior_mu, prior_logvar, mask, noise, at::kCPU);
  // not a structured binding: lambdas cannot capture those before C++20
  const std::pair<at::Tensor, at::Tensor> grads = check_reparam_kl_grads(grad_z, grad_kl, mu);
  const at::Tensor& gz = grads.first;
  const at::Tensor& gk = grads.second;
  const auto lead = mu.sizes().slice(0, mu.dim() - 1);
  const int64_t dim = mu.size(-1);
  const int64_t rows = c10::multiply_integers(lead);
  ReparamKLGrads out = empty_reparam_kl_grads(in, need_grad_eps, need_grad_prior);
  at::Tensor &grad_mu = out.mu, &grad_logvar = out.logvar, &grad_eps = out.eps;
  at::Tensor &grad_prior_mu = out.prior_mu, &grad_prior_logvar = out.prior_logvar;
  const bool avx2 = use_avx2();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mu.scalar_type(), "reparam_kl_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    BackwardArgs<scalar_t> a{gz.data_ptr<scalar_t>(),
                             gk.data_ptr<acc_t>(),
                             in.mu.data_ptr<scalar_t>(),
                             in.logvar.data_ptr<scalar_t>(),
                             ptr_or_null<scalar_t>(in.eps),
                             ptr_or_null<scalar_t>(in.prior_mu),
                             ptr_or_null<scalar_t>(in.prior_logvar),
                             ptr_or_null<bool>(in.mask),
                             grad_mu.data_ptr<scalar_t>(),
                             grad_logvar.data_ptr<scalar_t>(),
                             mutable_ptr_or_null<scalar_t>(grad_eps),
                             mutable_ptr_or_null<scalar_t>(grad_prior_mu),
                             mutable_ptr_or_null<scalar_t>(grad_prior_logvar),
                             dim,
                             static_cast<uint64_t>(seed)};
    dispatch_modes(noise, in.prior_mu.defined(), [&](auto noise_tag, auto prior_tag) {
      constexpr int kNoise = decltype(noise_tag)::value;
      constexpr bool kPrior = decltype(prior_tag)::value;
      auto body = avx2 ? backward_rows_avx2<scalar_t, kNoise, kPrior>
                       : backward_rows_default<scalar_t, kNoise, kPrior>;
      at::parallel_for(0, rows, grain_rows(dim), [&](int64_t b, int64_t e) { body(a, b, e); });
    });
  });
  return {grad_mu, grad_logvar, grad_eps, grad_prior_mu, grad_prior_logvar};
}

}  // namespace

TORCH_LIBRARY_IMPL(robustmm_C, CPU, m) {
  m.impl("reparam_kl_forward", &reparam_kl_forward);
  m.impl("reparam_kl_backward", &reparam_kl_backward);
}

}  // namespace cpu
}  // namespace robustmm
