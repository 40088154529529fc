// Per-element math of reparameterize_kl, shared by csrc/cpu and csrc/cuda.
// `sample` is a compile-time constant at every call site; when false, z = mu and the z terms
// of the gradients vanish (even where sigma overflows to inf).
//
// Forward, for one element of a row (acc_t = float, or double for double inputs):
//   sigma = exp(lv / 2)
//   z     = mu + sigma * eps                                  (z = mu when not sampling)
//   kl    = 1/2 [ plv - lv + exp(lv - plv) + (mu - pm)^2 exp(-plv) - 1 ]
//         = -1/2 [ 1 + lv - mu^2 - exp(lv) ]                  (standard normal prior)
// The row's KL is the sum of kl over the last dim.
//
// Backward, with gz = dL/dz (per element) and gk = dL/dKL_row:
//   dmu  = gz + gk (mu - pm) exp(-plv)
//   dlv  = gz eps sigma / 2 + gk (exp(lv - plv) - 1) / 2
//   deps = gz sigma
//   dpm  = -gk (mu - pm) exp(-plv)
//   dplv = gk (1 - exp(lv - plv) - (mu - pm)^2 exp(-plv)) / 2
#pragma once

#include "macros.h"
#include "math.h"

namespace robustmm {

// How z gets its noise: none (z = mu), a given eps tensor, or in-kernel Philox.
enum NoiseMode : int { kNoNoise = 0, kGivenNoise = 1, kPhiloxNoise = 2 };

template <typename acc_t>
struct ReparamKLForward {
  acc_t z;
  acc_t kl;
};

template <typename acc_t>
RMM_HOST_DEVICE ReparamKLForward<acc_t> reparam_kl_forward_elem(bool sample, acc_t mu, acc_t lv,
                                                                acc_t eps, acc_t pm, acc_t plv) {
  const acc_t half = acc_t(0.5);
  const acc_t sigma = exp_f32(half * lv);
  const acc_t diff = mu - pm;
  ReparamKLForward<acc_t> out;
  out.z = sample ? mu + sigma * eps : mu;
  out.kl = half * (plv - lv + exp_f32(lv - plv) + diff * diff * exp_f32(-plv) - acc_t(1));
  return out;
}

// Standard normal prior: saves two exponentials per element.
template <typename acc_t>
RMM_HOST_DEVICE ReparamKLForward<acc_t> reparam_kl_forward_elem(bool sample, acc_t mu, acc_t lv,
                                                                acc_t eps) {
  const acc_t half = acc_t(0.5);
  const acc_t sigma = exp_f32(half * lv);
  ReparamKLForward<acc_t> out;
  out.z = sample ? mu + sigma * eps : mu;
  out.kl = half * (sigma * sigma + mu * mu - acc_t(1) - lv);
  return out;
}

template <typename acc_t>
struct ReparamKLBackward {
  acc_t dmu, dlv, deps, dpm, dplv;
};

template <typename acc_t>
RMM_HOST_DEVICE ReparamKLBackward<acc_t> reparam_kl_backward_elem(bool sample, acc_t gz, acc_t gk,
                                                                  acc_t mu, acc_t lv, acc_t eps,
                                                                  acc_t pm, acc_t plv) {
  const acc_t half = acc_t(0.5);
  const acc_t sigma = exp_f32(half * lv);
  const acc_t inv_prior_var = exp_f32(-plv);
  const acc_t var_ratio = exp_f32(lv - plv);
  const acc_t diff = mu - pm;
  const acc_t pull = gk * diff * inv_prior_var;
  ReparamKLBackward<acc_t> g;
  g.dmu = gz + pull;
  g.dlv = half * ((sample ? gz * eps * sigma : acc_t(0)) + gk * (var_ratio - acc_t(1)));
  g.deps = sample ? gz * sigma : acc_t(0);
  g.dpm = -pull;
  g.dplv = half * gk * (acc_t(1) - var_ratio - diff * diff * inv_prior_var);
  return g;
}

template <typename acc_t>
RMM_HOST_DEVICE ReparamKLBackward<acc_t> reparam_kl_backward_elem(bool sample, acc_t gz, acc_t gk,
                                                                  acc_t mu, acc_t lv, acc_t eps) {
  const acc_t half = acc_t(0.5);
  const acc_t sigma = exp_f32(half * lv);
  ReparamKLBackward<acc_t> g;
  g.dmu = gz + gk * mu;
  g.dlv = half * ((sample ? gz * eps * sigma : acc_t(0)) + gk * (sigma * sigma - acc_t(1)));
  g.deps = sample ? gz * sigma : acc_t(0);
  g.dpm = acc_t(0);
  g.dplv = acc_t(0);
  return g;
}

}  // namespace robustmm
