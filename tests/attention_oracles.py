"""Attention oracles shared by the GPU and interpret tiers of masked_cross_attention (a plain
module, not a test file: the interpret file sets TRITON_INTERPRET at import, so the GPU file
cannot import from it)."""
from __future__ import annotations

import torch

from robustmm_fast.reference import masked_attention as ref
from robustmm_fast.reference.philox import philox_uniform


def allowed_of(q, k, keep, is_causal):
    """(B, Lq, Lk) bool: query i of sample b may attend to key j."""
    B, Lq, Lk = q.shape[0], q.shape[2], k.shape[2]
    allowed = torch.ones(B, Lq, Lk, dtype=torch.bool, device=q.device)
    if keep is not None:
        allowed = allowed & keep[:, None, :]
    if is_causal:
        allowed = allowed & torch.ones(Lq, Lk, dtype=torch.bool, device=q.device).tril()
    return allowed


def eager_lowp(q, k, v, *, present=None, key_lengths=None, key_padding_mask=None,
               is_causal=False, dropout_p=0.0, scale=None, seed=0):
    """PyTorch's own low-precision attention (matmuls and probabilities in q's dtype, as
    flash-attention's attention_ref(upcast=False)): the baseline of the 2x error rule."""
    B, H, Lq, d = q.shape
    Lk = k.shape[2]
    scale = d ** -0.5 if scale is None else scale
    keep = ref.key_keep_mask(B, Lk, present, key_lengths, key_padding_mask, q.device)
    allowed = allowed_of(q, k, keep, is_causal)[:, None]
    s = torch.where(allowed, torch.matmul(q, k.transpose(-1, -2)) * scale, float("-inf"))
    a = torch.softmax(s.float(), dim=-1)
    a = torch.where(allowed.any(-1, keepdim=True), a, 0.0).to(q.dtype)
    if dropout_p > 0:
        u = philox_uniform(seed, (B, H, Lq, Lk), device=q.device)
        a = torch.where(u >= dropout_p, a / (1 - dropout_p), torch.zeros((), dtype=q.dtype,
                                                                         device=q.device))
    return torch.matmul(a, v)
