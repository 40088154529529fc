// Host-side checks and output allocation of cycle_loss_forward / cycle_loss_backward, shared by
// the CPU and CUDA entry points so both reject bad input with the same messages.
#pragma once

#include <torch/types.h>

#include "robustmm/checks.h"
#include "robustmm/cycle_loss.h"

namespace robustmm {

struct CycleLossInputs {
  at::Tensor forward_pred, target, cycle_pred, source;  // contiguous
  at::Tensor mask;                                      // contiguous bool, or undefined
  int64_t rows;
  int64_t dim;
};

inline void check_cycle_distance(int64_t distance) {
  TORCH_CHECK_VALUE(distance >= kCycleMse && distance <= kCycleCosine,
                    "robustmm: distance must be 0 (mse), 1 (l1), 2 (smooth_l1) or 3 (cosine), got ",
                    distance);
}

inline CycleLossInputs check_cycle_loss_inputs(const at::Tensor& forward_pred,
                                               const at::Tensor& target,
                                               const at::Tensor& cycle_pred,
                                               const at::Tensor& source,
                                               const std::optional<at::Tensor>& mask,
                                               int64_t distance, double beta,
                                               c10::DeviceType device_type) {
  check_floating(forward_pred, "forward_pred");
  TORCH_CHECK(forward_pred.device().type() == device_type, "robustmm: forward_pred must be a ",
              c10::DeviceTypeName(device_type), " tensor for this kernel, got ",
              forward_pred.device());
  TORCH_CHECK_VALUE(forward_pred.dim() >= 1 && forward_pred.size(-1) > 0,
                    "robustmm: forward_pred must have shape (..., D) with D > 0, got ",
                    forward_pred.sizes());
  check_like(target, "target", forward_pred, "forward_pred");
  check_like(cycle_pred, "cycle_pred", forward_pred, "forward_pred");
  check_like(source, "source", forward_pred, "forward_pred");
  check_cycle_distance(distance);
  TORCH_CHECK_VALUE(distance != kCycleSmoothL1 || beta > 0.0,
                    "robustmm: smooth_l1 needs beta > 0 (beta == 0 is l1), got ", beta);
  CycleLossInputs in{forward_pred.contiguous(), target.contiguous(), cycle_pred.contiguous(),
                     source.contiguous(), at::Tensor(), 0, forward_pred.size(-1)};
  in.rows = forward_pred.numel() / in.dim;
  if (mask.has_value() && mask->defined()) {
    check_row_mask(*mask, "mask", forward_pred, "forward_pred");
    in.mask = mask->contiguous();
  }
  return in;
}

// (terms, grad_forward, grad_target, grad_cycle, grad_source), unfilled. The derivatives exist
// only when asked for; grad_target / grad_source only for cosine (the symmetric distances'
// are the negatives of grad_forward / grad_cycle).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
empty_cycle_loss_outputs(const CycleLossInputs& in, int64_t distance, bool need_grad) {
  const at::Tensor& ref = in.forward_pred;
  const auto acc = ref.options().dtype(accumulate_type(ref.scalar_type()));
  std::vector<int64_t> terms_shape{2};
  for (int64_t d = 0; d + 1 < ref.dim(); ++d) terms_shape.push_back(ref.size(d));
  at::Tensor terms = at::empty(terms_shape, acc);
  auto full = [&] { return at::empty(ref.sizes(), acc); };
  auto none = [&] { return at::empty({0}, acc); };
  if (!need_grad) return {terms, none(), none(), none(), none()};
  const bool cosine = distance == kCycleCosine;
  return {terms, full(), cosine ? full() : none(), full(), cosine ? full() : none()};
}

struct CycleLossGradInputs {
  at::Tensor grad_terms, grad_forward, grad_target, grad_cycle, grad_source, mask;
  int64_t rows;
  int64_t dim;
};

inline CycleLossGradInputs check_cycle_loss_grad_inputs(
    const at::Tensor& grad_terms, const at::Tensor& grad_forward, const at::Tensor& grad_target,
    const at::Tensor& grad_cycle, const at::Tensor& grad_source,
    const std::optional<at::Tensor>& mask, int64_t distance, int64_t need_grad,
    at::ScalarType dtype, c10::DeviceType device_type) {
  check_cycle_distance(distance);
  TORCH_CHECK_VALUE(need_grad >= 0 && need_grad <= 15,
                    "robustmm: need_grad must be a 4-bit mask (1, 2, 4, 8), got ", need_grad);
  TORCH_CHECK_TYPE(at::isFloatingType(dtype), "robustmm: dtype must be a floating type, got ",
                   dtype);
  check_floating(grad_forward, "grad_forward");
  TORCH_CHECK(grad_forward.device().type() == device_type, "robustmm: grad_forward must be a ",
              c10::DeviceTypeName(device_type), " tensor for this kernel, got ",
              grad_forward.device());
  TORCH_CHECK_VALUE(grad_forward.dim() >= 1 && grad_forward.size(-1) > 0,
                    "robustmm: grad_forward must have shape (..., D) with D > 0, got ",
                    grad_forward.sizes());
  TORCH_CHECK_TYPE(grad_forward.scalar_type() == accumulate_type(dtype),
                   "robustmm: grad_forward must be ", accumulate_type(dtype), " for dtype ", dtype,
                   ", got ", grad_forward.scalar_type());
  check_like(grad_cycle, "grad_cycle", grad_forward, "grad_forward");
  if (distance == kCycleCosine) {
    check_like(grad_target, "grad_target", grad_forward, "grad_forward");
    check_like(grad_source, "grad_source", grad_forward, "grad_forward");
  }
  const int64_t dim = grad_forward.size(-1);
  const int64_t rows = grad_forward.numel() / dim;
  TORCH_CHECK_TYPE(grad_terms.scalar_type() == grad_forward.scalar_type(),
                   "robustmm: grad_terms and grad_forward must have the same dtype, got ",
                   grad_terms.scalar_type(), " and ", grad_forward.scalar_type());
  TORCH_CHECK(grad_terms.device() == grad_forward.device(),
              "robustmm: grad_terms and grad_forward must be on the same device, got ",
              grad_terms.device(), " and ", grad_forward.device());
  TORCH_CHECK_VALUE(grad_terms.numel() == 2 * rows && grad_terms.dim() >= 1 &&
                        grad_terms.size(0) == 2,
                    "robustmm: grad_terms must have shape (2, ...) with the leading dims of "
                    "grad_forward ", grad_forward.sizes(), ", got ", grad_terms.sizes());
  CycleLossGradInputs in{grad_terms.contiguous(), grad_forward.contiguous(),
                         grad_target.contiguous(), grad_cycle.contiguous(),
                         grad_source.contiguous(), at::Tensor(), rows, dim};
  if (mask.has_value() && mask->defined()) {
    check_row_mask(*mask, "mask", grad_forward, "grad_forward");
    in.mask = mask->contiguous();
  }
  return in;
}

// The four input gradients: full tensors of `dtype` where need_grad asks, numel 0 elsewhere.
inline std::array<at::Tensor, 4> empty_cycle_loss_grads(const CycleLossGradInputs& in,
                                                        int64_t need_grad, at::ScalarType dtype) {
  const auto opts = in.grad_forward.options().dtype(dtype);
  std::array<at::Tensor, 4> out;
  for (int k = 0; k < 4; ++k) {
    out[k] = (need_grad >> k) & 1 ? at::empty(in.grad_forward.sizes(), opts) : at::empty({0}, opts);
  }
  return out;
}

}  // namespace robustmm
