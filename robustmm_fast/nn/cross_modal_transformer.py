"""CrossModalTransformer: MulT's cross-modal transformer (Tsai et al., ACL 2019) on
MaskedCrossModalAttention -- a target modality attends to the concatenated tokens of one or more
source modalities in one masked attention call per layer, skipping absent sources.

    x = drop_e(sqrt(E) target + P(target)),    s = drop_e(sqrt(E) source + P_seg(source))
    each layer:  x = x + drop_r(Attn(LN_a(x), LN_a(s), LN_a(s) | present, key_lengths, padding))
                 x = x + drop_r(W_2 drop_relu(relu(W_1 LN_f(x) + b_1)) + b_2)       (W_1: E -> 4E)
    out = LN(x)                                                                   (B, Lt, E)
    memory (memory_layers > 0): the same stack again on `out` -- re-embedded (sqrt(E) scale,
    positions, dropout) and with causal self-attention, as MulT's "mem" transformers; its keys
    are masked by target_padding_mask. The cross stack is causal only with causal=True and one
    source segment, as MulT's attn_mask: query i sees source keys j <= i + |Ls - Lt|
    (buffered_future_mask; the plain causal mask when the lengths are equal). MulT's future mask
    has no meaning for several concatenated segments.

P: fairseq/MulT sinusoidal positions 1..L as [sin | cos] halves. P_seg restarts at 1 in each
source segment, as MulT embeds each source sequence on its own: a source's keys do not depend on
what is concatenated before it, so the order of the sources does not matter. LN_a is shared by
the query and the source, as in MulT's layer.

With one source segment, no mask, dropout off (and no token whose first feature is exactly 0)
this is MulT's TransformerEncoder(x, x_k, x_v) (yaohungt/Multimodal-Transformer
modules/transformer.py; causal=True: its attn_mask) given the same parameters. Departures:
- several sources share ONE softmax over their concatenated keys (MulT runs one encoder per
  (target, source) pair and concatenates the outputs: MulTFusion does that, with one source each);
- MulT's make_positions treats a token whose first input feature is exactly 0 as padding
  (position 0, a zero embedding: e.g. zero-padded frames); here every token gets its position,
  and padding is masked by key_padding_mask / target_padding_mask (MulT has no padding mask);
- in training, MulT embeds the source twice (as key and as value) and draws embed dropout for
  each; here one draw serves both;
- the attention's out_proj keeps nn.MultiheadAttention's init (nn.Linear's, U(+-1/sqrt(E)));
  MulT re-draws it xavier-uniform (U(+-sqrt(3/E))); in_proj (xavier-uniform), zero biases and the
  FFN init are MulT's;
- causal defaults to False; MulT's --attn_mask is on by default (CyIN's MulTFusion passes True).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .masked_attention import MaskedCrossModalAttention, key_keep

__all__ = ["CrossModalTransformer", "sinusoid_positions", "future_mask"]


def future_mask(target_len: int, source_len: int, device=None) -> dict:
    """MulT's buffered_future_mask as attention keywords: key j is hidden from query i when
    j > i + |source_len - target_len|. Equal lengths: {"is_causal": True} (the fused op's
    causal path); else {"attn_mask": (Lt, Ls) bool, True = hidden}."""
    if target_len == source_len:
        return {"is_causal": True}
    i = torch.arange(target_len, device=device).unsqueeze(1)
    j = torch.arange(source_len, device=device)
    return {"attn_mask": j > i + abs(source_len - target_len)}


def sinusoid_positions(lengths: Sequence[int], dim: int, device=None,
                       dtype: torch.dtype = torch.float32) -> Tensor:
    """(sum(lengths), dim): positions 1..n restarted in each segment of `lengths`."""
    pos = torch.cat([torch.arange(1, n + 1, device=device, dtype=dtype) for n in lengths])
    half = dim // 2
    freq = torch.exp(torch.arange(half, device=device, dtype=dtype)
                     * -(math.log(10000.0) / max(half - 1, 1)))
    angle = pos[:, None] * freq[None]                                       # (L, dim // 2)
    return F.pad(torch.cat([angle.sin(), angle.cos()], 1), (0, dim % 2))


class _Block(nn.Module):
    """One pre-norm layer: attention (cross if a source is given, else self), then the FFN."""

    def __init__(self, dim, heads, ffn_dim, attn_dropout, relu_dropout, res_dropout):
        super().__init__()
        self.attn = MaskedCrossModalAttention(dim, heads, dropout=attn_dropout, batch_first=True)
        self.attn_norm, self.ffn_norm = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.fc1, self.fc2 = nn.Linear(dim, ffn_dim), nn.Linear(ffn_dim, dim)
        for fc in (self.fc1, self.fc2):  # MulT's Linear: xavier-uniform weight, zero bias
            nn.init.xavier_uniform_(fc.weight)
            nn.init.zeros_(fc.bias)
        self.relu_dropout, self.res_dropout = relu_dropout, res_dropout

    def forward(self, x: Tensor, source: Optional[Tensor], **masks) -> Tensor:
        h = self.attn_norm(x)                                               # (B, Lt, E)
        s = h if source is None else self.attn_norm(source)                 # (B, Ls, E)
        h = self.attn(h, s, s, need_weights=False, **masks)[0]
        x = x + F.dropout(h, self.res_dropout, self.training)
        h = F.dropout(F.relu(self.fc1(self.ffn_norm(x))), self.relu_dropout, self.training)
        return x + F.dropout(self.fc2(h), self.res_dropout, self.training)


class _Stack(nn.Module):
    """MulT's TransformerEncoder: embed (scale, positions, dropout), layers, final LayerNorm."""

    def __init__(self, dim, heads, layers, ffn_dim, attn_dropout, relu_dropout, res_dropout,
                 embed_dropout, positions):
        super().__init__()
        self.layers = nn.ModuleList(_Block(dim, heads, ffn_dim, attn_dropout, relu_dropout,
                                           res_dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.embed_dropout, self.positions = embed_dropout, positions

    def embed(self, x: Tensor, lengths: Sequence[int]) -> Tensor:
        x = math.sqrt(x.shape[-1]) * x
        if self.positions:
            acc = torch.float64 if x.dtype == torch.float64 else torch.float32
            x = x + sinusoid_positions(lengths, x.shape[-1], x.device, acc).to(x.dtype)
        return F.dropout(x, self.embed_dropout, self.training)

    def forward(self, x, source=None, key_lengths=None, **masks) -> Tensor:
        x = self.embed(x, [x.shape[1]])
        if source is not None:
            source = self.embed(source, key_lengths or [source.shape[1]])
        for layer in self.layers:
            x = layer(x, source, key_lengths=key_lengths, **masks)
        return self.norm(x)


class CrossModalTransformer(nn.Module):
    """MulT cross-modal block stack: target (B, Lt, E) attends to sources -> (B, Lt, E).

    Args:
        embed_dim, num_heads, layers: width, heads, cross-modal layers.
        attn_dropout, relu_dropout, res_dropout, embed_dropout: MulT's four dropouts.
        memory_layers: layers of the self-attention "memory" stack after the cross stack (0: none);
            its attention is causal unless memory_causal=False.
        ffn_dim: hidden width of the feed-forward (default 4 * embed_dim).
        positions: add sinusoidal positions (per source segment) to target and sources.
        causal: the cross stack's attention is causal as MulT's attn_mask (one source only).

    forward(target, sources, *, present, key_lengths, key_padding_mask, target_padding_mask):
        sources: one (B, Ls, E) tensor whose segments have lengths `key_lengths`, or a list of
        (B, L_m, E) tensors (concatenated; key_lengths from their lengths; key_padding_mask may
        then be a list of (B, L_m) bool masks or None). present: (B, M) bool, True = available.
        target_padding_mask (B, Lt) bool masks the memory stack's keys. Masked source tokens and
        padded target tokens are zeroed first: NaN there reaches no output or gradient. A target
        with no source left gets no cross-modal update (the attention term is 0).
    """

    def __init__(self, embed_dim: int, num_heads: int, layers: int, *, attn_dropout: float = 0.0,
                 relu_dropout: float = 0.0, res_dropout: float = 0.0, embed_dropout: float = 0.0,
                 memory_layers: int = 0, memory_causal: bool = True, ffn_dim: Optional[int] = None,
                 positions: bool = True, causal: bool = False):
        super().__init__()
        if layers < 1 or memory_layers < 0:
            raise ValueError(f"layers must be >= 1 and memory_layers >= 0, got {layers} and "
                             f"{memory_layers}")
        args = (embed_dim, num_heads, ffn_dim or 4 * embed_dim, attn_dropout, relu_dropout,
                res_dropout, embed_dropout, positions)
        self.embed_dim, self.memory_causal, self.causal = embed_dim, memory_causal, bool(causal)
        self.cross = _Stack(*args[:2], layers, *args[2:])
        self.memory = _Stack(*args[:2], memory_layers, *args[2:]) if memory_layers else None

    def forward(self, target: Tensor, sources: Union[Tensor, Sequence[Tensor]], *,
                present: Optional[Tensor] = None, key_lengths: Optional[Sequence[int]] = None,
                key_padding_mask: Union[Tensor, Sequence[Optional[Tensor]], None] = None,
                target_padding_mask: Optional[Tensor] = None) -> Tensor:
        if not isinstance(sources, Tensor):
            lengths = [s.shape[1] for s in sources]
            if key_lengths is not None and list(key_lengths) != lengths:
                raise ValueError(f"key_lengths {list(key_lengths)} disagree with the sources' "
                                 f"lengths {lengths}")
            if key_padding_mask is not None and not isinstance(key_padding_mask, Tensor):
                key_padding_mask = torch.cat([
                    torch.zeros(s.shape[:2], dtype=torch.bool, device=s.device) if m is None else m
                    for s, m in zip(sources, key_padding_mask, strict=True)], 1)
            key_lengths, sources = lengths, torch.cat(list(sources), 1)
        if target.dim() != 3 or sources.dim() != 3 or target.shape[0] != sources.shape[0] \
                or target.shape[-1] != self.embed_dim or sources.shape[-1] != self.embed_dim:
            raise ValueError(f"target must be (B, Lt, {self.embed_dim}) and sources (B, Ls, "
                             f"{self.embed_dim}), got {tuple(target.shape)} and "
                             f"{tuple(sources.shape)}")
        keep = key_keep(sources.shape[0], sources.shape[1], present, key_lengths,
                        key_padding_mask, sources.device)                  # (B, Ls)
        if keep is not None:
            sources = torch.where(keep.unsqueeze(-1), sources, 0.0)
        if target_padding_mask is not None:
            target = torch.where(target_padding_mask.unsqueeze(-1), 0.0, target)
        causal = {}
        if self.causal:
            if key_lengths is not None and len(key_lengths) > 1:
                raise ValueError(f"causal=True needs one source segment (MulT's future mask), "
                                 f"got {len(key_lengths)}")
            causal = future_mask(target.shape[1], sources.shape[1], target.device)
        x = self.cross(target, sources, key_lengths=key_lengths, present=present,
                       key_padding_mask=key_padding_mask, **causal)
        if self.memory is not None:
            x = self.memory(x, key_padding_mask=target_padding_mask, is_causal=self.memory_causal)
        return x
