// cycle_reconstruction_loss: the per-element and per-row math shared by the CPU (csrc/cpu) and
// CUDA (csrc/cuda) kernels. T is the accumulation type (float, or double for double inputs).
//
// For a row pair (a, b) of D elements the row distance and its derivatives are
//
//   mse        d = 1/D sum_i x_i^2,  x = a - b              dd/da_i =  2 x_i / D
//   l1         d = 1/D sum_i |x_i|                          dd/da_i =  sign(x_i) / D
//   smooth_l1  d = 1/D sum_i (|x| < beta ? x^2 / (2 beta)   dd/da_i =  (|x| < beta ? x / beta
//                             : |x| - beta / 2)                                 : sign(x)) / D
//              (beta > 0; the caller sends beta == 0 as l1, as torch does)
//   cosine     d = 1 - c,  c = <a, b> / (a' b'),  a' = max(|a|, 1e-8), b' = max(|b|, 1e-8)
//              dd/da = c a / (a' |a|) - b / (a' b'),  dd/db = c b / (b' |b|) - a / (a' b')
//              (a term with |a| = 0 is 0, as in F.cosine_similarity's autograd)
//
// and dd/db = -dd/da for the first three (the "symmetric" distances).
#pragma once

#include <cmath>
#include <cstdint>

#include "robustmm/macros.h"

namespace robustmm {

// The distance codes of the ops' `distance` argument (robustmm_fast/ops/cycle_loss.py).
enum CycleDistance : int64_t { kCycleMse = 0, kCycleL1 = 1, kCycleSmoothL1 = 2, kCycleCosine = 3 };

// need_grad bits of cycle_loss_backward, in input order.
enum CycleNeedGrad : int64_t {
  kNeedForwardPred = 1,
  kNeedTarget = 2,
  kNeedCyclePred = 4,
  kNeedSource = 8,
};

constexpr double kCosineEps = 1e-8;

template <typename T>
struct CycleElem {
  T value;  // added to the row's sum (the row distance is sum / D)
  T grad;   // d value / d a  (d value / d b = -grad)
};

// One element of a symmetric distance (DIST = kCycleMse, kCycleL1 or kCycleSmoothL1). Branch
// free, so loops over it vectorize.
template <int DIST, typename T>
RMM_HOST_DEVICE CycleElem<T> cycle_elem(T a, T b, T beta, T inv_beta) {
  const T x = a - b;
  if (DIST == kCycleMse) return {x * x, T(2) * x};
  const T ax = x < T(0) ? -x : x;
  const T sign = x > T(0) ? T(1) : (x < T(0) ? T(-1) : T(0));
  if (DIST == kCycleL1) return {ax, sign};
  const bool quadratic = ax < beta;
  return {quadratic ? T(0.5) * x * x * inv_beta : ax - T(0.5) * beta,
          quadratic ? x * inv_beta : sign};
}

template <typename T>
RMM_HOST_DEVICE T cycle_sqrt(T x) {
#if defined(__CUDA_ARCH__)
  return sqrt(x);
#else
  return std::sqrt(x);
#endif
}

// A cosine row from its sums: the term 1 - c and the coefficients of its derivatives,
//   dd/da = self_a * a + cross * b,   dd/db = cross * a + self_b * b.
template <typename T>
struct CosineRow {
  T term;
  T self_a;
  T self_b;
  T cross;
};

template <typename T>
RMM_HOST_DEVICE CosineRow<T> cosine_row(T dot, T norm2_a, T norm2_b) {
  const T eps = T(kCosineEps);
  const T na = cycle_sqrt(norm2_a), nb = cycle_sqrt(norm2_b);
  const T na_c = na > eps ? na : eps, nb_c = nb > eps ? nb : eps;
  const T inv = T(1) / (na_c * nb_c);
  const T c = dot * inv;
  return {T(1) - c, na > T(0) ? c / (na_c * na) : T(0), nb > T(0) ? c / (nb_c * nb) : T(0), -inv};
}

}  // namespace robustmm
