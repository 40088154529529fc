"""MulTFusion's stacks run grouped: G transformer stacks of identical shapes (MulTFusion's
M (M - 1) cross-modal stacks, then its M memory stacks) as ONE computation with a leading group
dimension, for inputs of one sequence length L.

Why: the per-block loop is overhead-bound (CyIN on Handwritten: 30 cross stacks of width 32 and
6 memory stacks of width 160 on L = 1 token, ~250 small Linear calls per forward); grouped, a
layer is a few baddbmm calls and one fused attention call with the group folded into the batch.
The math is the loop's (_Stack / _Block / MaskedCrossModalAttention, restated below); only the
floating-point order differs.

Per group g, with the parameters of the G modules stacked at forward time (torch.stack of the
modules' own parameters, so their gradients flow back to them):

    LN_g(x)   = layer_norm(x) * w_g + b_g                 (layer_norm without affine, same eps)
    Lin_g(x)  = x W_g^T + b_g                             (baddbmm over g)
    x = drop_e(sqrt(E) x + P),  s = drop_e(sqrt(E) s + P)       P: positions 1..L (one segment)
    each layer:
      x = x + drop_r(Attn_g(LN_a,g(x), keep * LN_a,g(s)))        (s = x: self-attention)
      x = x + drop_r(Lin2_g(drop_relu(relu(Lin1_g(LN_f,g(x))))))
    out = LN_g(x)
    Attn_g(q, s) = Lin_o,g(masked_attention(Lin_q,g(q), Lin_k,g(s), Lin_v,g(s) | key_pad, causal,
                   dropout p_g)),  0 on a query row with no key kept (not b_o)

keep = ~key_pad per key token; a masked key is zeroed before its projections, as
MaskedCrossModalAttention does. Every dropout draws a fresh mask per group, as the G modules
would; the attention dropout p_g is each module's own (one fused call per distinct p_g).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.masked_attention import masked_cross_attention

__all__ = ["stacks_groupable", "grouped_stacks", "empty_query_rows"]


def _attention_groupable(attn) -> bool:
    """The layout the grouped attention restates: one in_proj, biases, batch first, no
    appended keys (MulTFusion's attentions all are)."""
    return (attn._qkv_same_embed_dim and attn.in_proj_bias is not None
            and attn.out_proj.bias is not None and attn.bias_k is None
            and not attn.add_zero_attn and attn.batch_first)


def _norm_signature(norm: nn.LayerNorm):
    return (tuple(norm.normalized_shape), norm.eps, norm.weight is not None,
            norm.bias is not None)


def _signature(stack) -> tuple:
    """All a _Stack's forward depends on except its parameters' values and attention dropout:
    stacks with one signature can be grouped."""
    layers = tuple((layer.relu_dropout, layer.res_dropout, layer.training, layer.attn.training,
                    layer.attn.num_heads, _norm_signature(layer.attn_norm),
                    _norm_signature(layer.ffn_norm), tuple(layer.fc1.weight.shape))
                   for layer in stack.layers)
    return (layers, _norm_signature(stack.norm), stack.embed_dropout, stack.positions,
            stack.training)


def stacks_groupable(stacks: Sequence) -> bool:
    """True when the _Stacks share one structure (same signature, affine LayerNorms of one eps,
    attentions of the plain layout), so grouped_stacks computes what each would."""
    first = stacks[0]
    norms = [first.norm] + [n for layer in first.layers for n in (layer.attn_norm, layer.ffn_norm)]
    return (len({_signature(s) for s in stacks}) == 1
            and len({n.eps for n in norms}) == 1
            and all(n.weight is not None and n.bias is not None for n in norms)
            and all(_attention_groupable(layer.attn) for s in stacks for layer in s.layers))


def empty_query_rows(key_keep: Tensor, causal: bool) -> Tensor:
    """(..., L) bool keys kept -> (..., L) bool query rows with no key left (equal query and key
    lengths): causal, the rows before the first kept key; else every row if no key is kept."""
    first = (~key_keep).int().cumprod(-1).sum(-1, keepdim=True)  # (..., 1) leading masked keys
    if causal:
        return torch.arange(key_keep.shape[-1], device=key_keep.device) < first
    return (first == key_keep.shape[-1]).expand_as(key_keep)


def _stacked(tensors: Sequence[Tensor]) -> Tensor:
    return torch.stack(list(tensors))


def _group_norm_affine(x_hat: Tensor, norms: Sequence[nn.LayerNorm]) -> Tensor:
    """x_hat (G, N, E) already normalized -> x_hat * w_g + b_g."""
    weight = _stacked(n.weight for n in norms).unsqueeze(1)             # (G, 1, E)
    bias = _stacked(n.bias for n in norms).unsqueeze(1)
    return torch.addcmul(bias, x_hat, weight)


def _group_layer_norm(x: Tensor, norms: Sequence[nn.LayerNorm]) -> Tensor:
    """(G, N, E) -> LN_g(x): the per-group LayerNorms of one eps."""
    return _group_norm_affine(F.layer_norm(x, x.shape[-1:], eps=norms[0].eps), norms)


def _group_linear(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """x (G, N, in), weight (G, out, in), bias (G, out) -> (G, N, out)."""
    return torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))


def _attention_by_dropout(q: Tensor, k: Tensor, v: Tensor, key_pad: Tensor, causal: bool,
                          dropout: Sequence[float]) -> Tensor:
    """q, k, v (G, B, H, L, d), key_pad (G, B, L) -> (G, B, H, L, d): one fused call with the
    group folded into the batch per distinct dropout probability of the groups."""
    G = q.shape[0]
    probabilities = sorted(set(dropout))
    if len(probabilities) == 1:
        out = masked_cross_attention(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1),
                                     key_padding_mask=key_pad.flatten(0, 1), is_causal=causal,
                                     dropout_p=probabilities[0])
        return out.unflatten(0, (G, -1))
    parts, order = [], []
    for p in probabilities:
        groups = [g for g in range(G) if dropout[g] == p]
        index = torch.tensor(groups, device=q.device)
        q_p, k_p, v_p, pad_p = (t.index_select(0, index).flatten(0, 1)
                                for t in (q, k, v, key_pad))
        out = masked_cross_attention(q_p, k_p, v_p, key_padding_mask=pad_p, is_causal=causal,
                                     dropout_p=p)
        parts.append(out.unflatten(0, (len(groups), -1)))
        order += groups
    inverse = torch.tensor(order, device=q.device).argsort()           # back to group order
    return torch.cat(parts).index_select(0, inverse)


def _group_attention(query: Tensor, key: Tensor, attns: Sequence, key_pad: Tensor,
                     empty: Tensor, causal: bool, shape: tuple) -> Tensor:
    """query, key (G, N, E) (key = value, masked keys zeroed); key_pad, empty (G, B, L) ->
    (G, N, E): MaskedCrossModalAttention(query, key, key) of each group, need_weights=False."""
    G, B, L, E = shape
    H = attns[0].num_heads
    weight = _stacked(a.in_proj_weight for a in attns)                  # (G, 3E, E)
    bias = _stacked(a.in_proj_bias for a in attns).to(weight.dtype)    # (G, 3E)
    q = _group_linear(query, weight[:, :E], bias[:, :E])               # (G, N, E)
    kv = _group_linear(key, weight[:, E:], bias[:, E:])                # (G, N, 2E)

    def heads(t: Tensor) -> Tensor:  # (G, N, E) -> (G, B, H, L, d)
        return t.reshape(G, B, L, H, E // H).transpose(2, 3)

    dropout = [a.dropout if a.training else 0.0 for a in attns]
    out = _attention_by_dropout(heads(q), heads(kv[..., :E]), heads(kv[..., E:]), key_pad,
                                causal, dropout)                        # (G, B, H, L, d)
    out = out.transpose(2, 3).reshape(G, B * L, E)
    out = _group_linear(out, _stacked(a.out_proj.weight for a in attns),
                        _stacked(a.out_proj.bias for a in attns))
    return out.masked_fill(empty.reshape(G, B * L, 1), 0.0)


def _group_block(x: Tensor, source_hat: Optional[Tensor], blocks: Sequence, key_keep: Tensor,
                 key_pad: Tensor, empty: Tensor, causal: bool, shape: tuple) -> Tensor:
    """One layer (_Block) of each group: x (G, N, E); source_hat (G, N, E) the embedded source
    after layer_norm without affine (the source is the same at every layer), None for
    self-attention; key_keep (G, N, 1)."""
    first = blocks[0]
    h = _group_layer_norm(x, [b.attn_norm for b in blocks])
    s = h if source_hat is None else _group_norm_affine(source_hat, [b.attn_norm for b in blocks])
    s = torch.where(key_keep, s, 0.0)
    h = _group_attention(h, s, [b.attn for b in blocks], key_pad, empty, causal, shape)
    x = x + F.dropout(h, first.res_dropout, first.training)
    h = _group_layer_norm(x, [b.ffn_norm for b in blocks])
    h = _group_linear(h, _stacked(b.fc1.weight for b in blocks),
                      _stacked(b.fc1.bias for b in blocks))
    h = F.dropout(F.relu(h), first.relu_dropout, first.training)       # (G, N, 4E)
    h = _group_linear(h, _stacked(b.fc2.weight for b in blocks),
                      _stacked(b.fc2.bias for b in blocks))
    return x + F.dropout(h, first.res_dropout, first.training)


def grouped_stacks(stacks: Sequence, x: Tensor, source: Optional[Tensor], key_pad: Tensor,
                   causal: bool) -> Tensor:
    """What stacks[g](x[g], source[g], key_padding_mask=key_pad[g], is_causal=causal) computes
    (a _Stack with one source segment of length L, present folded into key_pad), for every g.

    x (G, B, L, E) targets (padded tokens zeroed by the caller); source (G, B, L, E) with masked
    tokens zeroed, or None for self-attention; key_pad (G, B, L) bool, True = key masked.
    stacks_groupable(stacks) must hold. Returns (G, B, L, E).
    """
    shape = x.shape
    G, B, L, E = shape
    first = stacks[0]
    key_keep = ~key_pad
    empty = empty_query_rows(key_keep, causal)                          # (G, B, L)
    x = first.embed(x, [L]).reshape(G, B * L, E)  # embed's dropout draws per element: per group
    source_hat = None
    if source is not None:
        eps = first.layers[0].attn_norm.eps
        source_hat = F.layer_norm(first.embed(source, [L]), (E,), eps=eps).reshape(G, B * L, E)
    keep = key_keep.reshape(G, B * L, 1)
    for blocks in zip(*(s.layers for s in stacks)):
        x = _group_block(x, source_hat, blocks, keep, key_pad, empty, causal, shape)
    return _group_layer_norm(x, [s.norm for s in stacks]).reshape(shape)
