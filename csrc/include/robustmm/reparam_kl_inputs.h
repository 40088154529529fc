// Host-side argument checks of the reparameterize_kl kernels, shared by csrc/cpu and csrc/cuda:
// each TORCH_CHECK names the argument and what was expected.
#pragma once

#include <torch/types.h>

#include <optional>

#include "checks.h"
#include "reparam_kl.h"

namespace robustmm {

// The inputs, checked and made contiguous; optional ones undefined when absent.
struct ReparamKLInputs {
  at::Tensor mu, logvar, eps, prior_mu, prior_logvar, mask;
};

inline ReparamKLInputs check_reparam_kl_inputs(
    const at::Tensor& mu, const at::Tensor& logvar, const std::optional<at::Tensor>& eps,
    const std::optional<at::Tensor>& prior_mu, const std::optional<at::Tensor>& prior_logvar,
    const std::optional<at::Tensor>& mask, int64_t noise, c10::DeviceType device_type) {
  check_floating(mu, "mu");
  TORCH_CHECK_VALUE(mu.dim() >= 1, "robustmm: mu must have at least 1 dim (..., D), got a scalar");
  check_like(logvar, "logvar", mu, "mu");
  TORCH_CHECK_VALUE(noise == kNoNoise || noise == kGivenNoise || noise == kPhiloxNoise,
                    "robustmm: noise must be 0 (none), 1 (given eps) or 2 (in-kernel), got ",
                    noise);
  TORCH_CHECK_VALUE(eps.has_value() == (noise == kGivenNoise),
                    "robustmm: eps must be given exactly when noise == 1");
  TORCH_CHECK_VALUE(prior_mu.has_value() == prior_logvar.has_value(),
                    "robustmm: prior_mu and prior_logvar must be given together at this level");
  TORCH_CHECK(mu.device().type() == device_type, "robustmm: the ", c10::DeviceTypeName(device_type),
              " kernel got tensors on ", mu.device());
  ReparamKLInputs in;
  in.mu = mu.contiguous();
  in.logvar = logvar.contiguous();
  if (eps) {
    check_like(*eps, "eps", mu, "mu");
    in.eps = eps->contiguous();
  }
  if (prior_mu) {
    check_like(*prior_mu, "prior_mu", mu, "mu");
    check_like(*prior_logvar, "prior_logvar", mu, "mu");
    in.prior_mu = prior_mu->contiguous();
    in.prior_logvar = prior_logvar->contiguous();
  }
  if (mask) {
    check_row_mask(*mask, "mask", mu, "mu");
    in.mask = mask->contiguous();
  }
  return in;
}

// The upstream gradients of the backward: grad_z like mu, grad_kl per row in the accumulation
// dtype. Returns them contiguous.
inline std::pair<at::Tensor, at::Tensor> check_reparam_kl_grads(const at::Tensor& grad_z,
                                                                const at::Tensor& grad_kl,
                                                                const at::Tensor& mu) {
  check_like(grad_z, "grad_z", mu, "mu");
  const auto lead = mu.sizes().slice(0, mu.dim() - 1);
  TORCH_CHECK_VALUE(grad_kl.sizes() == lead, "robustmm: grad_kl must have shape ", lead, ", got ",
                    grad_kl.sizes());
  TORCH_CHECK_TYPE(grad_kl.scalar_type() == accumulate_type(mu.scalar_type()),
                   "robustmm: grad_kl must be ", accumulate_type(mu.scalar_type()), ", got ",
                   grad_kl.scalar_type());
  TORCH_CHECK(grad_kl.device() == mu.device(), "robustmm: grad_kl and mu must be on the same device, got ",
              grad_kl.device(), " and ", mu.device());
  return {grad_z.contiguous(), grad_kl.contiguous()};
}

// The backward's outputs, allocated like mu: dmu and dlogvar always; deps only when asked for
// and eps was given; the prior's two only when asked for and a prior was given (else undefined,
// which the op returns as None).
struct ReparamKLGrads {
  at::Tensor mu, logvar, eps, prior_mu, prior_logvar;
};

inline ReparamKLGrads empty_reparam_kl_grads(const ReparamKLInputs& in, bool need_grad_eps,
                                             bool need_grad_prior) {
  ReparamKLGrads g;
  g.mu = at::empty_like(in.mu);
  g.logvar = at::empty_like(in.mu);
  if (need_grad_eps && in.eps.defined()) g.eps = at::empty_like(in.mu);
  if (need_grad_prior && in.prior_mu.defined()) {
    g.prior_mu = at::empty_like(in.mu);
    g.prior_logvar = at::empty_like(in.mu);
  }
  return g;
}

template <typename T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

template <typename T>
T* mutable_ptr_or_null(at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

}  // namespace robustmm
