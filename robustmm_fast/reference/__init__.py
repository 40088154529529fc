"""Pure-PyTorch references of the ops: the test oracles and the benchmarks' eager baselines."""
from .cycle_loss import cycle_reconstruction_loss
from .reparam_kl import reparameterize_kl

__all__ = ["cycle_reconstruction_loss", "reparameterize_kl"]
