"""Drop-in layers built on the fused ops."""
from .gaussian_bottleneck import GaussianBottleneck

__all__ = ["GaussianBottleneck"]
