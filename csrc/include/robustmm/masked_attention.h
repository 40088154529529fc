// Per-element math of masked_cross_attention, shared by csrc/cpu and csrc/cuda.
//
//   allowed(b, i, j) = key_keep[b, j] and (not causal or j <= i)
//   s_ij   = scale * <q_i, k_j>
//   lse_i  = log sum_{allowed j} exp(s_ij)                  (-inf when no j is allowed)
//   p_ij   = exp(s_ij - lse_i)                              (0 when not allowed)
//   out_i  = sum_j p_ij * Z_ij / (1 - dropout_p) * v_j      (0 for a row with no allowed j)
//
// Dropout: Z_ij = rand_at(seed, n) >= dropout_p, n = ((b * H + h) * Lq + i) * Lk + j, the
// Philox uniform stream of philox.h (component n & 3 of counter n >> 2); the factor
// 1 / (1 - dropout_p) is rounded to float (for double inputs too, as the reference).
//
// Backward from the saved lse (dO the upstream gradient, O the saved output):
//   D_i   = sum_d dO_i O_i
//   dV_j  = sum_i p_ij Z_ij / (1 - p) dO_i
//   dS_ij = p_ij (Z_ij / (1 - p) <dO_i, v_j> - D_i)
//   dQ_i  = scale sum_j dS_ij k_j,   dK_j = scale sum_i dS_ij q_i
#pragma once

#include <cstdint>

#include "macros.h"
#include "philox.h"

namespace robustmm {

// The flat (B, H, Lq, Lk) index of element (bh = b * H + h, i, j): the dropout counter.
RMM_HOST_DEVICE uint64_t attention_dropout_index(int64_t bh, int64_t lq, int64_t i, int64_t lk,
                                                 int64_t j) {
  return (static_cast<uint64_t>(bh) * static_cast<uint64_t>(lq) + static_cast<uint64_t>(i)) *
             static_cast<uint64_t>(lk) +
         static_cast<uint64_t>(j);
}

// The factor Z / (1 - p) of a uniform u from the stream: 0 (dropped) or 1 / (1 - p).
RMM_HOST_DEVICE float attention_dropout_factor(float u, float dropout_p, float inv_keep) {
  return u >= dropout_p ? inv_keep : 0.0f;
}

// Z / (1 - p) of element n, recomputed from the seed alone.
RMM_HOST_DEVICE float attention_dropout_at(uint64_t seed, uint64_t n, float dropout_p,
                                           float inv_keep) {
  return attention_dropout_factor(rand_at(seed, n), dropout_p, inv_keep);
}

}  // namespace robustmm
