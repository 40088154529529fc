"""The fused ops. Each is a torch.library custom op in the ``robustmm`` namespace with a fake
and an autograd registration; the backend is chosen per call (see robustmm_fast.use_backend)."""
from .reparam_kl import reparameterize_kl

__all__ = ["reparameterize_kl"]
