"""Pure-PyTorch references of the ops: the test oracles and the benchmarks' eager baselines."""
from .cycle_loss import cycle_reconstruction_loss
from .masked_attention import masked_cross_attention
from .reparam_kl import reparameterize_kl

__all__ = ["cycle_reconstruction_loss", "masked_cross_attention", "reparameterize_kl"]
