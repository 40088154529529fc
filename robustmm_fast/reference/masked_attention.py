"""Reference masked_cross_attention: plain PyTorch on materialized (Lq, Lk) scores, autograd
for the gradients. The test oracle and the benchmark's eager baseline.

    keep[b, j]  = present[b, segment(j)] and not key_padding_mask[b, j]  (and j <= i if causal)
    s[b,h,i,j]  = scale * <q[b,h,i], k[b,h,j]>            (scale = d^-1/2 by default)
    p           = softmax_j(s where keep else -inf)       a row with no key kept: p = 0
    out         = (p * dropout_keep / (1 - dropout_p)) @ v

    lse[b,h,i]  = log sum_j exp(s) over kept j            (-inf for a row with no key kept)

Keys are the concatenation of M modality segments of static lengths `key_lengths`; a sample
attends only to the segments of its present modalities. Dropout: element (b, h, i, j), flat
index n in row-major (B, H, Lq, Lk) order, is dropped when philox_uniform(seed)[n] < dropout_p
(the stream every backend shares). Masked keys never reach the result: NaN there is harmless.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from .philox import philox_uniform


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def key_keep_mask(batch: int, keys: int, present: Optional[Tensor],
                  key_lengths: Optional[Sequence[int]], key_padding_mask: Optional[Tensor],
                  device) -> Optional[Tensor]:
    """(B, Lk) bool, True = the key may be attended to; None when nothing is masked."""
    keep = None
    if present is not None:
        lengths = torch.as_tensor(list(key_lengths), device=present.device)
        keep = present.repeat_interleave(lengths, dim=1, output_size=keys)
    if key_padding_mask is not None:
        keep = ~key_padding_mask if keep is None else keep & ~key_padding_mask
    return None if keep is None else keep.to(device)


def _probabilities(q: Tensor, k: Tensor, v: Tensor, keep: Optional[Tensor], is_causal: bool,
                   dropout_p: float, scale: float, seed: int):
    """(p, dropout scale or None, k and v with unattended keys zeroed, lse) in the
    accumulation dtype; p is the undropped softmax, 0 outside the allowed entries."""
    acc = acc_dtype(q.dtype)
    B, H, Lq, _ = q.shape
    Lk = k.shape[2]
    allowed = torch.ones(B, 1, Lq, Lk, dtype=torch.bool, device=q.device)
    if keep is not None:
        allowed = allowed & keep.view(B, 1, 1, Lk)
    if is_causal:
        allowed = allowed & torch.ones(Lq, Lk, dtype=torch.bool, device=q.device).tril()
    # masked keys and values are replaced before any arithmetic (NaN there must not leak)
    key_ok = allowed.any(2, keepdim=True).transpose(2, 3)  # (B, 1, Lk, 1): attended by some row
    zero = torch.zeros((), dtype=acc, device=q.device)
    kk = torch.where(key_ok, k.to(acc), zero)
    vv = torch.where(key_ok, v.to(acc), zero)
    s = torch.matmul(q.to(acc), kk.transpose(-1, -2)) * scale
    s = torch.where(allowed, s, torch.tensor(float("-inf"), dtype=acc, device=q.device))
    lse = torch.logsumexp(s, dim=-1)                                   # (B, H, Lq)
    row_ok = torch.isfinite(lse).unsqueeze(-1)
    p = torch.where(row_ok, torch.exp(s - torch.where(row_ok, lse.unsqueeze(-1), zero)), zero)
    drop = None
    if dropout_p > 0.0:
        u = philox_uniform(seed, (B, H, Lq, Lk), device=q.device)
        drop = torch.where(u >= dropout_p, 1.0 / (1.0 - dropout_p), 0.0).to(acc)
    return p, drop, kk, vv, lse


def attention_rows(q: Tensor, k: Tensor, v: Tensor, keep: Optional[Tensor], is_causal: bool,
                   dropout_p: float, scale: float, seed: int = 0) -> tuple[Tensor, Tensor]:
    """(out in q's dtype, lse (B, H, Lq) in the accumulation dtype), differentiable."""
    p, drop, _, vv, lse = _probabilities(q, k, v, keep, is_causal, dropout_p, scale, seed)
    out = torch.matmul(p if drop is None else p * drop, vv)
    return out.to(q.dtype), lse


def attention_rows_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor,
                            keep: Optional[Tensor], is_causal: bool, dropout_p: float,
                            scale: float, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) in closed form, with Pd = P * Z / (1 - p):

        dV = Pd^T dO,   dPd = dO V^T,   dS = P * (dPd * Z / (1 - p) - rowsum(Pd * dPd)),
        dQ = scale dS K,   dK = scale dS^T Q
    """
    acc = acc_dtype(q.dtype)
    p, drop, kk, vv, _ = _probabilities(q, k, v, keep, is_causal, dropout_p, scale, seed)
    pd = p if drop is None else p * drop
    do = grad_out.to(acc)
    dv = torch.matmul(pd.transpose(-1, -2), do)
    dpd = torch.matmul(do, vv.transpose(-1, -2))
    dp = dpd if drop is None else dpd * drop
    ds = p * (dp - (pd * dpd).sum(-1, keepdim=True))
    dq = torch.matmul(ds, kk) * scale
    dk = torch.matmul(ds.transpose(-1, -2), q.to(acc)) * scale
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def masked_cross_attention(q: Tensor, k: Tensor, v: Tensor, *, present: Optional[Tensor] = None,
                           key_lengths: Optional[Sequence[int]] = None,
                           key_padding_mask: Optional[Tensor] = None, is_causal: bool = False,
                           dropout_p: float = 0.0, scale: Optional[float] = None,
                           seed: int = 0) -> Tensor:
    """The oracle of robustmm_fast.ops.masked_cross_attention (no argument checks); `seed`
    selects the dropout stream."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    keep = key_keep_mask(q.shape[0], k.shape[2], present, key_lengths, key_padding_mask, q.device)
    return attention_rows(q, k, v, keep, is_causal, dropout_p, scale, seed)[0]
