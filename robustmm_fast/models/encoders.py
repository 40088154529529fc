"""Per-modality encoders: (B, L, D) tokens [+ padding (B, L) bool, True = pad] -> (B, hidden).

    mlp:          h = relu(W_k ... drop(relu(W_1 mean_valid(x) + b_1)) ... + b_k)    (k = layers)
    transformer:  t = W_in x + b_in + P                      (P: sinusoidal positions 1..L)
                  each layer (pre-norm):  t = t + drop(Attn(LN_a(t) | key_padding_mask))
                                          t = t + drop(W_2 drop(relu(W_1 LN_f(t) + b_1)) + b_2)
                  h = mean_valid(LN(t))

mean_valid averages the valid (non-padded) tokens; a sample with no valid token gets 0. Padded
tokens are zeroed before any arithmetic (torch.where), so NaN there reaches neither the output
nor a gradient. The attention is robustmm_fast.nn.MaskedCrossModalAttention with
need_weights=False, i.e. the fused masked_cross_attention op.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn import MaskedCrossModalAttention
from ..nn.cross_modal_transformer import sinusoid_positions

__all__ = ["make_encoder", "MLPEncoder", "TransformerEncoder", "masked_mean", "ENCODER_KINDS"]

ENCODER_KINDS = ("auto", "mlp", "transformer")


def _zero_padding(x: Tensor, padding: Optional[Tensor]) -> Tensor:
    """x (B, L, D) with padded tokens replaced by 0 (NaN-safe)."""
    if padding is None:
        return x
    if padding.dtype != torch.bool or padding.shape != x.shape[:2]:
        raise ValueError(f"padding must be bool (B, L)={tuple(x.shape[:2])}, got {padding.dtype} "
                         f"{tuple(padding.shape)}")
    return torch.where(padding.unsqueeze(-1), torch.zeros((), dtype=x.dtype, device=x.device), x)


def masked_mean(x: Tensor, padding: Optional[Tensor]) -> Tensor:
    """(B, L, D) -> (B, D): mean over the tokens with padding False; 0 for a sample with none."""
    if padding is None:
        return x.mean(1)
    x = _zero_padding(x, padding)
    count = (~padding).sum(1, keepdim=True).clamp(min=1).to(x.dtype)   # (B, 1)
    return x.sum(1) / count


class MLPEncoder(nn.Module):
    """Linear-ReLU(-Dropout) stack on the (masked) token mean; the last layer has no dropout."""

    def __init__(self, dim: int, hidden: int, layers: int = 2, dropout: float = 0.0):
        super().__init__()
        mods: list[nn.Module] = []
        for i in range(layers):
            mods += [nn.Linear(dim if i == 0 else hidden, hidden), nn.ReLU()]
            if i < layers - 1 and dropout > 0:
                mods.append(nn.Dropout(dropout))
        self.net = nn.Sequential(*mods)

    def forward(self, x: Tensor, padding: Optional[Tensor] = None) -> Tensor:
        return self.net(masked_mean(x, padding))                           # (B, hidden)


class _Block(nn.Module):
    """One pre-norm self-attention + feed-forward layer."""

    def __init__(self, hidden: int, heads: int, dropout: float, attn_dropout: float):
        super().__init__()
        self.attn = MaskedCrossModalAttention(hidden, heads, dropout=attn_dropout,
                                              batch_first=True)
        self.attn_norm, self.ffn_norm = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.fc1, self.fc2 = nn.Linear(hidden, 2 * hidden), nn.Linear(2 * hidden, hidden)
        self.dropout = dropout

    def forward(self, t: Tensor, padding: Optional[Tensor]) -> Tensor:
        h = self.attn_norm(t)                                              # (B, L, E)
        h = self.attn(h, h, h, key_padding_mask=padding, need_weights=False)[0]
        t = t + F.dropout(h, self.dropout, self.training)
        h = F.dropout(F.relu(self.fc1(self.ffn_norm(t))), self.dropout, self.training)
        return t + F.dropout(self.fc2(h), self.dropout, self.training)


class TransformerEncoder(nn.Module):
    """Linear projection + sinusoidal positions + pre-norm self-attention layers + masked mean."""

    def __init__(self, dim: int, hidden: int, layers: int = 2, heads: int = 4,
                 dropout: float = 0.0, attn_dropout: float = 0.0):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden ({hidden}) must be a multiple of heads ({heads}) for the "
                             "transformer encoder")
        self.proj = nn.Linear(dim, hidden)
        self.layers = nn.ModuleList(_Block(hidden, heads, dropout, attn_dropout)
                                    for _ in range(layers))
        self.norm = nn.LayerNorm(hidden)
        self.dropout = dropout

    def forward(self, x: Tensor, padding: Optional[Tensor] = None) -> Tensor:
        x = _zero_padding(x, padding)
        t = self.proj(x)                                                   # (B, L, E)
        t = t + sinusoid_positions([t.shape[1]], t.shape[-1], t.device).to(t.dtype)
        t = F.dropout(t, self.dropout, self.training)
        for layer in self.layers:
            t = layer(t, padding)
        return masked_mean(self.norm(t), padding)                         # (B, E)


def make_encoder(seq_len: int, dim: int, hidden: int, *, kind: str = "auto", layers: int = 2,
                 heads: int = 4, dropout: float = 0.0, attn_dropout: float = 0.0) -> nn.Module:
    """An encoder (B, seq_len, dim) [+ padding (B, seq_len)] -> (B, hidden).

    kind: "mlp" (vector views; a sequence is mean-pooled first), "transformer" (sequences), or
    "auto" (mlp if seq_len == 1 else transformer). layers: Linear layers of the MLP, or
    transformer layers. heads: attention heads (hidden must be a multiple).
    """
    if kind not in ENCODER_KINDS:
        raise ValueError(f"encoder kind must be one of {ENCODER_KINDS}, got {kind!r}")
    for name, v in (("seq_len", seq_len), ("dim", dim), ("hidden", hidden), ("layers", layers),
                    ("heads", heads)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    for name, v in (("dropout", dropout), ("attn_dropout", attn_dropout)):
        if not 0.0 <= v < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {v!r}")
    if kind == "auto":
        kind = "mlp" if seq_len == 1 else "transformer"
    if kind == "mlp":
        return MLPEncoder(dim, hidden, layers, dropout)
    return TransformerEncoder(dim, hidden, layers, heads, dropout, attn_dropout)
