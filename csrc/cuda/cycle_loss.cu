// cycle_reconstruction_loss on CUDA: one fused pass forward (each row's forward and cycle terms,
// nothing else) and one fused pass backward that reads the four inputs again, recomputes each row
// distance's derivatives and writes the gradients directly (grad_terms[k, r] times the
// derivative), with the per-element and per-row math of csrc/include/robustmm/cycle_loss.h. No
// tensor of the inputs' size exists between the two.
//
// Layout (as csrc/cuda/reparam_kl.cu): a "team" of threads (a power of two, 1..256) owns one row
// at a time; a 256-thread block holds 256 / team rows and strides over the rows of the tensor.
// The team size follows the row length (about two work units per thread), so short rows (D = 128:
// 16 threads for fp32, 8 for 2-byte types) pack many rows into a warp and long rows (D >= 2048
// fp32) get a whole block. Row sums are reduced in fp32 (fp64 for double) with warp shuffles,
// then through shared memory when a team spans several warps. The reduction order is fixed by the
// launch shape, so results are deterministic.
//
// Work units: a team walks its row in chunks of team * VEC elements (VEC = 16 bytes of the input
// type: 8 for 2-byte types, 4 for float, 2 for double); thread `rank` owns VEC of them:
//   aligned  - D % VEC == 0 and every pointer aligned to 16 bytes: elements
//              chunk + rank * VEC + k, moved with one 16-byte load or store per tensor.
//   generic  - any D or alignment: elements chunk + k * team + rank, scalar loads that are still
//              coalesced across the team; elements past the row's end read as 0 (which adds 0 to
//              every sum) and are never written.
//
// Forward: a single pass; each chunk reads the four inputs once and adds to the row sums (the two
// distances' sums for mse / l1 / smooth_l1; <a, b>, |a|^2, |b|^2 of both pairs for cosine).
// Backward, symmetric distances (mse, l1, smooth_l1): elementwise, no reduction; each chunk reads
// the two inputs of a pair whose gradients are wanted and writes g = grad_term / D * dd/da as
// d a = g and d b = -g from the one computation (only the wanted ones).
// Backward, cosine: the gradients need the row's dot product and norms first, so two passes. The
// first kCached chunks of each thread (all of a row of up to 2 * 256 * VEC elements, i.e.
// D <= 2048 fp32 / 4096 2-byte / 1024 fp64, since the team gets about two chunks per thread)
// stay in registers between the passes, so those rows are read from memory once; only longer
// rows read their remaining chunks a second time, right after the first read, from L2. A pair
// none of whose gradients is wanted is not read.
// Accumulation in float32 (float64 for double), one rounding to the output dtype.
//
// Excluded rows (mask False) are never read (neither the inputs nor grad_terms): their terms and
// every gradient are written as 0.
// Argument checks and output allocation: robustmm/cycle_loss_inputs.h, shared with the CPU kernel.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <initializer_list>
#include <optional>
#include <tuple>
#include <type_traits>

#include "robustmm/checks.h"
#include "robustmm/cycle_loss.h"
#include "robustmm/cycle_loss_inputs.h"

namespace robustmm {
namespace cuda {
namespace {

constexpr int kThreads = 256;           // threads per block
constexpr int kMaxTeam = kThreads;      // threads per row at most
constexpr int kWarp = 32;
constexpr int kWarps = kThreads / kWarp;
constexpr int64_t kMaxBlocks = 1 << 20;  // the kernels stride over the rows beyond this
constexpr int kCached = 2;               // cosine: chunks per thread kept in registers

// Elements of one unit: 16 bytes of the input type.
template <typename scalar_t>
constexpr int vec_size() {
  return static_cast<int>(16 / sizeof(scalar_t));
}

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

// Thread `rank`'s V elements of the chunk that starts at flat index `chunk` (see the layout
// above); elements at or past `hi` read as 0.
template <bool ALIGNED, int V, typename T>
__device__ __forceinline__ Vec<T, V> load_part(const T* __restrict__ p, int64_t chunk, int rank,
                                               int team, int64_t hi) {
  Vec<T, V> x{};
  if constexpr (ALIGNED) {
    const int64_t at = chunk + static_cast<int64_t>(rank) * V;
    if (at < hi) x = *reinterpret_cast<const Vec<T, V>*>(p + at);
  } else {
    const int64_t first = chunk + rank;
    const T* __restrict__ q = p + first;
    const int64_t left = hi - first;  // this thread's elements: q[k * team] for k * team < left
#pragma unroll
    for (int k = 0; k < V; ++k) {
      if (k * team < left) x.v[k] = q[k * team];
    }
  }
  return x;
}

// Stores thread `rank`'s V elements of a chunk; nothing at or past `hi`.
template <bool ALIGNED, int V, typename T>
__device__ __forceinline__ void store_part(T* __restrict__ p, int64_t chunk, int rank, int team,
                                           int64_t hi, const Vec<T, V>& x) {
  if constexpr (ALIGNED) {
    const int64_t at = chunk + static_cast<int64_t>(rank) * V;
    if (at < hi) *reinterpret_cast<Vec<T, V>*>(p + at) = x;
  } else {
    const int64_t first = chunk + rank;
    T* __restrict__ q = p + first;
    const int64_t left = hi - first;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      if (k * team < left) q[k * team] = x.v[k];
    }
  }
}

// Writes zeros over the row [lo, hi) of `p` (nullable) by a team.
template <bool ALIGNED, int V, typename T>
__device__ __forceinline__ void zero_row(T* __restrict__ p, int64_t lo, int64_t hi, int rank,
                                         int team) {
  if (p == nullptr) return;
  const Vec<T, V> zero{};  // value-initialized: all bits 0, i.e. +0.0
  const int64_t step = static_cast<int64_t>(team) * V;
  for (int64_t chunk = lo; chunk < hi; chunk += step) {
    store_part<ALIGNED, V>(p, chunk, rank, team, hi, zero);
  }
}

// Sums each of v[0..N) over the team; every thread of the team gets the totals (bitwise equal:
// the butterfly adds the same pairs in every lane). `partial` holds N * kWarps values. The caller
// reaches this with every thread of the block (the barriers when team > kWarp).
template <int N, typename acc_t>
__device__ __forceinline__ void team_sum(acc_t (&v)[N], int team, acc_t* partial) {
  const int width = team < kWarp ? team : kWarp;
  for (int offset = width >> 1; offset > 0; offset >>= 1) {
#pragma unroll
    for (int n = 0; n < N; ++n) v[n] += __shfl_xor_sync(0xffffffffu, v[n], offset, kWarp);
  }
  if (team > kWarp) {  // uniform over the block
    const int warp = threadIdx.x / kWarp;
    if ((threadIdx.x & (kWarp - 1)) == 0) {
#pragma unroll
      for (int n = 0; n < N; ++n) partial[n * kWarps + warp] = v[n];
    }
    __syncthreads();
    const int warps = team / kWarp;
    const int first = warp & ~(warps - 1);  // the team's first warp (teams are aligned)
#pragma unroll
    for (int n = 0; n < N; ++n) {
      acc_t total = acc_t(0);
      for (int w = 0; w < warps; ++w) total += partial[n * kWarps + first + w];
      v[n] = total;
    }
    __syncthreads();
  }
}

template <typename scalar_t>
struct ForwardArgs {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* __restrict__ forward_pred;  // (rows, D)
  const scalar_t* __restrict__ target;        // (rows, D)
  const scalar_t* __restrict__ cycle_pred;    // (rows, D)
  const scalar_t* __restrict__ source;        // (rows, D)
  const bool* __restrict__ mask;              // (rows,) True = include; nullable
  acc_t* __restrict__ terms;                  // (2, rows): forward terms, then cycle terms
  int64_t rows;
  int64_t dim;
  acc_t beta;      // smooth_l1 only
  acc_t inv_beta;  // smooth_l1 only
  acc_t inv_dim;   // 1 / D
};

template <typename scalar_t>
struct BackwardArgs {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t* __restrict__ grad_terms;       // (2, rows): d loss / d terms
  const scalar_t* __restrict__ forward_pred;  // (rows, D)
  const scalar_t* __restrict__ target;        // (rows, D)
  const scalar_t* __restrict__ cycle_pred;    // (rows, D)
  const scalar_t* __restrict__ source;        // (rows, D)
  const bool* __restrict__ mask;              // (rows,) True = include; nullable
  scalar_t* __restrict__ d_forward_pred;      // (rows, D); nullable (need_grad bit 1 clear)
  scalar_t* __restrict__ d_target;            // (rows, D); nullable (bit 2)
  scalar_t* __restrict__ d_cycle_pred;        // (rows, D); nullable (bit 4)
  scalar_t* __restrict__ d_source;            // (rows, D); nullable (bit 8)
  int64_t rows;
  int64_t dim;
  acc_t beta;      // smooth_l1 only
  acc_t inv_beta;  // smooth_l1 only
  acc_t inv_dim;   // 1 / D
};

// ---- forward: one pass, the row sums only ----

// grid-stride over groups of (kThreads >> team_log2) rows; team = 1 << team_log2 threads per row.
template <typename scalar_t, int DIST, bool ALIGNED>
__global__ void __launch_bounds__(kThreads)
    cycle_loss_forward_symmetric_kernel(const ForwardArgs<scalar_t> a, int team_log2) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int V = vec_size<scalar_t>();
  __shared__ acc_t partial[2 * kWarps];
  const int team = 1 << team_log2;
  const int rank = threadIdx.x & (team - 1);
  const int rows_per_block = kThreads >> team_log2;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * rows_per_block;
  const int64_t step = static_cast<int64_t>(team) * V;
  // The loop bound is the same for every thread of the block, so all of them reach the
  // shuffles and barriers of team_sum.
  for (int64_t first = static_cast<int64_t>(blockIdx.x) * rows_per_block; first < a.rows;
       first += stride) {
    const int64_t row = first + (threadIdx.x >> team_log2);
    const bool valid = row < a.rows;
    const bool keep = valid && (a.mask == nullptr || a.mask[row]);
    const int64_t lo = row * a.dim;
    const int64_t hi = lo + a.dim;
    acc_t sum[2] = {acc_t(0), acc_t(0)};  // forward, cycle
    if (keep) {
      for (int64_t chunk = lo; chunk < hi; chunk += step) {
        const Vec<scalar_t, V> fp = load_part<ALIGNED, V>(a.forward_pred, chunk, rank, team, hi);
        const Vec<scalar_t, V> tg = load_part<ALIGNED, V>(a.target, chunk, rank, team, hi);
        const Vec<scalar_t, V> cp = load_part<ALIGNED, V>(a.cycle_pred, chunk, rank, team, hi);
        const Vec<scalar_t, V> src = load_part<ALIGNED, V>(a.source, chunk, rank, team, hi);
#pragma unroll
        for (int k = 0; k < V; ++k) {
          sum[0] += cycle_elem<DIST, acc_t>(static_cast<acc_t>(fp.v[k]),
                                            static_cast<acc_t>(tg.v[k]), a.beta, a.inv_beta).value;
          sum[1] += cycle_elem<DIST, acc_t>(static_cast<acc_t>(cp.v[k]),
                                            static_cast<acc_t>(src.v[k]), a.beta, a.inv_beta).value;
        }
      }
    }
    team_sum<2>(sum, team, partial);
    if (valid && rank == 0) {
      a.terms[row] = keep ? sum[0] * a.inv_dim : acc_t(0);
      a.terms[a.rows + row] = keep ? sum[1] * a.inv_dim : acc_t(0);
    }
  }
}

// Adds a chunk's <a, b>, |a|^2, |b|^2 of both pairs to s[0..6).
template <int V, typename scalar_t, typename acc_t>
__device__ __forceinline__ void cosine_sums(const Vec<scalar_t, V> (&x)[4], acc_t (&s)[6]) {
#pragma unroll
  for (int p = 0; p < 2; ++p) {
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const acc_t u = static_cast<acc_t>(x[2 * p].v[k]);
      const acc_t w = static_cast<acc_t>(x[2 * p + 1].v[k]);
      s[3 * p] += u * w;
      s[3 * p + 1] += u * u;
      s[3 * p + 2] += w * w;
    }
  }
}

// Same layout as the symmetric kernel.
template <typename scalar_t, bool ALIGNED>
__global__ void __launch_bounds__(kThreads)
    cycle_loss_forward_cosine_kernel(const ForwardArgs<scalar_t> a, int team_log2) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int V = vec_size<scalar_t>();
  __shared__ acc_t partial[6 * kWarps];
  const int team = 1 << team_log2;
  const int rank = threadIdx.x & (team - 1);
  const int rows_per_block = kThreads >> team_log2;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * rows_per_block;
  const int64_t step = static_cast<int64_t>(team) * V;
  for (int64_t first = static_cast<int64_t>(blockIdx.x) * rows_per_block; first < a.rows;
       first += stride) {
    const int64_t row = first + (threadIdx.x >> team_log2);
    const bool valid = row < a.rows;
    const bool keep = valid && (a.mask == nullptr || a.mask[row]);
    const int64_t lo = row * a.dim;
    const int64_t hi = lo + a.dim;
    // forward <a, b>, |a|^2, |b|^2, then the same for the cycle pair
    acc_t s[6] = {acc_t(0), acc_t(0), acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
    if (keep) {
      for (int64_t chunk = lo; chunk < hi; chunk += step) {
        const Vec<scalar_t, V> x[4] = {load_part<ALIGNED, V>(a.forward_pred, chunk, rank, team, hi),
                                       load_part<ALIGNED, V>(a.target, chunk, rank, team, hi),
                                       load_part<ALIGNED, V>(a.cycle_pred, chunk, rank, team, hi),
                                       load_part<ALIGNED, V>(a.source, chunk, rank, team, hi)};
        cosine_sums<V>(x, s);
      }
    }
    team_sum<6>(s, team, partial);
    if (valid && rank == 0) {
      a.terms[row] = keep ? cosine_row<acc_t>(s[0], s[1], s[2]).term : acc_t(0);
      a.terms[a.rows + row] = keep ? cosine_row<acc_t>(s[3], s[4], s[5]).term : acc_t(0);
    }
  }
}

// ---- backward, mse / l1 / smooth_l1: elementwise ----

// One pair's chunk: g = c * dd/da (c = grad term / D) from the pair's inputs x, y, written as
// out_a = g and out_b = -g where wanted (either nullable; neither: nothing is read).
template <int DIST, bool ALIGNED, int V, typename scalar_t, typename acc_t>
__device__ __forceinline__ void symmetric_backward_pair(
    const scalar_t* __restrict__ x, const scalar_t* __restrict__ y, scalar_t* __restrict__ out_a,
    scalar_t* __restrict__ out_b, acc_t c, acc_t beta, acc_t inv_beta, int64_t chunk, int rank,
    int team, int64_t hi) {
  if (out_a == nullptr && out_b == nullptr) return;
  const Vec<scalar_t, V> u = load_part<ALIGNED, V>(x, chunk, rank, team, hi);
  const Vec<scalar_t, V> w = load_part<ALIGNED, V>(y, chunk, rank, team, hi);
  Vec<scalar_t, V> ga, gb;
#pragma unroll
  for (int k = 0; k < V; ++k) {
    const acc_t g = cycle_elem<DIST, acc_t>(static_cast<acc_t>(u.v[k]), static_cast<acc_t>(w.v[k]),
                                            beta, inv_beta).grad * c;
    ga.v[k] = static_cast<scalar_t>(g);
    gb.v[k] = static_cast<scalar_t>(-g);
  }
  if (out_a != nullptr) store_part<ALIGNED, V>(out_a, chunk, rank, team, hi, ga);
  if (out_b != nullptr) store_part<ALIGNED, V>(out_b, chunk, rank, team, hi, gb);
}

// Same team layout as the forward; no reduction, so no barrier: each thread strides over rows.
template <typename scalar_t, int DIST, bool ALIGNED>
__global__ void __launch_bounds__(kThreads)
    cycle_loss_backward_symmetric_kernel(const BackwardArgs<scalar_t> a, int team_log2) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int V = vec_size<scalar_t>();
  const int team = 1 << team_log2;
  const int rank = threadIdx.x & (team - 1);
  const int rows_per_block = kThreads >> team_log2;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * rows_per_block;
  const int64_t step = static_cast<int64_t>(team) * V;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * rows_per_block +
                     (threadIdx.x >> team_log2);
       row < a.rows; row += stride) {
    const int64_t lo = row * a.dim;
    const int64_t hi = lo + a.dim;
    if (a.mask != nullptr && !a.mask[row]) {
      zero_row<ALIGNED, V>(a.d_forward_pred, lo, hi, rank, team);
      zero_row<ALIGNED, V>(a.d_target, lo, hi, rank, team);
      zero_row<ALIGNED, V>(a.d_cycle_pred, lo, hi, rank, team);
      zero_row<ALIGNED, V>(a.d_source, lo, hi, rank, team);
      continue;
    }
    const acc_t c_forward = a.grad_terms[row] * a.inv_dim;
    const acc_t c_cycle = a.grad_terms[a.rows + row] * a.inv_dim;
    for (int64_t chunk = lo; chunk < hi; chunk += step) {
      symmetric_backward_pair<DIST, ALIGNED, V>(a.forward_pred, a.target, a.d_forward_pred,
                                                a.d_target, c_forward, a.beta, a.inv_beta, chunk,
                                                rank, team, hi);
      symmetric_backward_pair<DIST, ALIGNED, V>(a.cycle_pred, a.source, a.d_cycle_pred,
                                                a.d_source, c_cycle, a.beta, a.inv_beta, chunk,
                                                rank, team, hi);
    }
  }
}

// ---- backward, cosine: the sums, then the gradients from the same chunks ----

// A chunk of the wanted pairs (x[0], x[1]: forward_pred, target; x[2], x[3]: cycle_pred,
// source); a pair that is not wanted is left 0 (it adds 0 to its sums and is never written).
template <bool ALIGNED, int V, typename scalar_t>
__device__ __forceinline__ void cosine_load(const BackwardArgs<scalar_t>& a, bool want_forward,
                                            bool want_cycle, int64_t chunk, int rank, int team,
                                            int64_t hi, Vec<scalar_t, V> (&x)[4]) {
  if (want_forward) {
    x[0] = load_part<ALIGNED, V>(a.forward_pred, chunk, rank, team, hi);
    x[1] = load_part<ALIGNED, V>(a.target, chunk, rank, team, hi);
  } else {
    x[0] = Vec<scalar_t, V>{};
    x[1] = Vec<scalar_t, V>{};
  }
  if (want_cycle) {
    x[2] = load_part<ALIGNED, V>(a.cycle_pred, chunk, rank, team, hi);
    x[3] = load_part<ALIGNED, V>(a.source, chunk, rank, team, hi);
  } else {
    x[2] = Vec<scalar_t, V>{};
    x[3] = Vec<scalar_t, V>{};
  }
}

// One output of a chunk: self * u + cross * w (the coefficients already scaled by the row's
// upstream gradient), rounded once to the output dtype.
template <bool ALIGNED, int V, typename scalar_t, typename acc_t>
__device__ __forceinline__ void cosine_store_one(scalar_t* __restrict__ out,
                                                 const Vec<scalar_t, V>& u,
                                                 const Vec<scalar_t, V>& w, acc_t self_coef,
                                                 acc_t cross, int64_t chunk, int rank, int team,
                                                 int64_t hi) {
  if (out == nullptr) return;
  Vec<scalar_t, V> g;
#pragma unroll
  for (int k = 0; k < V; ++k) {
    g.v[k] = static_cast<scalar_t>(self_coef * static_cast<acc_t>(u.v[k]) +
                                   cross * static_cast<acc_t>(w.v[k]));
  }
  store_part<ALIGNED, V>(out, chunk, rank, team, hi, g);
}

// Writes a chunk's wanted gradients of both pairs: d a = self_a a + cross b, d b = cross a +
// self_b b, with c[p] scaled by the pair's upstream gradient.
template <bool ALIGNED, int V, typename scalar_t, typename acc_t>
__device__ __forceinline__ void cosine_store(const BackwardArgs<scalar_t>& a,
                                             const Vec<scalar_t, V> (&x)[4],
                                             const CosineRow<acc_t> (&c)[2], int64_t chunk,
                                             int rank, int team, int64_t hi) {
  cosine_store_one<ALIGNED, V>(a.d_forward_pred, x[0], x[1], c[0].self_a, c[0].cross, chunk,
                               rank, team, hi);
  cosine_store_one<ALIGNED, V>(a.d_target, x[1], x[0], c[0].self_b, c[0].cross, chunk, rank,
                               team, hi);
  cosine_store_one<ALIGNED, V>(a.d_cycle_pred, x[2], x[3], c[1].self_a, c[1].cross, chunk, rank,
                               team, hi);
  cosine_store_one<ALIGNED, V>(a.d_source, x[3], x[2], c[1].self_b, c[1].cross, chunk, rank,
                               team, hi);
}

// Same layout as the forward kernels (every thread of the block reaches team_sum).
template <typename scalar_t, bool ALIGNED>
__global__ void __launch_bounds__(kThreads)
    cycle_loss_backward_cosine_kernel(const BackwardArgs<scalar_t> a, int team_log2) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int V = vec_size<scalar_t>();
  __shared__ acc_t partial[6 * kWarps];
  const int team = 1 << team_log2;
  const int rank = threadIdx.x & (team - 1);
  const int rows_per_block = kThreads >> team_log2;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * rows_per_block;
  const int64_t step = static_cast<int64_t>(team) * V;
  // uniform over the launch
  const bool want_forward = a.d_forward_pred != nullptr || a.d_target != nullptr;
  const bool want_cycle = a.d_cycle_pred != nullptr || a.d_source != nullptr;
  for (int64_t first = static_cast<int64_t>(blockIdx.x) * rows_per_block; first < a.rows;
       first += stride) {
    const int64_t row = first + (threadIdx.x >> team_log2);
    const bool valid = row < a.rows;
    const bool keep = valid && (a.mask == nullptr || a.mask[row]);
    const int64_t lo = row * a.dim;
    const int64_t hi = lo + a.dim;
    // forward <a, b>, |a|^2, |b|^2, then the same for the cycle pair
    acc_t s[6] = {acc_t(0), acc_t(0), acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
    // This thread's first kCached chunks, kept for the second pass (static indices only, so
    // the array stays in registers).
    Vec<scalar_t, V> cache[kCached][4];
    if (keep) {
#pragma unroll
      for (int j = 0; j < kCached; ++j) {
        const int64_t chunk = lo + j * step;
        if (chunk < hi) {
          cosine_load<ALIGNED, V>(a, want_forward, want_cycle, chunk, rank, team, hi, cache[j]);
          cosine_sums<V>(cache[j], s);
        }
      }
      for (int64_t chunk = lo + kCached * step; chunk < hi; chunk += step) {
        Vec<scalar_t, V> x[4];
        cosine_load<ALIGNED, V>(a, want_forward, want_cycle, chunk, rank, team, hi, x);
        cosine_sums<V>(x, s);
      }
    } else if (valid) {
      zero_row<ALIGNED, V>(a.d_forward_pred, lo, hi, rank, team);
      zero_row<ALIGNED, V>(a.d_target, lo, hi, rank, team);
      zero_row<ALIGNED, V>(a.d_cycle_pred, lo, hi, rank, team);
      zero_row<ALIGNED, V>(a.d_source, lo, hi, rank, team);
    }
    team_sum<6>(s, team, partial);
    if (keep) {
      CosineRow<acc_t> c[2] = {cosine_row<acc_t>(s[0], s[1], s[2]),
                               cosine_row<acc_t>(s[3], s[4], s[5])};
      const acc_t g[2] = {want_forward ? a.grad_terms[row] : acc_t(0),
                          want_cycle ? a.grad_terms[a.rows + row] : acc_t(0)};
#pragma unroll
      for (int p = 0; p < 2; ++p) {
        c[p].self_a *= g[p];
        c[p].self_b *= g[p];
        c[p].cross *= g[p];
      }
#pragma unroll
      for (int j = 0; j < kCached; ++j) {
        const int64_t chunk = lo + j * step;
        if (chunk < hi) cosine_store<ALIGNED, V>(a, cache[j], c, chunk, rank, team, hi);
      }
      // rows longer than kCached chunks per thread: the rest again, from L2
      for (int64_t chunk = lo + kCached * step; chunk < hi; chunk += step) {
        Vec<scalar_t, V> x[4];
        cosine_load<ALIGNED, V>(a, want_forward, want_cycle, chunk, rank, team, hi, x);
        cosine_store<ALIGNED, V>(a, x, c, chunk, rank, team, hi);
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

// Team size and grid for `rows` rows of `dim` elements. The vector path applies when D is a
// multiple of VEC and every pointer in `pointers` (tensors of scalar_t) is aligned to the
// 16 bytes it is moved with.
template <typename scalar_t>
Launch plan(int64_t rows, int64_t dim, std::initializer_list<const void*> pointers) {
  constexpr int V = vec_size<scalar_t>();
  bool aligned = dim % V == 0;
  for (const void* p : pointers) aligned = aligned && aligned_to(p, V * sizeof(scalar_t));
  const int64_t units = (dim + V - 1) / V;  // chunks of one thread if the team had one thread
  const int64_t want = (units + 1) / 2;    // about two units per thread
  int team_log2 = 0;
  while ((int64_t{1} << team_log2) < want && (1 << team_log2) < kMaxTeam) ++team_log2;
  const int64_t rows_per_block = kThreads >> team_log2;
  const int64_t blocks = std::min((rows + rows_per_block - 1) / rows_per_block, kMaxBlocks);
  return {team_log2, dim3(static_cast<unsigned int>(blocks)), aligned};
}

// Calls fn(integral_constant<int, DIST>, integral_constant<bool, ALIGNED>) for a symmetric
// distance code.
template <typename Fn>
void dispatch_symmetric(int64_t distance, bool aligned, Fn&& fn) {
  auto with_aligned = [&](auto dist_tag) {
    if (aligned) {
      fn(dist_tag, std::true_type{});
    } else {
      fn(dist_tag, std::false_type{});
    }
  };
  switch (distance) {
    case kCycleMse: with_aligned(std::integral_constant<int, kCycleMse>{}); break;
    case kCycleL1: with_aligned(std::integral_constant<int, kCycleL1>{}); break;
    default: with_aligned(std::integral_constant<int, kCycleSmoothL1>{}); break;
  }
}

template <typename T>
T* data_or_null(const at::Tensor& t) {
  return t.defined() && t.numel() > 0 ? t.data_ptr<T>() : nullptr;
}

at::Tensor cycle_loss_forward(const at::Tensor& forward_pred, const at::Tensor& target,
                              const at::Tensor& cycle_pred, const at::Tensor& source,
                              const std::optional<at::Tensor>& mask, int64_t distance,
                              double beta) {
  const CycleLossInputs in = check_cycle_loss_inputs(forward_pred, target, cycle_pred, source,
                                                     mask, distance, beta, at::kCUDA);
  const c10::cuda::CUDAGuard device_guard(forward_pred.device());
  at::Tensor terms = empty_cycle_loss_terms(in);
  if (in.rows == 0) return terms;  // nothing to launch

  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.forward_pred.scalar_type(), "cycle_loss_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const bool smooth = distance == kCycleSmoothL1;
    const ForwardArgs<scalar_t> a{in.forward_pred.data_ptr<scalar_t>(),
                                  in.target.data_ptr<scalar_t>(),
                                  in.cycle_pred.data_ptr<scalar_t>(),
                                  in.source.data_ptr<scalar_t>(),
                                  data_or_null<bool>(in.mask),
                                  terms.data_ptr<acc_t>(),
                                  in.rows,
                                  in.dim,
                                  static_cast<acc_t>(smooth ? beta : 1.0),
                                  static_cast<acc_t>(smooth ? 1.0 / beta : 1.0),
                                  acc_t(1) / static_cast<acc_t>(in.dim)};  // as the CPU kernel
    const Launch l = plan<scalar_t>(in.rows, in.dim,
                                    {a.forward_pred, a.target, a.cycle_pred, a.source});
    if (distance == kCycleCosine) {
      if (l.aligned) {
        cycle_loss_forward_cosine_kernel<scalar_t, true><<<l.grid, kThreads, 0, stream>>>(a, l.team_log2);
      } else {
        cycle_loss_forward_cosine_kernel<scalar_t, false><<<l.grid, kThreads, 0, stream>>>(a, l.team_log2);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      dispatch_symmetric(distance, l.aligned, [&](auto dist_tag, auto aligned_tag) {
        constexpr int kDist = decltype(dist_tag)::value;
        constexpr bool kAligned = decltype(aligned_tag)::value;
        cycle_loss_forward_symmetric_kernel<scalar_t, kDist, kAligned>
            <<<l.grid, kThreads, 0, stream>>>(a, l.team_log2);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    }
  });
  return terms;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cycle_loss_backward(
    const at::Tensor& grad_terms, const at::Tensor& forward_pred, const at::Tensor& target,
    const at::Tensor& cycle_pred, const at::Tensor& source, const std::optional<at::Tensor>& mask,
    int64_t distance, double beta, int64_t need_grad) {
  const CycleLossGradInputs g =
      check_cycle_loss_grad_inputs(grad_terms, forward_pred, target, cycle_pred, source, mask,
                                   distance, beta, need_grad, at::kCUDA);
  const CycleLossInputs& in = g.in;
  const c10::cuda::CUDAGuard device_guard(forward_pred.device());
  std::array<at::Tensor, 4> out = empty_cycle_loss_grads(in, need_grad);
  if (in.rows == 0 || need_grad == 0) return {out[0], out[1], out[2], out[3]};

  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.forward_pred.scalar_type(), "cycle_loss_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const bool smooth = distance == kCycleSmoothL1;
    // the kernels read a pair's inputs only for the gradients that use them
    const BackwardArgs<scalar_t> a{g.grad_terms.data_ptr<acc_t>(),
                                   in.forward_pred.data_ptr<scalar_t>(),
                                   in.target.data_ptr<scalar_t>(),
                                   in.cycle_pred.data_ptr<scalar_t>(),
                                   in.source.data_ptr<scalar_t>(),
                                   data_or_null<bool>(in.mask),
                                   data_or_null<scalar_t>(out[0]),
                                   data_or_null<scalar_t>(out[1]),
                                   data_or_null<scalar_t>(out[2]),
                                   data_or_null<scalar_t>(out[3]),
                                   in.rows,
                                   in.dim,
                                   static_cast<acc_t>(smooth ? beta : 1.0),
                                   static_cast<acc_t>(smooth ? 1.0 / beta : 1.0),
                                   acc_t(1) / static_cast<acc_t>(in.dim)};  // as the CPU kernel
    const Launch l = plan<scalar_t>(
        in.rows, in.dim,
        {a.forward_pred, a.target, a.cycle_pred, a.source, a.d_forward_pred, a.d_target,
         a.d_cycle_pred, a.d_source});
    if (distance == kCycleCosine) {
      if (l.aligned) {
        cycle_loss_backward_cosine_kernel<scalar_t, true><<<l.grid, kThreads, 0, stream>>>(a, l.team_log2);
      } else {
        cycle_loss_backward_cosine_kernel<scalar_t, false><<<l.grid, kThreads, 0, stream>>>(a, l.team_log2);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      dispatch_symmetric(distance, l.aligned, [&](auto dist_tag, auto aligned_tag) {
        constexpr int kDist = decltype(dist_tag)::value;
        constexpr bool kAligned = decltype(aligned_tag)::value;
        cycle_loss_backward_symmetric_kernel<scalar_t, kDist, kAligned>
            <<<l.grid, kThreads, 0, stream>>>(a, l.team_log2);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    }
  });
  return {out[0], out[1], out[2], out[3]};
}

}  // namespace

TORCH_LIBRARY_IMPL(robustmm_C, CUDA, m) {
  m.impl("cycle_loss_forward", &cycle_loss_forward);
  m.impl("cycle_loss_backward", &cycle_loss_backward);
}

}  // namespace cuda
}  // namespace robustmm
