"""MaskedCrossModalAttention: nn.MultiheadAttention with modality masks, on the fused
masked_cross_attention op.

    Q = query W_q^T + b_q,  K = key W_k^T + b_k,  V = value W_v^T + b_v      (H heads of d = E/H)
    O_h = softmax(Q_h K_h^T / sqrt(d) + mask) V_h,     out = concat_h(O_h) W_o^T + b_o
    mask: -inf where present[b, segment(j)] is False (segments of `key_lengths`), where
          key_padding_mask is True, above the diagonal if is_causal, and attn_mask as MHA's.

A query row with no key left (in every head) outputs exactly 0 -- not NaN (MHA with
need_weights=True) nor b_o (MHA's SDPA path) -- so `x + attn(x)` leaves it unchanged. Keys masked
by `present` or a bool `key_padding_mask` are zeroed before the projections: NaN/Inf in an absent
modality's inputs reach neither the output nor any gradient.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from ..ops.masked_attention import masked_cross_attention
from ..reference.masked_attention import key_keep_mask

__all__ = ["MaskedCrossModalAttention", "key_keep"]


def key_keep(batch: int, keys: int, present: Optional[Tensor], key_lengths: Optional[Sequence[int]],
             key_padding_mask: Optional[Tensor], device) -> Optional[Tensor]:
    """(B, Lk) bool, True = the key may be attended to (None when nothing is masked), from
    present (B, M) over the segments `key_lengths` and a bool key_padding_mask (B, Lk)."""
    if present is not None:
        if key_lengths is None:
            raise ValueError("present needs key_lengths (the M segment lengths of the keys)")
        lengths = [int(n) for n in key_lengths]
        if sum(lengths) != keys or present.shape != (batch, len(lengths)):
            raise ValueError(f"present {tuple(present.shape)} and key_lengths {lengths} must be "
                             f"(B={batch}, M) and M lengths summing to Lk={keys}")
    if key_padding_mask is not None and key_padding_mask.dtype != torch.bool:
        raise TypeError(f"key_padding_mask must be bool (True = padding), got "
                        f"{key_padding_mask.dtype}")
    if key_padding_mask is not None and key_padding_mask.shape != (batch, keys):
        raise ValueError(f"key_padding_mask must have shape (B={batch}, Lk={keys}), got "
                         f"{tuple(key_padding_mask.shape)}")
    return key_keep_mask(batch, keys, present, key_lengths, key_padding_mask, device)


def _materialized(q, k, v, keep, float_kpm, attn_mask, is_causal, dropout_p):
    """The path with weights, as MHA computes it: (out (B, H, Lq, d), weights (B, H, Lq, Lk)
    after dropout, rows with no key in any head (B, Lq)). Float masks add, bool ones mask True."""
    B, H, Lq, Lk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    s = torch.matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5  # (B, H, Lq, Lk)
    if keep is not None:
        s = s.masked_fill(~keep.view(B, 1, 1, Lk), float("-inf"))
    if float_kpm is not None:
        s = s + float_kpm.to(s.dtype).view(B, 1, 1, Lk)
    if is_causal:
        future = torch.ones(Lq, Lk, dtype=torch.bool, device=s.device).triu(1)
        s = s.masked_fill(future, float("-inf"))
    elif attn_mask is not None:
        if attn_mask.shape not in ((Lq, Lk), (B * H, Lq, Lk)):
            raise ValueError(f"attn_mask must have shape (Lq, Lk)=({Lq}, {Lk}) or (B*H, Lq, Lk)="
                             f"({B * H}, {Lq}, {Lk}), got {tuple(attn_mask.shape)}")
        m = attn_mask.view(-1, H, Lq, Lk) if attn_mask.dim() == 3 else attn_mask
        s = s.masked_fill(m, float("-inf")) if m.dtype == torch.bool else s + m.to(s.dtype)
    row_ok = s.amax(-1, keepdim=True) != float("-inf")  # (B, H, Lq, 1): some key left
    p = torch.softmax(torch.where(row_ok, s, 0.0), -1) * row_ok
    p = F.dropout(p, dropout_p) if dropout_p else p
    return torch.matmul(p, v), p, ~row_ok.squeeze(-1).any(1)


class MaskedCrossModalAttention(nn.Module):
    """Drop-in for ``nn.MultiheadAttention`` (same arguments, parameter names/shapes and
    state_dict: ``in_proj_weight`` when kdim == vdim == embed_dim, else ``q/k/v_proj_weight``)
    with ``present``/``key_lengths`` modality masks. Differences: ``batch_first`` defaults to
    True; ``add_bias_kv``/``add_zero_attn`` raise NotImplementedError; ``is_causal=True`` alone
    applies the causal mask (with an ``attn_mask`` too, the mask is taken as its hint, as MHA).

    Paths: the fused op (flash-style, absent modalities' key tiles skipped) when
    ``need_weights=False``, ``key_padding_mask`` is bool or None and ``attn_mask`` is None (or
    is a causal hint; ``is_causal`` is top-left aligned, as the op). Otherwise -- the said
    fallback for weights, attn_mask and float masks --
    a materialized path, as MHA computes it, on (B, H, Lq, Lk) scores: it returns
    the weights (after dropout, head-averaged unless ``average_attn_weights=False``) and
    takes float key_padding_mask/attn_mask as additive, bool ones as True = masked; its
    dropout draws from torch's RNG. ``need_weights`` defaults to True like MHA: pass
    ``need_weights=False`` for the fused speed (MHA's own fast path needs it too).
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 add_bias_kv: bool = False, add_zero_attn: bool = False, kdim: Optional[int] = None,
                 vdim: Optional[int] = None, batch_first: bool = True, device=None, dtype=None):
        super().__init__()
        if add_bias_kv or add_zero_attn:
            raise NotImplementedError("MaskedCrossModalAttention does not support add_bias_kv or "
                                      "add_zero_attn (use nn.MultiheadAttention for those)")
        if embed_dim <= 0 or num_heads <= 0 or embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be a positive multiple of num_heads "
                             f"({num_heads})")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        fk = dict(device=device, dtype=dtype)
        self.embed_dim, self.num_heads, self.dropout = embed_dim, num_heads, float(dropout)
        self.head_dim, self.batch_first = embed_dim // num_heads, batch_first
        self.kdim = embed_dim if kdim is None else kdim
        self.vdim = embed_dim if vdim is None else vdim
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        E, same = embed_dim, self._qkv_same_embed_dim  # MHA's names: one in_proj_weight or three
        shapes = {"in_proj_weight": (3 * E, E)} if same else {"q_proj_weight": (E, E),
                  "k_proj_weight": (E, self.kdim), "v_proj_weight": (E, self.vdim)}
        names = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")
        shapes["in_proj_bias"] = (3 * E,) if bias else None
        for name in [*sorted(names, key=lambda n: n not in shapes), "in_proj_bias"]:  # MHA's order
            shape = shapes.get(name)
            self.register_parameter(name, nn.Parameter(torch.empty(shape, **fk)) if shape else None)
        self.out_proj = NonDynamicallyQuantizableLinear(embed_dim, embed_dim, bias=bias, **fk)
        self.bias_k = self.bias_v = None
        self.add_zero_attn = False
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        """MHA's: xavier-uniform projections, zero biases."""
        for w in (self.in_proj_weight, self.q_proj_weight, self.k_proj_weight, self.v_proj_weight):
            if w is not None:
                nn.init.xavier_uniform_(w)
        for b in (self.in_proj_bias, self.out_proj.bias):
            if b is not None:
                nn.init.zeros_(b)

    def _heads(self, query: Tensor, key: Tensor, value: Tensor) -> list[Tensor]:
        """(B, L, E_in) x3 -> q (B, H, Lq, d), k, v (B, H, Lk, d)."""
        ws = (self.in_proj_weight.chunk(3) if self._qkv_same_embed_dim else
              (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight))
        bs = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None,) * 3
        return [F.linear(x, w, b).unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)
                for x, w, b in zip((query, key, value), ws, bs)]

    def forward(self, query: Tensor, key: Tensor, value: Tensor,
                key_padding_mask: Optional[Tensor] = None, need_weights: bool = True,
                attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False, *, present: Optional[Tensor] = None,
                key_lengths: Optional[Sequence[int]] = None) -> tuple[Tensor, Optional[Tensor]]:
        """query (B, Lq, E) [(Lq, B, E) if not batch_first, (Lq, E) unbatched]; key (B, Lk,
        kdim), value (B, Lk, vdim); key_padding_mask (B, Lk) bool (True = ignore) or float
        (additive); present (B, M) bool over the key segments of lengths `key_lengths`.
        Returns (out like query, weights (B, Lq, Lk) / (B, H, Lq, Lk) or None)."""
        if query.dim() not in (2, 3) or key.dim() != query.dim() or value.dim() != query.dim():
            raise ValueError(f"query, key, value must all be 3-D (batched) or 2-D (unbatched), got "
                             f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}")
        batched = query.dim() == 3
        if not batched:  # MHA's unbatched form: add a batch of 1
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
            present = None if present is None else present.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        B, Lq, E = query.shape
        Lk = key.shape[1]
        if (E, key.shape[-1], value.shape[-1]) != (self.embed_dim, self.kdim, self.vdim) \
                or key.shape[:2] != value.shape[:2] or key.shape[0] != B:
            raise ValueError(f"expected query (B, Lq, {self.embed_dim}), key (B, Lk, {self.kdim}), "
                             f"value (B, Lk, {self.vdim}) (batch first), got {tuple(query.shape)}, "
                             f"{tuple(key.shape)}, {tuple(value.shape)}")
        for name, m in (("key_padding_mask", key_padding_mask), ("attn_mask", attn_mask)):
            if m is not None and not (m.dtype == torch.bool or m.is_floating_point()):
                raise TypeError(f"{name} must be bool (True = masked) or float (additive), "
                                f"got {m.dtype}")
        float_kpm = key_padding_mask if key_padding_mask is not None \
            and key_padding_mask.is_floating_point() else None
        bool_kpm = key_padding_mask if float_kpm is None else None
        keep = key_keep(B, Lk, present, key_lengths, bool_kpm, query.device)  # (B, Lk)
        if keep is not None:  # masked keys never reach any arithmetic (NaN-safe, gradients too)
            key = torch.where(keep.unsqueeze(-1), key, 0.0)
            value = torch.where(keep.unsqueeze(-1), value, 0.0)
        q, k, v = self._heads(query, key, value)
        weights = None
        if need_weights or float_kpm is not None or (attn_mask is not None and not is_causal):
            out, weights, empty = _materialized(q, k, v, keep, float_kpm, attn_mask, is_causal,
                                                self.dropout if self.training else 0.0)
            weights = weights.mean(1) if average_attn_weights else weights
        else:
            out = masked_cross_attention(q, k, v, present=present, key_lengths=key_lengths,
                                         key_padding_mask=bool_kpm, is_causal=is_causal,
                                         dropout_p=self.dropout if self.training else 0.0)
            empty = None
            if keep is not None:  # rows before the first kept key (all rows if none / not causal)
                first = (~keep).int().cumprod(1).sum(1, keepdim=True)  # (B, 1)
                empty = (torch.arange(Lq, device=q.device) < first) if is_causal else first == Lk
        out = self.out_proj(out.transpose(1, 2).reshape(B, Lq, E))  # (B, Lq, E)
        if empty is not None:
            out = out.masked_fill(empty.unsqueeze(-1), 0.0)
        if not batched:
            return out.squeeze(0), None if weights is None else weights.squeeze(0)
        return (out if self.batch_first else out.transpose(0, 1)), weights

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, dropout={self.dropout}, "
                f"kdim={self.kdim}, vdim={self.vdim}, batch_first={self.batch_first}")
