"""MaskedCrossModalAttention's input checks: the ranks as nn.MultiheadAttention checks them
(F._mha_shape_check, with its messages), then the sizes and mask dtypes.

Our bad-shape error is a ValueError that is also an AssertionError: ours says ValueError (a bad
argument), and code written against MHA -- which raises AssertionError -- still catches it.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["AttentionShapeError", "check_ranks", "check_shapes"]


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


def check_shapes(layer, query: Tensor, key: Tensor, value: Tensor,
                 key_padding_mask: Optional[Tensor], attn_mask: Optional[Tensor], is_causal: bool,
                 given: str) -> None:
    """query (B, Lq, E), key (B, Lk, kdim), value (B, Lk, vdim) after the layout change (from
    `given`); masks bool or float, key_padding_mask (B, Lk), attn_mask (Lq, Lk) or (B*H, Lq, Lk)
    unless is_causal (then only a hint, unread)."""
    (B, Lq, E), Lk, H = query.shape, key.shape[1], layer.num_heads
    if (E, key.shape[-1], value.shape[-1]) != (layer.embed_dim, layer.kdim, layer.vdim) \
            or key.shape[:2] != value.shape[:2] or key.shape[0] != B:
        raise AttentionShapeError(
            f"expected query (B, Lq, {layer.embed_dim}), key (B, Lk, {layer.kdim}), value "
            f"(B, Lk, {layer.vdim}) (given as {given}), got {tuple(query.shape)}, "
            f"{tuple(key.shape)}, {tuple(value.shape)} after the layout change")
    for name, m in (("key_padding_mask", key_padding_mask), ("attn_mask", attn_mask)):
        if m is not None and not (m.dtype == torch.bool or m.is_floating_point()):
            raise TypeError(f"{name} must be bool (True = masked) or float (additive), "
                            f"got {m.dtype}")
    if attn_mask is not None and not is_causal \
            and tuple(attn_mask.shape) not in ((Lq, Lk), (B * H, Lq, Lk)):
        raise AttentionShapeError(
            f"attn_mask must have shape (Lq, Lk)=({Lq}, {Lk}) or (B*H, Lq, Lk)=({B * H}, {Lq}, "
            f"{Lk}), got {tuple(attn_mask.shape)}")
    if key_padding_mask is not None and key_padding_mask.is_floating_point() \
            and key_padding_mask.shape != (B, Lk):  # a bool one: key_keep checks it
        raise AttentionShapeError(f"key_padding_mask must have shape (B={B}, Lk={Lk}), got "
                                  f"{tuple(key_padding_mask.shape)}")
