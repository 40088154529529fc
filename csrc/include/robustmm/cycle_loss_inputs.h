// Host-side checks and output allocation of cycle_loss_forward / cycle_loss_backward, shared by
// the CPU and CUDA entry points so both reject bad input with the same messages.
#pragma once

#include <torch/types.h>

#include <array>
#include <optional>
#include <vector>

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

// The per-row terms (2, ...), unfilled: float32 (float64 for float64 inputs).
inline at::Tensor empty_cycle_loss_terms(const CycleLossInputs& in) {
  const at::Tensor& ref = in.forward_pred;
  std::vector<int64_t> terms_shape{2};
  for (int64_t d = 0; d + 1 < ref.dim(); ++d) terms_shape.push_back(ref.size(d));
  return at::empty(terms_shape, ref.options().dtype(accumulate_type(ref.scalar_type())));
}

struct CycleLossGradInputs {
  CycleLossInputs in;    // the four saved inputs and the mask, checked as for the forward
  at::Tensor grad_terms;  // contiguous (2, ...) in the terms' dtype
};

// cycle_loss_backward's arguments: the forward's checks on the inputs, then need_grad and
// grad_terms (the upstream gradient of the (2, ...) terms: their dtype, device and shape).
inline CycleLossGradInputs check_cycle_loss_grad_inputs(
    const at::Tensor& grad_terms, const at::Tensor& forward_pred, const at::Tensor& target,
    const at::Tensor& cycle_pred, const at::Tensor& source, const std::optional<at::Tensor>& mask,
    int64_t distance, double beta, int64_t need_grad, c10::DeviceType device_type) {
  CycleLossGradInputs g{check_cycle_loss_inputs(forward_pred, target, cycle_pred, source, mask,
                                                distance, beta, device_type),
                        at::Tensor()};
  TORCH_CHECK_VALUE(need_grad >= 0 && need_grad <= 15,
                    "robustmm: need_grad must be a 4-bit mask (1 forward_pred, 2 target, "
                    "4 cycle_pred, 8 source), got ", need_grad);
  const at::ScalarType acc = accumulate_type(forward_pred.scalar_type());
  TORCH_CHECK_TYPE(grad_terms.scalar_type() == acc, "robustmm: grad_terms must be ", acc,
                   " (the dtype of the terms for ", forward_pred.scalar_type(),
                   " forward_pred), got ", grad_terms.scalar_type());
  TORCH_CHECK(grad_terms.device() == forward_pred.device(),
              "robustmm: grad_terms and forward_pred must be on the same device, got ",
              grad_terms.device(), " and ", forward_pred.device());
  std::vector<int64_t> terms_shape{2};
  for (int64_t d = 0; d + 1 < forward_pred.dim(); ++d) terms_shape.push_back(forward_pred.size(d));
  TORCH_CHECK_VALUE(grad_terms.sizes() == at::IntArrayRef(terms_shape),
                    "robustmm: grad_terms must have shape ", at::IntArrayRef(terms_shape),
                    " (2, then the leading dims of forward_pred ", forward_pred.sizes(),
                    "), got ", grad_terms.sizes());
  g.grad_terms = grad_terms.contiguous();
  return g;
}

// The four input gradients in the inputs' dtype: full tensors where need_grad asks, numel 0
// elsewhere.
inline std::array<at::Tensor, 4> empty_cycle_loss_grads(const CycleLossInputs& in,
                                                        int64_t need_grad) {
  const auto opts = in.forward_pred.options();
  std::array<at::Tensor, 4> out;
  for (int k = 0; k < 4; ++k) {
    out[k] = (need_grad >> k) & 1 ? at::empty(in.forward_pred.sizes(), opts) : at::empty({0}, opts);
  }
  return out;
}

}  // namespace robustmm
