"""The input-rank checks of nn.MultiheadAttention (F._mha_shape_check), with its messages, for
MaskedCrossModalAttention.

Our bad-shape error is a ValueError that is also an AssertionError: ours says ValueError (a bad
argument), and code written against MHA -- which raises AssertionError -- still catches it.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor

__all__ = ["AttentionShapeError", "check_ranks"]


class AttentionShapeError(ValueError, AssertionError):
    """A query/key/value/mask shape that MultiheadAttention's interface does not accept."""


def check_ranks(query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor],
                attn_mask: Optional[Tensor], num_heads: int) -> bool:
    """True if batched (3-D query), False if unbatched (2-D); MHA's messages otherwise."""
    if query.dim() not in (2, 3):
        raise AttentionShapeError(f"query should be unbatched 2D or batched 3D tensor but "
                                  f"received {query.dim()}-D query tensor")
    batched = query.dim() == 3
    rank, form = (3, "batched (3-D)") if batched else (2, "unbatched (2-D)")
    if key.dim() != rank or value.dim() != rank:
        raise AttentionShapeError(f"For {form} `query`, expected `key` and `value` to be "
                                  f"{rank}-D but found {key.dim()}-D and {value.dim()}-D tensors "
                                  f"respectively")
    if key_padding_mask is not None and key_padding_mask.dim() != rank - 1:
        raise AttentionShapeError(f"For {form} `query`, expected `key_padding_mask` to be `None` "
                                  f"or {rank - 1}-D but found {key_padding_mask.dim()}-D tensor "
                                  f"instead")
    if attn_mask is not None and attn_mask.dim() not in (2, 3):
        raise AttentionShapeError(f"For {form} `query`, expected `attn_mask` to be `None`, 2-D or "
                                  f"3-D but found {attn_mask.dim()}-D tensor instead")
    if not batched and attn_mask is not None and attn_mask.dim() == 3:
        expected = (num_heads, query.shape[0], key.shape[0])  # (H, Lq, Lk): a batch of one
        if attn_mask.shape != expected:
            raise AttentionShapeError(f"Expected `attn_mask` shape to be {expected} but got "
                                      f"{attn_mask.shape}")
    return batched
