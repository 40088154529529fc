"""Drop-in layers built on the fused ops."""
from .cycle_consistency import CycleConsistency
from .cycle_translator import CycleTranslator
from .gaussian_bottleneck import GaussianBottleneck
from .masked_batch_norm import masked_batch_norm

__all__ = ["CycleConsistency", "CycleTranslator", "GaussianBottleneck", "masked_batch_norm"]
