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
  // cycle_reconstruction_loss. distance: 0 mse, 1 l1, 2 smooth_l1 (beta > 0), 3 cosine.
  // Forward: the per-row terms (2, ...) only (float32; float64 for float64). Backward: the
  // gradients of the four inputs (their dtype) recomputed from them, scaled by grad_terms;
  // need_grad bits: 1 forward_pred, 2 target, 4 cycle_pred, 8 source (a clear bit: numel 0).
  // See robustmm_fast/ops/cycle_loss.py.
  m.def(
      "cycle_loss_forward(Tensor forward_pred, Tensor target, Tensor cycle_pred, Tensor source, "
      "Tensor? mask, int distance, float beta) -> Tensor");
  m.def(
      "cycle_loss_backward(Tensor grad_terms, Tensor forward_pred, Tensor target, "
      "Tensor cycle_pred, Tensor source, Tensor? mask, int distance, float beta, int need_grad) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  // masked_cross_attention. key_keep: (B, Lk) bool, True = attend (absent modalities and
  // padding False); lse: (B, H, Lq) float32 (float64 for float64), -inf for a row with no key.
  // Dropout: element (b, h, i, j) with flat index n is dropped when rand_at(seed, n) < dropout_p.
  m.def(
      "masked_attention_forward(Tensor q, Tensor k, Tensor v, Tensor? key_keep, bool is_causal, "
      "float dropout_p, float scale, int seed) -> (Tensor, Tensor)");
  m.def(
      "masked_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, "
      "Tensor lse, Tensor? key_keep, bool is_causal, float dropout_p, float scale, int seed) "
      "-> (Tensor, Tensor, Tensor)");
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
