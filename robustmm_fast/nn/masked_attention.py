"""MaskedCrossModalAttention: nn.MultiheadAttention with modality masks, on the fused
masked_cross_attention op.

    Q = query W_q^T + b_q,  K = key W_k^T + b_k,  V = value W_v^T + b_v      (H heads of d = E/H)
    [K; b_k_h; 0], [V; b_v_h; 0] with add_bias_kv / add_zero_attn (keys never masked)
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
from ._mha_checks import AttentionShapeError, check_ranks, check_shapes

__all__ = ["AttentionShapeError", "MaskedCrossModalAttention", "key_keep"]


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


def _materialized(q, k, v, keep, float_kpm, attn_mask, causal_keys, dropout_p):
    """The path with weights, as MHA computes it: (out (B, H, Lq, d), weights (B, H, Lq, Lk)
    after dropout, rows with no key in any head (B, Lq)). Float masks add, bool ones mask True;
    causal_keys: None, or how many leading keys the top-left causal mask covers (the appended
    bias/zero keys stay visible to every query, as in MHA's padded attn_mask)."""
    B, H, Lq, Lk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    s = torch.matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5  # (B, H, Lq, Lk)
    if keep is not None:
        s = s.masked_fill(~keep.view(B, 1, 1, Lk), float("-inf"))
    if float_kpm is not None:
        s = s + float_kpm.to(s.dtype).view(B, 1, 1, Lk)
    if causal_keys is not None:
        future = torch.ones(Lq, Lk, dtype=torch.bool, device=s.device).triu(1)
        future[:, causal_keys:] = False
        s = s.masked_fill(future, float("-inf"))
    elif attn_mask is not None:
        m = attn_mask.view(-1, H, Lq, Lk) if attn_mask.dim() == 3 else attn_mask
        s = s.masked_fill(m, float("-inf")) if m.dtype == torch.bool else s + m.to(s.dtype)
    row_ok = s.amax(-1, keepdim=True) != float("-inf")  # (B, H, Lq, 1): some key left
    p = torch.softmax(torch.where(row_ok, s, 0.0), -1) * row_ok
    p = F.dropout(p, dropout_p) if dropout_p else p
    return torch.matmul(p, v), p, ~row_ok.squeeze(-1).any(1)


def _pad_keys(mask: Optional[Tensor], extra: int, fill) -> Optional[Tensor]:
    """(..., Lk) -> (..., Lk + extra) with `fill` (not masked) for the appended keys."""
    if mask is None or not extra:
        return mask
    return torch.cat([mask, mask.new_full((*mask.shape[:-1], extra), fill)], -1)  # bool or float


class MaskedCrossModalAttention(nn.Module):
    """Drop-in for ``nn.MultiheadAttention`` (same arguments and defaults -- ``batch_first=False``
    included -- and the same parameter names, shapes, order, initialization and state_dict:
    ``in_proj_weight`` when kdim == vdim == embed_dim, else ``q/k/v_proj_weight``; ``bias_k``,
    ``bias_v`` (1, 1, E) with ``add_bias_kv``) with ``present``/``key_lengths`` modality masks.

    ``add_bias_kv`` appends the key bias_k / value bias_v after the projections, then
    ``add_zero_attn`` a zero key/value per head, as F.multi_head_attention_forward: both are
    always visible (masks are extended with a not-masked column; ``present`` never hides them).

    Deliberate differences: (1) a query row with no key left outputs exactly 0 and weights 0,
    where MHA gives NaN; (2) bad shapes raise ``AttentionShapeError``, a ValueError that is also
    an AssertionError, with MHA's messages, so code catching MHA's AssertionError still works
    (MHA raises RuntimeError for a wrong-sized attn_mask); (3) ``is_causal=True`` alone applies
    the top-left causal mask (MHA needs an ``attn_mask`` for the hint; with one, the mask is
    taken as the hint, as MHA's SDPA path does); (4) a float bias of another dtype than the
    weights (MHA tolerates a half ``in_proj_bias`` with double weights when its layout sends it
    through matmul + add) is cast to the weights' dtype, the value MHA's promotion gives.

    Paths: the fused op (flash-style, absent modalities' key tiles skipped; bias_k/zero keys as
    an always-present extra segment) when ``need_weights=False``, ``key_padding_mask`` is bool or
    None and ``attn_mask`` is None or a causal hint. Otherwise the materialized path, as MHA
    computes it, on (B, H, Lq, Lk) scores: ``need_weights=True`` (MHA's default: pass False for
    the fused speed, as MHA's own fast path needs), a float ``key_padding_mask``, an
    ``attn_mask`` without ``is_causal``, and ``is_causal`` with add_bias_kv/add_zero_attn (the
    op's causal mask would hide the appended keys from early queries). It returns the weights
    (after dropout, head-averaged unless ``average_attn_weights=False``; None if
    ``need_weights=False``), takes float masks as additive, bool ones as True = masked; its
    dropout draws from torch's RNG.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 add_bias_kv: bool = False, add_zero_attn: bool = False, kdim: Optional[int] = None,
                 vdim: Optional[int] = None, batch_first: bool = False, device=None, dtype=None):
        super().__init__()
        if embed_dim <= 0 or num_heads <= 0 or embed_dim % num_heads:
            raise AttentionShapeError(f"embed_dim ({embed_dim}) must be a positive multiple of "
                                      f"num_heads ({num_heads})")
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
        if add_bias_kv:  # registered after in_proj_bias, as MHA (state_dict order)
            self.bias_k = nn.Parameter(torch.empty((1, 1, embed_dim), **fk))
            self.bias_v = nn.Parameter(torch.empty((1, 1, embed_dim), **fk))
        else:
            self.bias_k = self.bias_v = None
        self.add_zero_attn = add_zero_attn
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        """MHA's, draw for draw: xavier-uniform projections, zero biases, xavier-normal bias_k/v."""
        for w in (self.in_proj_weight, self.q_proj_weight, self.k_proj_weight, self.v_proj_weight):
            if w is not None:
                nn.init.xavier_uniform_(w)
        for b in (self.in_proj_bias, self.out_proj.bias):
            if b is not None:
                nn.init.zeros_(b)
        for b in (self.bias_k, self.bias_v):
            if b is not None:
                nn.init.xavier_normal_(b)

    def _heads(self, query: Tensor, key: Tensor, value: Tensor) -> list[Tensor]:
        """(B, L, E_in) x3 -> q (B, H, Lq, d), k, v (B, H, Lk, d)."""
        ws = (self.in_proj_weight.chunk(3) if self._qkv_same_embed_dim else
              (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight))
        b = self.in_proj_bias  # of another dtype: the value MHA's matmul + add promotes it to
        bs = b.to(ws[0].dtype).chunk(3) if b is not None else (None,) * 3
        return [F.linear(x, w, b).unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)
                for x, w, b in zip((query, key, value), ws, bs)]

    def _extra_keys(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, int]:
        """k, v (B, H, Lk, d) -> (B, H, Lk + n, d): bias_k/bias_v, then a zero key/value, appended
        in MHA's order; n the number appended (0, 1 or 2)."""
        B, H, _, d = k.shape
        ks, vs = [k], [v]
        if self.bias_k is not None:
            ks.append(self.bias_k.to(k.dtype).view(1, H, 1, d).expand(B, H, 1, d))
            vs.append(self.bias_v.to(v.dtype).view(1, H, 1, d).expand(B, H, 1, d))
        if self.add_zero_attn:
            ks.append(k.new_zeros(B, H, 1, d))
            vs.append(v.new_zeros(B, H, 1, d))
        return (torch.cat(ks, 2), torch.cat(vs, 2), len(ks) - 1) if len(ks) > 1 else (k, v, 0)

    def forward(self, query: Tensor, key: Tensor, value: Tensor,
                key_padding_mask: Optional[Tensor] = None, need_weights: bool = True,
                attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False, *, present: Optional[Tensor] = None,
                key_lengths: Optional[Sequence[int]] = None) -> tuple[Tensor, Optional[Tensor]]:
        """query (Lq, B, E) [(B, Lq, E) if batch_first, (Lq, E) unbatched]; key (Lk, B, kdim),
        value (Lk, B, vdim) likewise; key_padding_mask (B, Lk) [(Lk) unbatched] bool (True =
        ignore) or float (additive); attn_mask (Lq, Lk) or (B*H, Lq, Lk) [(H, Lq, Lk) unbatched];
        present (B, M) [(M) unbatched] bool over the key segments of lengths `key_lengths`.
        Returns (out like query, weights (B, Lq, Lk') / (B, H, Lq, Lk') or None), Lk' counting
        the bias_k and zero keys."""
        if query.is_nested or key.is_nested or value.is_nested:  # MHA: only on its fast path
            raise NotImplementedError("MaskedCrossModalAttention does not take NestedTensor "
                                      "inputs: pad them and pass key_padding_mask")
        batched = check_ranks(query, key, value, key_padding_mask, attn_mask, self.num_heads)
        if not batched:  # MHA's unbatched form: add a batch of 1
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
            present = None if present is None else present.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        B, Lq, E = query.shape
        Lk = key.shape[1]
        check_shapes(self, query, key, value, key_padding_mask, attn_mask, is_causal,
                     given="(B, L, E)" if self.batch_first or not batched else "(L, B, E)")
        float_kpm = key_padding_mask if key_padding_mask is not None \
            and key_padding_mask.is_floating_point() else None
        bool_kpm = key_padding_mask if float_kpm is None else None
        keep = key_keep(B, Lk, present, key_lengths, bool_kpm, query.device)  # (B, Lk)
        if keep is not None:  # masked keys never reach any arithmetic (NaN-safe, gradients too)
            key = torch.where(keep.unsqueeze(-1), key, 0.0)
            value = torch.where(keep.unsqueeze(-1), value, 0.0)
        q, k, v = self._heads(query, key, value)
        k, v, extra = self._extra_keys(k, v)                          # (B, H, Lk + extra, d)
        keep_all = _pad_keys(keep, extra, True)                       # (B, Lk + extra)
        weights = None
        if need_weights or float_kpm is not None or (attn_mask is not None and not is_causal) \
                or (is_causal and extra):
            out, weights, empty = _materialized(
                q, k, v, keep_all, _pad_keys(float_kpm, extra, 0),
                None if is_causal else _pad_keys(attn_mask, extra, 0),  # 0: False or 0.0
                Lk if is_causal else None, self.dropout if self.training else 0.0)
            if not need_weights:
                weights = None
            elif average_attn_weights:
                weights = weights.mean(1)                              # (B, Lq, Lk + extra)
        else:
            masks = (dict(present=present, key_lengths=key_lengths, key_padding_mask=bool_kpm)
                     if not extra else   # the appended keys: a segment never masked
                     dict(key_padding_mask=None if keep_all is None else ~keep_all))
            out = masked_cross_attention(q, k, v, is_causal=is_causal,
                                         dropout_p=self.dropout if self.training else 0.0, **masks)
            empty = None
            if keep_all is not None:  # rows before the first kept key (all if none / not causal)
                first = (~keep_all).int().cumprod(1).sum(1, keepdim=True)  # (B, 1)
                empty = (torch.arange(Lq, device=q.device) < first) if is_causal \
                    else first == keep_all.shape[1]
        out = self.out_proj(out.transpose(1, 2).reshape(B, Lq, E))  # (B, Lq, E)
        if empty is not None:
            out = out.masked_fill(empty.unsqueeze(-1), 0.0)
        if not batched:
            return out.squeeze(0), None if weights is None else weights.squeeze(0)
        return (out if self.batch_first else out.transpose(0, 1)), weights

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, dropout={self.dropout}, "
                f"kdim={self.kdim}, vdim={self.vdim}, batch_first={self.batch_first}, "
                f"add_bias_kv={self.bias_k is not None}, add_zero_attn={self.add_zero_attn}")
