// Host-side argument checks of masked_attention_forward / masked_attention_backward, shared by
// csrc/cpu and csrc/cuda so both reject bad input with the same messages.
#pragma once

#include <torch/types.h>

#include <cmath>
#include <optional>

#include "checks.h"

namespace robustmm {

struct MaskedAttentionInputs {
  at::Tensor q, k, v;  // contiguous; q (B, H, Lq, d), k and v (B, H, Lk, d)
  at::Tensor key_keep;  // contiguous bool (B, Lk), or undefined (every key kept)
  int64_t batch, heads, lq, lk, dim;
};

inline MaskedAttentionInputs check_masked_attention_inputs(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& key_keep, double dropout_p, double scale,
    c10::DeviceType device_type) {
  check_floating(q, "q");
  TORCH_CHECK(q.device().type() == device_type, "robustmm: q must be a ",
              c10::DeviceTypeName(device_type), " tensor for this kernel, got ", q.device());
  TORCH_CHECK_VALUE(q.dim() == 4, "robustmm: q must have shape (B, H, Lq, d) (4 dims), got ",
                    q.sizes());
  TORCH_CHECK_VALUE(q.size(3) >= 1, "robustmm: q's head dim d must be >= 1, got ", q.sizes());
  for (const auto& named : {std::make_pair(&k, "k"), std::make_pair(&v, "v")}) {
    const at::Tensor& t = *named.first;
    const char* name = named.second;
    TORCH_CHECK_TYPE(t.scalar_type() == q.scalar_type(), "robustmm: ", name,
                     " and q must have the same dtype, got ", t.scalar_type(), " and ",
                     q.scalar_type());
    TORCH_CHECK(t.device() == q.device(), "robustmm: ", name, " and q must be on the same device, got ",
                t.device(), " and ", q.device());
    TORCH_CHECK_VALUE(t.dim() == 4 && t.size(0) == q.size(0) && t.size(1) == q.size(1) &&
                          t.size(3) == q.size(3),
                      "robustmm: ", name, " must have shape (B=", q.size(0), ", H=", q.size(1),
                      ", Lk, d=", q.size(3), ") to match q ", q.sizes(), ", got ", t.sizes());
  }
  TORCH_CHECK_VALUE(v.sizes() == k.sizes(), "robustmm: v must have the shape of k ", k.sizes(),
                    ", got ", v.sizes());
  TORCH_CHECK_VALUE(dropout_p >= 0.0 && dropout_p < 1.0,
                    "robustmm: dropout_p must be in [0, 1), got ", dropout_p);
  TORCH_CHECK_VALUE(std::isfinite(scale), "robustmm: scale must be finite, got ", scale);
  MaskedAttentionInputs in;
  in.batch = q.size(0);
  in.heads = q.size(1);
  in.lq = q.size(2);
  in.lk = k.size(2);
  in.dim = q.size(3);
  in.q = q.contiguous();
  in.k = k.contiguous();
  in.v = v.contiguous();
  if (key_keep.has_value() && key_keep->defined()) {
    const at::Tensor& keep = *key_keep;
    TORCH_CHECK_TYPE(keep.scalar_type() == at::kBool,
                     "robustmm: key_keep must be a bool tensor (True = attend), got ",
                     keep.scalar_type());
    TORCH_CHECK(keep.device() == q.device(), "robustmm: key_keep and q must be on the same device, got ",
                keep.device(), " and ", q.device());
    TORCH_CHECK_VALUE(keep.dim() == 2 && keep.size(0) == in.batch && keep.size(1) == in.lk,
                      "robustmm: key_keep must have shape (B=", in.batch, ", Lk=", in.lk,
                      "), got ", keep.sizes());
    in.key_keep = keep.contiguous();
  }
  return in;
}

// The backward's extra tensors: grad_out and out like q, lse (B, H, Lq) in the accumulation
// dtype. Returns (grad_out, out, lse) contiguous.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> check_masked_attention_grads(
    const at::Tensor& grad_out, const at::Tensor& out, const at::Tensor& lse, const at::Tensor& q) {
  check_like(grad_out, "grad_out", q, "q");
  check_like(out, "out", q, "q");
  const at::ScalarType acc = accumulate_type(q.scalar_type());
  TORCH_CHECK_TYPE(lse.scalar_type() == acc, "robustmm: lse must be ", acc, " for ",
                   q.scalar_type(), " inputs, got ", lse.scalar_type());
  TORCH_CHECK(lse.device() == q.device(), "robustmm: lse and q must be on the same device, got ",
              lse.device(), " and ", q.device());
  const auto lead = q.sizes().slice(0, 3);
  TORCH_CHECK_VALUE(lse.sizes() == lead, "robustmm: lse must have shape ", lead,
                    " (B, H, Lq), got ", lse.sizes());
  return {grad_out.contiguous(), out.contiguous(), lse.contiguous()};
}

}  // namespace robustmm
