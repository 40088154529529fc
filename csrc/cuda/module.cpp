// The extension module robustmm_fast._C_cuda. Importing it loads the CUDA kernels, which register
// themselves for the CUDA dispatch key of the ops declared in csrc/ops.cpp (robustmm_fast._C,
// imported first).
#include <torch/extension.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "robustmm_fast CUDA kernels (the ops live in torch.ops.robustmm_C)";
}
