"""Pure-PyTorch references of the ops: the test oracles and the benchmarks' eager baselines."""
from .reparam_kl import reparameterize_kl

__all__ = ["reparameterize_kl"]
