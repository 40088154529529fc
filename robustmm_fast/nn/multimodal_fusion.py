"""MulTFusion and JointFusion: MulT-style fusion of M modality sequences (Tsai et al., ACL
2019) into one vector, with modalities that may be absent per sample.

MulTFusion -- MulT's structure (yaohungt/Multimodal-Transformer src/models.py; CyIN's fusion,
RH-Lin/CyIN models/generationBased/CyIN.py), for M >= 2 modalities of one width E:

    h_{n<-m} = CrossModalTransformer_{n,m}(x_n, x_m)   (B, L_n, E)  for every ordered n != m,
               attention dropout of the *source* m (MulT's get_network: 'la' uses attn_dropout_a)
    c_n      = concat_{m != n} h_{n<-m}                 (B, L_n, (M-1) E)   (2E for M = 3)
    o_n      = Memory_n(c_n)                           self-attention stack of width (M-1) E
    out      = concat_n mean_t o_n                      (B, M (M-1) E)
    init: MulT's -- every attention's in_proj and out_proj xavier-uniform, zero biases (the
    layers' FFN as CrossModalTransformer: xavier-uniform, zero bias)

JointFusion -- our variant: one CrossModalTransformer per target attends to all other sources
concatenated, in ONE masked softmax per layer (so the sources compete for attention), with a
memory stack of width E inside it:  out = concat_n mean_t CMT_n(x_n, [x_m, m != n])  (B, M E).

Both run on MaskedCrossModalAttention: a source absent for a sample (available False) is no key
of any attention -- for MulTFusion its cross-modal term is 0 (the row has no key), never NaN; a
target absent for a sample pools to 0. causal=True gives every attention MulT's future mask
(cross stacks as MulT's buffered_future_mask, memory stacks causal); time means are over the
valid (unpadded) tokens.
"""
from __future__ import annotations

from typing import Sequence, Union

import torch
from torch import Tensor, nn

from . import grouped_mult
from .cross_modal_transformer import CrossModalTransformer, _Stack
from .masked_attention import MaskedCrossModalAttention

__all__ = ["MulTFusion", "JointFusion", "FUSIONS"]

FUSIONS = ("mult", "joint")


def _valid_mean(x: Tensor, padding: Tensor) -> Tensor:
    """(B, L, E) -> (B, E): mean over tokens with padding False (0 for a sample with none)."""
    keep = ~padding
    x = torch.where(keep.unsqueeze(-1), x, 0)
    return x.sum(1) / keep.sum(1, keepdim=True).clamp(min=1).to(x.dtype)


def _per_modality(name: str, value: Union[float, Sequence[float]], M: int) -> list[float]:
    values = [float(value)] * M if isinstance(value, (int, float)) else [float(v) for v in value]
    if len(values) != M or not all(0.0 <= v < 1.0 for v in values):
        raise ValueError(f"{name} must be a probability in [0, 1) or {M} of them (one per "
                         f"modality), got {value!r}")
    return values


class MulTFusion(nn.Module):
    """MulT's fusion (module docstring) for M modalities of width `dim`.

    Args:
        num_modalities, dim, num_heads, layers: M, width E, heads, cross-modal layers.
        memory_layers: layers of each target's self-attention memory (CyIN: max(nlevels, 3)).
        attn_dropout: one probability, or one per modality (applied to the cross-modal
            transformers whose *source* it is, as MulT); memory_attn_dropout: the memory's.
        relu_dropout, res_dropout, embed_dropout: MulT's other dropouts (CyIN: 0, 0, config).
        memory_heads: heads of the memory stacks (default num_heads, as MulT).
        causal: MulT's attn_mask (CyIN's config: true).
        grouped: compute the M (M - 1) cross-modal stacks as one batched computation, then the
            M memory stacks as another (nn/grouped_mult.py), when all modalities have one
            sequence length and the stacks one structure; else (or grouped=False, also settable
            as the attribute) the per-block loop, the reference. Why: speed -- the loop is ~250
            small Linear calls per forward; grouping changes the floating-point order, not the
            math (the same dropouts, masks and empty-row zeros).

    forward(feats, padding, available): feats M tensors (B, L_m, E); padding M (B, L_m) bool
    (True = padding) or None; available (B, M) bool -> (B, M (M-1) E).
    """

    def __init__(self, num_modalities: int, dim: int, num_heads: int, layers: int, *,
                 memory_layers: int = 3, attn_dropout: Union[float, Sequence[float]] = 0.0,
                 memory_attn_dropout: float = 0.0, relu_dropout: float = 0.0,
                 res_dropout: float = 0.0, embed_dropout: float = 0.0,
                 memory_heads: int | None = None, causal: bool = True, grouped: bool = True):
        super().__init__()
        M = num_modalities
        if M < 2:
            raise ValueError(f"MulTFusion needs at least 2 modalities, got {M}")
        if memory_layers < 1:
            raise ValueError(f"memory_layers must be >= 1, got {memory_layers}")
        drops = _per_modality("attn_dropout", attn_dropout, M)
        self.num_modalities, self.dim, self.causal = M, dim, bool(causal)
        self.grouped = bool(grouped)  # a plain attribute: not in the state_dict
        self.cross = nn.ModuleList(nn.ModuleList(
            CrossModalTransformer(dim, num_heads, layers, attn_dropout=drops[m],
                                  relu_dropout=relu_dropout, res_dropout=res_dropout,
                                  embed_dropout=embed_dropout, causal=causal)
            for m in range(M) if m != n) for n in range(M))
        width = (M - 1) * dim
        self.memory = nn.ModuleList(
            _Stack(width, memory_heads or num_heads, memory_layers, 4 * width,
                   memory_attn_dropout, relu_dropout, res_dropout, embed_dropout, True)
            for _ in range(M))
        self.out_dim = M * width
        # MulT's attention init (CyIN's copy: models/subNets/transformers_encoder/
        # multihead_attention.py:44-49): out_proj xavier-uniform with a zero bias too, where
        # nn.MultiheadAttention (and MaskedCrossModalAttention) keep nn.Linear's U(+-1/sqrt(E))
        for module in self.modules():
            if isinstance(module, MaskedCrossModalAttention):
                nn.init.xavier_uniform_(module.out_proj.weight)
                if module.out_proj.bias is not None:
                    nn.init.zeros_(module.out_proj.bias)

    def forward(self, feats: Sequence[Tensor], padding: Sequence[Tensor],
                available: Tensor) -> Tensor:
        M = self.num_modalities
        if len(feats) != M or len(padding) != M or available.shape[-1] != M:
            raise ValueError(f"MulTFusion expects {M} feats, {M} padding masks and available "
                             f"(B, {M}), got {len(feats)}, {len(padding)}, {tuple(available.shape)}")
        pads = [p | ~available[:, i, None] for i, p in enumerate(padding)]
        if self.grouped and self._groupable(feats, pads):
            return self._forward_grouped(feats, pads)
        return self._forward_per_block(feats, pads, available)

    def _forward_per_block(self, feats, pads, available) -> Tensor:
        """The reference: one CrossModalTransformer call per (target, source), one memory
        stack call per target."""
        M = self.num_modalities
        pooled = []
        for n in range(M):
            others = [m for m in range(M) if m != n]
            h = torch.cat([cmt(feats[n], [feats[m]], present=available[:, m:m + 1],
                               key_padding_mask=[pads[m]], target_padding_mask=pads[n])
                           for cmt, m in zip(self.cross[n], others)], -1)   # (B, L_n, (M-1) E)
            h = torch.where(pads[n].unsqueeze(-1), 0, h)
            o = self.memory[n](h, key_padding_mask=pads[n], is_causal=self.causal)
            pooled.append(_valid_mean(o, pads[n]))                           # (B, (M-1) E)
        return torch.cat(pooled, -1)

    def _groupable(self, feats, pads) -> bool:
        """One shape, dtype and device for all modalities (so one L) and stacks of one
        structure each (cross, memory): the grouped path computes what the loop does."""
        cross = [cmt for row in self.cross for cmt in row]
        return (len({(f.shape, f.dtype, f.device) for f in feats}) == 1
                and len({p.shape for p in pads}) == 1 and feats[0].dim() == 3
                and all(cmt.memory is None and cmt.causal == self.causal for cmt in cross)
                and grouped_mult.stacks_groupable([cmt.cross for cmt in cross])
                and grouped_mult.stacks_groupable(list(self.memory)))

    def _forward_grouped(self, feats, pads) -> Tensor:
        """The loop's math with the G = M (M - 1) cross stacks as one computation (group g =
        (n, m) in the loop's order), then the M memory stacks as one."""
        M = self.num_modalities
        B, L, E = feats[0].shape
        x, pad = torch.stack(list(feats)), torch.stack(list(pads))       # (M, B, L, E), (M, B, L)
        target = torch.tensor([n for n in range(M) for m in range(M) if m != n], device=x.device)
        source = torch.tensor([m for n in range(M) for m in range(M) if m != n], device=x.device)
        # as CrossModalTransformer: padded target tokens and masked source tokens (both: pad)
        # zeroed first
        x = torch.where(pad.unsqueeze(-1), 0.0, x)
        h = grouped_mult.grouped_stacks([cmt.cross for row in self.cross for cmt in row],
                                        x.index_select(0, target), x.index_select(0, source),
                                        pad.index_select(0, source), self.causal)  # (G, B, L, E)
        h = h.view(M, M - 1, B, L, E).permute(0, 2, 3, 1, 4).reshape(M, B, L, (M - 1) * E)
        h = torch.where(pad.unsqueeze(-1), 0, h)                          # (M, B, L, (M-1) E)
        o = grouped_mult.grouped_stacks(list(self.memory), h, None, pad, self.causal)
        pooled = _valid_mean(o.flatten(0, 1), pad.flatten(0, 1))         # (M B, (M-1) E)
        return pooled.view(M, B, -1).transpose(0, 1).reshape(B, -1)      # (B, M (M-1) E)


class JointFusion(nn.Module):
    """Our joint fusion (module docstring): per target one CrossModalTransformer over all other
    sources in one softmax, with `memory_layers` causal self-attention layers of width E.
    Arguments as MulTFusion (attn_dropout one probability); forward -> (B, M E)."""

    def __init__(self, num_modalities: int, dim: int, num_heads: int, layers: int, *,
                 memory_layers: int = 3, attn_dropout: float = 0.0, relu_dropout: float = 0.0,
                 res_dropout: float = 0.0, embed_dropout: float = 0.0):
        super().__init__()
        self.num_modalities, self.dim = num_modalities, dim
        self.fusion = nn.ModuleList(
            CrossModalTransformer(dim, num_heads, layers, attn_dropout=attn_dropout,
                                  relu_dropout=relu_dropout, res_dropout=res_dropout,
                                  embed_dropout=embed_dropout, memory_layers=memory_layers)
            for _ in range(num_modalities))
        self.out_dim = num_modalities * dim

    def forward(self, feats: Sequence[Tensor], padding: Sequence[Tensor],
                available: Tensor) -> Tensor:
        M = self.num_modalities
        pads = [p | ~available[:, i, None] for i, p in enumerate(padding)]
        pooled = []
        for n in range(M):
            others = [m for m in range(M) if m != n]
            o = self.fusion[n](feats[n], [feats[m] for m in others], present=available[:, others],
                               key_padding_mask=[pads[m] for m in others],
                               target_padding_mask=pads[n])                  # (B, L_n, E)
            pooled.append(_valid_mean(o, pads[n]))
        return torch.cat(pooled, -1)
