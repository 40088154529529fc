// reparameterize_kl on CUDA: one fused pass forward (z and each row's KL) and one fused pass
// backward (all input gradients), with the per-element math of csrc/include/robustmm.
//
// Layout: a "team" of threads (a power of two, 1..256) owns one row at a time; a 256-thread
// block holds 256 / team rows and strides over the rows of the tensor. The team size follows
// the row length (about two work units per thread), so short rows pack many rows into a warp
// and long rows get a whole block. The row's KL is reduced in fp32 (fp64 for double) with warp
// shuffles, then through shared memory when a team spans several warps. The reduction order is
// fixed by the launch shape, so results are deterministic.
//
// Work units, two paths chosen on the host:
//   aligned  - D % VEC == 0 and every pointer aligned to VEC elements (VEC = 8 for 2-byte types,
//              4 otherwise): a unit is VEC consecutive elements moved with one 16-byte load per
//              tensor (two for double); it starts on a Philox counter, so VEC / 4 randn4x calls
//              feed it.
//   generic  - any D: a unit is one Philox counter c, the elements 4c..4c+3 of the flattened
//              tensor that fall in the row; randn4x is computed once per counter (twice for a
//              counter shared by two rows).
// In-kernel eps: element i of the flattened tensor = component (i & 3) of randn4x(seed, i >> 2),
// exactly as on the CPU and in Triton, regenerated in the backward instead of stored.
//
// Excluded rows (mask False) are never read: z, kl and every gradient are written as 0.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include "robustmm/checks.h"
#include "robustmm/philox.h"
#include "robustmm/reparam_kl.h"
#include "robustmm/reparam_kl_inputs.h"

namespace robustmm {
namespace cuda {
namespace {

constexpr int kThreads = 256;           // threads per block
constexpr int kMaxTeam = kThreads;      // threads per row at most
constexpr int kWarp = 32;
constexpr int64_t kMaxBlocks = 1 << 20;  // the kernels stride over the rows beyond this

// Elements of one aligned unit: 16 bytes of 2-byte types, 4 elements (one counter) otherwise.
template <typename scalar_t>
constexpr int vec_size() {
  return sizeof(scalar_t) <= 2 ? 8 : 4;
}

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

template <typename T, int N>
__device__ __forceinline__ Vec<T, N> load_vec(const T* p) {
  return *reinterpret_cast<const Vec<T, N>*>(p);
}
template <typename T, int N>
__device__ __forceinline__ void store_vec(T* p, const Vec<T, N>& x) {
  *reinterpret_cast<Vec<T, N>*>(p) = x;
}

template <typename scalar_t>
struct ForwardArgs {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* __restrict__ mu;            // (rows, D)
  const scalar_t* __restrict__ logvar;        // (rows, D)
  const scalar_t* __restrict__ eps;           // (rows, D), kGivenNoise only
  const scalar_t* __restrict__ prior_mu;      // (rows, D), PRIOR only
  const scalar_t* __restrict__ prior_logvar;  // (rows, D), PRIOR only
  const bool* __restrict__ mask;              // (rows,) True = include; nullable
  scalar_t* __restrict__ z;                   // (rows, D)
  acc_t* __restrict__ kl;                     // (rows,)
  int64_t rows;
  int64_t dim;
  uint64_t seed;
};

template <typename scalar_t>
struct BackwardArgs {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* __restrict__ grad_z;        // (rows, D)
  const acc_t* __restrict__ grad_kl;          // (rows,)
  const scalar_t* __restrict__ mu;            // (rows, D)
  const scalar_t* __restrict__ logvar;        // (rows, D)
  const scalar_t* __restrict__ eps;           // (rows, D), kGivenNoise only
  const scalar_t* __restrict__ prior_mu;      // (rows, D), PRIOR only
  const scalar_t* __restrict__ prior_logvar;  // (rows, D), PRIOR only
  const bool* __restrict__ mask;              // (rows,) True = include; nullable
  scalar_t* __restrict__ grad_mu;             // (rows, D)
  scalar_t* __restrict__ grad_logvar;         // (rows, D)
  scalar_t* __restrict__ grad_eps;            // (rows, D), nullable
  scalar_t* __restrict__ grad_prior_mu;       // (rows, D), nullable
  scalar_t* __restrict__ grad_prior_logvar;   // (rows, D), nullable
  int64_t rows;
  int64_t dim;
  uint64_t seed;
};

// The four normals of Philox counter `counter` as an array.
__device__ __forceinline__ void draw4(uint64_t seed, uint64_t counter, float* out) {
  const Normal4 r = randn4x(seed, counter);
  out[0] = r.n0;
  out[1] = r.n1;
  out[2] = r.n2;
  out[3] = r.n3;
}

// ---- forward: one unit, returns its share of the row's KL ----

template <typename scalar_t, int NOISE, bool PRIOR>
__device__ __forceinline__ at::opmath_type<scalar_t> forward_elem(
    scalar_t mu, scalar_t lv, scalar_t eps_given, float eps_drawn,
    scalar_t pm, scalar_t plv, scalar_t* z) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kSample = NOISE != kNoNoise;
  acc_t e = acc_t(0);
  if constexpr (NOISE == kGivenNoise) e = static_cast<acc_t>(eps_given);
  if constexpr (NOISE == kPhiloxNoise) e = static_cast<acc_t>(eps_drawn);
  ReparamKLForward<acc_t> out;
  if constexpr (PRIOR) {
    out = reparam_kl_forward_elem<acc_t>(kSample, static_cast<acc_t>(mu), static_cast<acc_t>(lv), e,
                                         static_cast<acc_t>(pm), static_cast<acc_t>(plv));
  } else {
    out = reparam_kl_forward_elem<acc_t>(kSample, static_cast<acc_t>(mu), static_cast<acc_t>(lv), e);
  }
  *z = static_cast<scalar_t>(out.z);
  return out.kl;
}

// VEC consecutive elements from flat index `at` (a multiple of VEC).
template <typename scalar_t, int NOISE, bool PRIOR>
__device__ __forceinline__ at::opmath_type<scalar_t> forward_unit_aligned(
    const ForwardArgs<scalar_t>& a, int64_t at) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int V = vec_size<scalar_t>();
  using VecT = Vec<scalar_t, V>;
  const VecT m = load_vec<scalar_t, V>(a.mu + at);
  const VecT lv = load_vec<scalar_t, V>(a.logvar + at);
  VecT e{}, pm{}, plv{}, z;
  if constexpr (NOISE == kGivenNoise) e = load_vec<scalar_t, V>(a.eps + at);
  if constexpr (PRIOR) {
    pm = load_vec<scalar_t, V>(a.prior_mu + at);
    plv = load_vec<scalar_t, V>(a.prior_logvar + at);
  }
  float drawn[V] = {};
  if constexpr (NOISE == kPhiloxNoise) {
#pragma unroll
    for (int g = 0; g < V / 4; ++g) {
      draw4(a.seed, static_cast<uint64_t>(at >> 2) + g, drawn + 4 * g);
    }
  }
  acc_t kl = acc_t(0);
#pragma unroll
  for (int j = 0; j < V; ++j) {
    kl += forward_elem<scalar_t, NOISE, PRIOR>(m.v[j], lv.v[j], e.v[j], drawn[j], pm.v[j],
                                               plv.v[j], &z.v[j]);
  }
  store_vec<scalar_t, V>(a.z + at, z);
  return kl;
}

// The elements of Philox counter `counter` that lie in [lo, hi).
template <typename scalar_t, int NOISE, bool PRIOR>
__device__ __forceinline__ at::opmath_type<scalar_t> forward_unit_generic(
    const ForwardArgs<scalar_t>& a, int64_t counter, int64_t lo, int64_t hi) {
  using acc_t = at::opmath_type<scalar_t>;
  float drawn[4] = {0.f, 0.f, 0.f, 0.f};
  if constexpr (NOISE == kPhiloxNoise) draw4(a.seed, static_cast<uint64_t>(counter), drawn);
  acc_t kl = acc_t(0);
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const int64_t i = 4 * counter + k;
    if (i >= lo && i < hi) {
      const scalar_t e = NOISE == kGivenNoise ? a.eps[i] : scalar_t(0);
      const scalar_t pm = PRIOR ? a.prior_mu[i] : scalar_t(0);
      const scalar_t plv = PRIOR ? a.prior_logvar[i] : scalar_t(0);
      kl += forward_elem<scalar_t, NOISE, PRIOR>(a.mu[i], a.logvar[i], e, drawn[k], pm, plv,
                                                 &a.z[i]);
    }
  }
  return kl;
}

// Writes zeros over [lo, hi) by a team (aligned: VEC-element stores).
template <typename scalar_t, bool ALIGNED>
__device__ __forceinline__ void zero_row(scalar_t* __restrict__ p, int64_t lo, int64_t hi,
                                         int rank, int team) {
  if (p == nullptr) return;
  if constexpr (ALIGNED) {
    constexpr int V = vec_size<scalar_t>();
    const Vec<scalar_t, V> zero{};  // value-initialized: all bits 0, i.e. +0.0
    for (int64_t at = lo + static_cast<int64_t>(rank) * V; at < hi;
         at += static_cast<int64_t>(team) * V) {
      store_vec<scalar_t, V>(p + at, zero);
    }
  } else {
    for (int64_t i = lo + rank; i < hi; i += team) p[i] = scalar_t(0);
  }
}

// This thread's share of the KL of row `row` (and its z).
template <typename scalar_t, int NOISE, bool PRIOR, bool ALIGNED>
__device__ __forceinline__ at::opmath_type<scalar_t> forward_row(const ForwardArgs<scalar_t>& a,
                                                                 int64_t row, int rank, int team) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t lo = row * a.dim;
  const int64_t hi = lo + a.dim;
  acc_t kl = acc_t(0);
  if constexpr (ALIGNED) {
    constexpr int V = vec_size<scalar_t>();
    for (int64_t at = lo + static_cast<int64_t>(rank) * V; at < hi;
         at += static_cast<int64_t>(team) * V) {
      kl += forward_unit_aligned<scalar_t, NOISE, PRIOR>(a, at);
    }
  } else {
    const int64_t last = (hi - 1) >> 2;
    for (int64_t c = (lo >> 2) + rank; c <= last; c += team) {
      kl += forward_unit_generic<scalar_t, NOISE, PRIOR>(a, c, lo, hi);
    }
  }
  return kl;
}

template <typename acc_t>
__device__ __forceinline__ acc_t team_sum_in_warp(acc_t v, int width) {
  for (int offset = width >> 1; offset > 0; offset >>= 1) {
    v += __shfl_xor_sync(0xffffffffu, v, offset, kWarp);
  }
  return v;
}

// grid-stride over groups of (kThreads >> team_log2) rows; team = 1 << team_log2 threads per row.
template <typename scalar_t, int NOISE, bool PRIOR, bool ALIGNED>
__global__ void __launch_bounds__(kThreads)
    reparam_kl_forward_kernel(const ForwardArgs<scalar_t> a, int team_log2) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t warp_partial[kThreads / kWarp];
  const int team = 1 << team_log2;
  const int rank = threadIdx.x & (team - 1);
  const int rows_per_block = kThreads >> team_log2;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * rows_per_block;
  // The loop bound is the same for every thread of the block, so all of them reach the
  // shuffles and barriers below.
  for (int64_t first = static_cast<int64_t>(blockIdx.x) * rows_per_block; first < a.rows;
       first += stride) {
    const int64_t row = first + (threadIdx.x >> team_log2);
    const bool valid = row < a.rows;
    const bool keep = valid && (a.mask == nullptr || a.mask[row]);
    acc_t kl = acc_t(0);
    if (keep) {
      kl = forward_row<scalar_t, NOISE, PRIOR, ALIGNED>(a, row, rank, team);
    } else if (valid) {
      zero_row<scalar_t, ALIGNED>(a.z, row * a.dim, (row + 1) * a.dim, rank, team);
    }
    kl = team_sum_in_warp(kl, team < kWarp ? team : kWarp);
    if (team > kWarp) {  // uniform over the block
      const int warp = threadIdx.x / kWarp;
      if ((threadIdx.x & (kWarp - 1)) == 0) warp_partial[warp] = kl;
      __syncthreads();
      if (rank == 0) {
        const int warps = team / kWarp;
        acc_t total = acc_t(0);
        for (int w = 0; w < warps; ++w) total += warp_partial[warp + w];
        kl = total;
      }
      __syncthreads();
    }
    if (valid && rank == 0) a.kl[row] = keep ? kl : acc_t(0);
  }
}

// ---- backward ----

template <typename scalar_t, int NOISE, bool PRIOR>
__device__ __forceinline__ ReparamKLBackward<at::opmath_type<scalar_t>> backward_elem(
    at::opmath_type<scalar_t> gk, scalar_t gz, scalar_t mu, scalar_t lv, scalar_t eps_given,
    float eps_drawn, scalar_t pm, scalar_t plv) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kSample = NOISE != kNoNoise;
  acc_t e = acc_t(0);
  if constexpr (NOISE == kGivenNoise) e = static_cast<acc_t>(eps_given);
  if constexpr (NOISE == kPhiloxNoise) e = static_cast<acc_t>(eps_drawn);
  if constexpr (PRIOR) {
    return reparam_kl_backward_elem<acc_t>(kSample, static_cast<acc_t>(gz), gk,
                                           static_cast<acc_t>(mu), static_cast<acc_t>(lv), e,
                                           static_cast<acc_t>(pm), static_cast<acc_t>(plv));
  } else {
    return reparam_kl_backward_elem<acc_t>(kSample, static_cast<acc_t>(gz), gk,
                                           static_cast<acc_t>(mu), static_cast<acc_t>(lv), e);
  }
}

template <typename scalar_t, int NOISE, bool PRIOR>
__device__ __forceinline__ void backward_unit_aligned(const BackwardArgs<scalar_t>& a,
                                                      at::opmath_type<scalar_t> gk, int64_t at) {
  constexpr int V = vec_size<scalar_t>();
  using VecT = Vec<scalar_t, V>;
  const VecT gz = load_vec<scalar_t, V>(a.grad_z + at);
  const VecT m = load_vec<scalar_t, V>(a.mu + at);
  const VecT lv = load_vec<scalar_t, V>(a.logvar + at);
  VecT e{}, pm{}, plv{};
  if constexpr (NOISE == kGivenNoise) e = load_vec<scalar_t, V>(a.eps + at);
  if constexpr (PRIOR) {
    pm = load_vec<scalar_t, V>(a.prior_mu + at);
    plv = load_vec<scalar_t, V>(a.prior_logvar + at);
  }
  float drawn[V] = {};
  if constexpr (NOISE == kPhiloxNoise) {
#pragma unroll
    for (int g = 0; g < V / 4; ++g) {
      draw4(a.seed, static_cast<uint64_t>(at >> 2) + g, drawn + 4 * g);
    }
  }
  VecT dmu, dlv, deps, dpm, dplv;
#pragma unroll
  for (int j = 0; j < V; ++j) {
    const auto g = backward_elem<scalar_t, NOISE, PRIOR>(gk, gz.v[j], m.v[j], lv.v[j], e.v[j],
                                                         drawn[j], pm.v[j], plv.v[j]);
    dmu.v[j] = static_cast<scalar_t>(g.dmu);
    dlv.v[j] = static_cast<scalar_t>(g.dlv);
    deps.v[j] = static_cast<scalar_t>(g.deps);
    dpm.v[j] = static_cast<scalar_t>(g.dpm);
    dplv.v[j] = static_cast<scalar_t>(g.dplv);
  }
  store_vec<scalar_t, V>(a.grad_mu + at, dmu);
  store_vec<scalar_t, V>(a.grad_logvar + at, dlv);
  if (a.grad_eps != nullptr) store_vec<scalar_t, V>(a.grad_eps + at, deps);
  if (a.grad_prior_mu != nullptr) store_vec<scalar_t, V>(a.grad_prior_mu + at, dpm);
  if (a.grad_prior_logvar != nullptr) store_vec<scalar_t, V>(a.grad_prior_logvar + at, dplv);
}

template <typename scalar_t, int NOISE, bool PRIOR>
__device__ __forceinline__ void backward_unit_generic(const BackwardArgs<scalar_t>& a,
                                                      at::opmath_type<scalar_t> gk,
                                                      int64_t counter, int64_t lo, int64_t hi) {
  float drawn[4] = {0.f, 0.f, 0.f, 0.f};
  if constexpr (NOISE == kPhiloxNoise) draw4(a.seed, static_cast<uint64_t>(counter), drawn);
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const int64_t i = 4 * counter + k;
    if (i >= lo && i < hi) {
      const scalar_t e = NOISE == kGivenNoise ? a.eps[i] : scalar_t(0);
      const scalar_t pm = PRIOR ? a.prior_mu[i] : scalar_t(0);
      const scalar_t plv = PRIOR ? a.prior_logvar[i] : scalar_t(0);
      const auto g = backward_elem<scalar_t, NOISE, PRIOR>(gk, a.grad_z[i], a.mu[i], a.logvar[i],
                                                           e, drawn[k], pm, plv);
      a.grad_mu[i] = static_cast<scalar_t>(g.dmu);
      a.grad_logvar[i] = static_cast<scalar_t>(g.dlv);
      if (a.grad_eps != nullptr) a.grad_eps[i] = static_cast<scalar_t>(g.deps);
      if (a.grad_prior_mu != nullptr) a.grad_prior_mu[i] = static_cast<scalar_t>(g.dpm);
      if (a.grad_prior_logvar != nullptr) {
        a.grad_prior_logvar[i] = static_cast<scalar_t>(g.dplv);
      }
    }
  }
}

// Same layout as the forward; no reduction, so no barrier.
template <typename scalar_t, int NOISE, bool PRIOR, bool ALIGNED>
__global__ void __launch_bounds__(kThreads)
    reparam_kl_backward_kernel(const BackwardArgs<scalar_t> a, int team_log2) {
  using acc_t = at::opmath_type<scalar_t>;
  const int team = 1 << team_log2;
  const int rank = threadIdx.x & (team - 1);
  const int rows_per_block = kThreads >> team_log2;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * rows_per_block;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * rows_per_block +
                     (threadIdx.x >> team_log2);
       row < a.rows; row += stride) {
    const int64_t lo = row * a.dim;
    const int64_t hi = lo + a.dim;
    if (a.mask != nullptr && !a.mask[row]) {
      zero_row<scalar_t, ALIGNED>(a.grad_mu, lo, hi, rank, team);
      zero_row<scalar_t, ALIGNED>(a.grad_logvar, lo, hi, rank, team);
      zero_row<scalar_t, ALIGNED>(a.grad_eps, lo, hi, rank, team);
      zero_row<scalar_t, ALIGNED>(a.grad_prior_mu, lo, hi, rank, team);
      zero_row<scalar_t, ALIGNED>(a.grad_prior_logvar, lo, hi, rank, team);
      continue;
    }
    const acc_t gk = a.grad_kl[row];
    if constexpr (ALIGNED) {
      constexpr int V = vec_size<scalar_t>();
      for (int64_t at = lo + static_cast<int64_t>(rank) * V; at < hi;
           at += static_cast<int64_t>(team) * V) {
        backward_unit_aligned<scalar_t, NOISE, PRIOR>(a, gk, at);
      }
    } else {
      const int64_t last = (hi - 1) >> 2;
      for (int64_t c = (lo >> 2) + rank; c <= last; c += team) {
        backward_unit_generic<scalar_t, NOISE, PRIOR>(a, gk, c, lo, hi);
      }
    }
  }
}

// ---- host side ----

struct Launch {
  int team_log2;
  dim3 grid;
  bool aligned;
};

bool aligned_to(const void* p, int64_t bytes) {
  return p == nullptr || reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(bytes) == 0;
}

// Team size and grid for `rows` rows of `dim` elements; `aligned` when the vector path applies.
template <typename scalar_t>
Launch plan(int64_t rows, int64_t dim, std::initializer_list<const void*> pointers) {
  constexpr int V = vec_size<scalar_t>();
  bool aligned = dim % V == 0;
  for (const void* p : pointers) aligned = aligned && aligned_to(p, V * sizeof(scalar_t));
  // units per row: VEC-element groups, or the Philox counters a row touches
  const int64_t units = aligned ? dim / V : dim / 4 + 2;
  const int64_t want = (units + 1) / 2;  // about two units per thread
  int team_log2 = 0;
  while ((int64_t{1} << team_log2) < want && (1 << team_log2) < kMaxTeam) ++team_log2;
  const int64_t rows_per_block = kThreads >> team_log2;
  const int64_t blocks = std::min((rows + rows_per_block - 1) / rows_per_block, kMaxBlocks);
  return {team_log2, dim3(static_cast<unsigned int>(blocks)), aligned};
}

template <typename Fn>
void dispatch_modes(int64_t noise, bool prior, bool aligned, Fn&& fn) {
  auto with_aligned = [&](auto noise_tag, auto prior_tag) {
    if (aligned) {
      fn(noise_tag, prior_tag, std::true_type{});
    } else {
      fn(noise_tag, prior_tag, std::false_type{});
    }
  };
  auto with_prior = [&](auto noise_tag) {
    if (prior) {
      with_aligned(noise_tag, std::true_type{});
    } else {
      with_aligned(noise_tag, std::false_type{});
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
      check_reparam_kl_inputs(mu, logvar, eps, prior_mu, prior_logvar, mask, noise, at::kCUDA);
  const c10::cuda::CUDAGuard device_guard(mu.device());
  const int64_t dim = mu.size(-1);
  const auto lead = mu.sizes().slice(0, mu.dim() - 1);
  const int64_t rows = c10::multiply_integers(lead);
  at::Tensor z = at::empty_like(in.mu);
  at::Tensor kl = at::empty(lead, mu.options().dtype(accumulate_type(mu.scalar_type())));
  if (rows == 0) return {z, kl};
  if (dim == 0) {  // an empty sum: KL 0 on every row, nothing to sample
    kl.zero_();
    return {z, kl};
  }
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mu.scalar_type(), "reparam_kl_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const ForwardArgs<scalar_t> a{in.mu.data_ptr<scalar_t>(),
                                  in.logvar.data_ptr<scalar_t>(),
                                  ptr_or_null<scalar_t>(in.eps),
                                  ptr_or_null<scalar_t>(in.prior_mu),
                                  ptr_or_null<scalar_t>(in.prior_logvar),
                                  ptr_or_null<bool>(in.mask),
                                  z.data_ptr<scalar_t>(),
                                  kl.data_ptr<acc_t>(),
                                  rows,
                                  dim,
                                  static_cast<uint64_t>(seed)};
    const Launch l = plan<scalar_t>(rows, dim, {a.mu, a.logvar, a.eps, a.prior_mu, a.prior_logvar, a.z});
    dispatch_modes(noise, in.prior_mu.defined(), l.aligned, [&](auto noise_tag, auto prior_tag, auto aligned_tag) {
      constexpr int kNoise = decltype(noise_tag)::value;
      constexpr bool kPrior = decltype(prior_tag)::value;
      constexpr bool kAligned = decltype(aligned_tag)::value;
      reparam_kl_forward_kernel<scalar_t, kNoise, kPrior, kAligned>
          <<<l.grid, kThreads, 0, stream>>>(a, l.team_log2);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
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
      check_reparam_kl_inputs(mu, logvar, eps, prior_mu, prior_logvar, mask, noise, at::kCUDA);
  // mu's device current before anything is allocated or launched (getCurrentCUDAStream below
  // is then mu's device's stream), as in the forward
  const c10::cuda::CUDAGuard device_guard(mu.device());
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
  if (rows == 0 || dim == 0) {
    return {grad_mu, grad_logvar, grad_eps, grad_prior_mu, grad_prior_logvar};
  }
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mu.scalar_type(), "reparam_kl_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const BackwardArgs<scalar_t> a{gz.data_ptr<scalar_t>(),
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
                                   rows,
                                   dim,
                                   static_cast<uint64_t>(seed)};
    const Launch l = plan<scalar_t>(
        rows, dim,
        {a.grad_z, a.mu, a.logvar, a.eps, a.prior_mu, a.prior_logvar, a.grad_mu, a.grad_logvar,
         a.grad_eps, a.grad_prior_mu, a.grad_prior_logvar});
    dispatch_modes(noise, in.prior_mu.defined(), l.aligned, [&](auto noise_tag, auto prior_tag, auto aligned_tag) {
      constexpr int kNoise = decltype(noise_tag)::value;
      constexpr bool kPrior = decltype(prior_tag)::value;
      constexpr bool kAligned = decltype(aligned_tag)::value;
      reparam_kl_backward_kernel<scalar_t, kNoise, kPrior, kAligned>
          <<<l.grid, kThreads, 0, stream>>>(a, l.team_log2);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {grad_mu, grad_logvar, grad_eps, grad_prior_mu, grad_prior_logvar};
}

}  // namespace

TORCH_LIBRARY_IMPL(robustmm_C, CUDA, m) {
  m.impl("reparam_kl_forward", &reparam_kl_forward);
  m.impl("reparam_kl_backward", &reparam_kl_backward);
}

}  // namespace cuda
}  // namespace robustmm
