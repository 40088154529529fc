// Host-side argument checks shared by the CPU and CUDA entry points (TORCH_CHECK raises
// ValueError/TypeError-like c10 errors that name the argument).
#pragma once

#include <torch/types.h>

#include <string>

namespace robustmm {

inline void check_floating(const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(t.is_floating_point(), "robustmm: ", name,
                   " must be a floating-point tensor (float16, bfloat16, float32 or float64), got ",
                   t.scalar_type());
}

// `t` must match `ref` (named `ref_name`) in dtype, device and shape.
inline void check_like(const at::Tensor& t, const char* name, const at::Tensor& ref,
                       const char* ref_name) {
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), "robustmm: ", name, " and ", ref_name,
                   " must have the same dtype, got ", t.scalar_type(), " and ", ref.scalar_type());
  TORCH_CHECK(t.device() == ref.device(), "robustmm: ", name, " and ", ref_name,
              " must be on the same device, got ", t.device(), " and ", ref.device());
  TORCH_CHECK_VALUE(t.sizes() == ref.sizes(), "robustmm: ", name, " must have the shape of ",
                    ref_name, " ", ref.sizes(), ", got ", t.sizes());
}

// A row mask: bool, on `ref`'s device, shaped like `ref` without its last dim.
inline void check_row_mask(const at::Tensor& mask, const char* name, const at::Tensor& ref,
                           const char* ref_name) {
  TORCH_CHECK_TYPE(mask.scalar_type() == at::kBool, "robustmm: ", name,
                   " must be a bool tensor (True = include), got ", mask.scalar_type());
  TORCH_CHECK(mask.device() == ref.device(), "robustmm: ", name, " and ", ref_name,
              " must be on the same device, got ", mask.device(), " and ", ref.device());
  const auto lead = ref.sizes().slice(0, ref.dim() - 1);
  TORCH_CHECK_VALUE(mask.sizes() == lead, "robustmm: ", name, " must have shape ", lead,
                    " (the leading dims of ", ref_name, "), got ", mask.sizes());
}

inline at::ScalarType accumulate_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace robustmm
