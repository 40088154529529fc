"""The fused ops. Each is a torch.library custom op in the ``robustmm`` namespace with a fake
and an autograd registration; the backend is chosen per call (see robustmm_fast.use_backend)."""
from .cycle_loss import cycle_reconstruction_loss
from .masked_attention import masked_cross_attention
from .reparam_kl import reparameterize_kl

__all__ = ["cycle_reconstruction_loss", "masked_cross_attention", "reparameterize_kl"]
