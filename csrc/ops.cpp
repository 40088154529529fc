// The extension module robustmm_fast._C: the schemas of the kernel-level ops (declared once,
// here) and a few build facts for `robustmm info`. The kernels register themselves per device
// in cpu/ and cuda/; robustmm_fast/ops wraps them as the public torch.library custom ops.
#include <torch/extension.h>

#include "robustmm/cpu_capability.h"

TORCH_LIBRARY(robustmm_C, m) {
  // reparameterize_kl. noise: 0 = z is mu, 1 = eps given, 2 = eps drawn in-kernel from seed.
  // kl is per row (the leading dims) in float32 (float64 for float64 inputs).
  m.def(
      "reparam_kl_forward(Tensor mu, Tensor logvar, Tensor? eps, Tensor? prior_mu, "
      "Tensor? prior_logvar, Tensor? mask, int seed, int noise) -> (Tensor, Tensor)");
  m.def(
      "reparam_kl_backward(Tensor grad_z, Tensor grad_kl, Tensor mu, Tensor logvar, Tensor? eps, "
      "Tensor? prior_mu, Tensor? prior_logvar, Tensor? mask, int seed, int noise, "
      "bool need_grad_eps, bool need_grad_prior) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "robustmm_fast C++ kernels (the ops live in torch.ops.robustmm_C)";
  m.def("cpu_capability", [] { return std::string(robustmm::cpu::capability_name()); },
        "Which copy of the CPU kernels runs: 'avx2' or 'default'.");
  m.def("openmp", [] {
#ifdef _OPENMP
    return true;
#else
    return false;
#endif
  }, "Whether the extension was compiled with OpenMP (parallel CPU kernels).");
}
