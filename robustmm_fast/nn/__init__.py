"""Drop-in layers built on the fused ops."""
from .gaussian_bottleneck import GaussianBottleneck
from .masked_batch_norm import masked_batch_norm

__all__ = ["GaussianBottleneck", "masked_batch_norm"]
