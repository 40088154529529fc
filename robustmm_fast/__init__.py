"""robustmm_fast: fused PyTorch ops, drop-in layers and published methods for multimodal
learning when modalities go missing."""
from ._backend import backends, last_backend, use_backend
from . import nn, ops
from .ops import cycle_reconstruction_loss, masked_cross_attention, reparameterize_kl

__version__ = "0.1.0"
__all__ = ["backends", "use_backend", "last_backend", "ops", "nn", "reparameterize_kl",
           "cycle_reconstruction_loss", "masked_cross_attention", "__version__"]
