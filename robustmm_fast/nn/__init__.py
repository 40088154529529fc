"""Drop-in layers built on the fused ops."""
from .cross_modal_transformer import CrossModalTransformer
from .cycle_consistency import CycleConsistency
from .cycle_translator import CycleTranslator
from .gaussian_bottleneck import GaussianBottleneck
from .masked_attention import MaskedCrossModalAttention
from .masked_batch_norm import masked_batch_norm
from .multimodal_fusion import JointFusion, MulTFusion

__all__ = ["CrossModalTransformer", "CycleConsistency", "CycleTranslator", "GaussianBottleneck",
           "JointFusion", "MaskedCrossModalAttention", "MulTFusion", "masked_batch_norm"]
