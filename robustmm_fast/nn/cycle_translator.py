"""CycleTranslator: the translators G_{m->n} between M modalities' latents (CyIN's cross-modal
translation), cascaded residual autoencoders run per token, all of them in one batched pass."""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class CycleTranslator(nn.Module):
    """Translators G_{m->n} for every ordered pair of M modalities with a shared latent dim D.

    Each translator is a cascaded residual autoencoder (Tran et al. 2017, as MMIN's ResidualAE,
    which CyIN reuses): K blocks along a residual stream, then a transition head,

        h_0 = x,   h_k = h_{k-1} + dec_k(enc_k(h_{k-1})),   G(x) = T_2 relu(T_1 h_K)
        enc_k: D -> w_1 -> ... -> w_E   Linear layers, LeakyReLU between them, none after w_E
        dec_k: w_E -> ... -> w_1 -> D   Linear layers, ReLU between them, none after D

    (T_i: Linear(D, D); `transition=False` drops the head). Every Linear acts on the last dim,
    so (..., D) token sequences are translated token by token.

    `pairs` lists the P = M (M - 1) ordered pairs: (a, b) for a < b, then their reverses in the
    same order, so pair p and pair (p + P/2) mod P are reverses. `shared=True` keeps one network
    per unordered pair, used in both directions (G_{a->b} = G_{b->a}, as MMIN's share_weight);
    otherwise one per ordered pair. Parameters are stacked over (block, network), so a pass is
    a few batched matmuls whatever M is; initialization is nn.Linear's.
    """

    def __init__(self, num_modalities: int, dim: int, widths: Sequence[int] = (64, 32, 16),
                 n_blocks: int = 8, *, shared: bool = False, transition: bool = True):
        super().__init__()
        for name, value, low in (("num_modalities", num_modalities, 2), ("dim", dim, 1),
                                 ("n_blocks", n_blocks, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        widths = tuple(widths)
        if not widths or any(isinstance(w, bool) or not isinstance(w, int) or w <= 0 for w in widths):
            raise ValueError(f"widths must be a non-empty sequence of positive ints, got {widths!r}")
        self.num_modalities, self.dim, self.widths, self.n_blocks = num_modalities, dim, widths, n_blocks
        self.shared, self.transition = bool(shared), bool(transition)
        half = [(a, b) for a in range(num_modalities) for b in range(a + 1, num_modalities)]
        self.pairs = half + [(b, a) for a, b in half]
        self.num_networks = len(half) if self.shared else len(self.pairs)
        dims = (dim, *widths, *widths[-2::-1], dim)  # one block: encoder, then mirrored decoder
        shape = (n_blocks, self.num_networks)
        self.weight = nn.ParameterList(torch.empty(*shape, o, i) for i, o in zip(dims, dims[1:]))
        self.bias = nn.ParameterList(torch.empty(*shape, o) for o in dims[1:])
        if self.transition:
            self.transition_weight = nn.Parameter(torch.empty(2, self.num_networks, dim, dim))
            self.transition_bias = nn.Parameter(torch.empty(2, self.num_networks, dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's default: weight and bias ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
        weights = list(self.weight) + ([self.transition_weight] if self.transition else [])
        biases = list(self.bias) + ([self.transition_bias] if self.transition else [])
        with torch.no_grad():
            for w, b in zip(weights, biases):
                bound = 1.0 / math.sqrt(w.shape[-1])
                w.uniform_(-bound, bound)
                b.uniform_(-bound, bound)

    def network(self, source: int, target: int) -> int:
        """Index of the network that computes G_{source->target}."""
        p = self.pairs.index((source, target))
        return p % self.num_networks

    @staticmethod
    def _linear(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
        # x (G, T, N, in), w (T, out, in), b (T, out) -> (G, T, N, out): network t on x[:, t]
        return torch.matmul(x, w.transpose(-1, -2)) + b.unsqueeze(-2)

    def _run(self, x: Tensor, nets: slice = slice(None)) -> Tensor:
        """x (G, T, N, D) -> (G, T, N, D): network nets[t] applied to x[:, t]."""
        bottleneck, last = len(self.widths) - 1, 2 * len(self.widths) - 1
        h = x
        for k in range(self.n_blocks):
            y = h
            for j, (w, b) in enumerate(zip(self.weight, self.bias)):
                y = self._linear(y, w[k, nets], b[k, nets])
                if j < bottleneck:
                    y = F.leaky_relu(y)
                elif bottleneck < j < last:
                    y = F.relu(y)
            h = h + y
        if self.transition:
            tw, tb = self.transition_weight[:, nets], self.transition_bias[:, nets]
            h = self._linear(F.relu(self._linear(h, tw[0], tb[0])), tw[1], tb[1])
        return h

    def forward(self, x: Tensor, reverse: bool = False) -> Tensor:
        """x (P, ..., D), x[p] the input of pair p -> (P, ..., D), out[p] = G_{pairs[p]}(x[p]);
        with reverse=True, out[p] = G_{n->m}(x[p]) for pairs[p] = (m, n) (the cycle step)."""
        P, D = len(self.pairs), self.dim
        if x.dim() < 2 or x.shape[0] != P or x.shape[-1] != D:
            raise ValueError(f"x must have shape (P={P}, ..., D={D}), got {tuple(x.shape)}")
        if self.shared:  # pairs p and p + P/2 share network p mod P/2: one batch per network
            return self._run(x.reshape(2, P // 2, -1, D)).reshape(x.shape)
        if reverse:  # pair p's reverse is p + P/2 (mod P): route x[p] to that network
            x = x.roll(P // 2, 0)
        out = self._run(x.reshape(1, P, -1, D)).reshape(x.shape)
        return out.roll(P // 2, 0) if reverse else out

    def translate(self, x: Tensor, source: int, target: int) -> Tensor:
        """G_{source->target}(x) for one pair: x (..., D) -> (..., D)."""
        if x.dim() < 1 or x.shape[-1] != self.dim:
            raise ValueError(f"x must have shape (..., D={self.dim}), got {tuple(x.shape)}")
        t = self.network(source, target)
        return self._run(x.reshape(1, 1, -1, self.dim), slice(t, t + 1)).reshape(x.shape)

    def extra_repr(self) -> str:
        return (f"num_modalities={self.num_modalities}, dim={self.dim}, widths={self.widths}, "
                f"n_blocks={self.n_blocks}, shared={self.shared}, transition={self.transition}")
