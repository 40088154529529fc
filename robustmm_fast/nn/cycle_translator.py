"""CycleTranslator: the translators G_{m->n} between M modalities' latents (CyIN's cross-modal
translation), cascaded residual autoencoders, all of them in one batched pass."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class CycleTranslator(nn.Module):
    """Translators G_{m->n} for every ordered pair of M modalities with a shared latent dim D.

    Each translator is a cascaded residual autoencoder (Tran et al. 2017; MMIN's ResidualAE,
    which CyIN reuses with Conv1d layers): K blocks along a residual stream, then a transition
    head,

        h_0 = x,   h_k = h_{k-1} + dec_k(enc_k(h_{k-1})),   G(x) = T_2 relu(T_1 h_K)
        enc_k: D -> w_1 -> ... -> w_E   layers, LeakyReLU between them, none after w_E
        dec_k: w_E -> ... -> w_1 -> D   layers, ReLU between them, none after D

    Every layer is a 1-D convolution over time with `kernel_size` taps (zero padding
    kernel_size // 2, so lengths are kept) except the decoders' last layer, which has one tap
    (as CyIN's ResidualAE); `bias` adds a bias to every layer. kernel_size=1 (the default) is a
    per-token Linear: (..., D) inputs of any shape are translated token by token. With
    kernel_size > 1 the inputs are sequences (..., L, D) (time is dim -2) and each token's
    translation sees its kernel_size - 1 neighbours; `forward(mask=...)` then zeroes the
    tokens outside the mask after every layer, so a padded sequence translates exactly as the
    unpadded one. CyIN's official translators: kernel_size=3, bias=False
    (models/generationBased/CyIN.py, ResidualAE); MMIN's original: Linear layers with bias
    (kernel_size=1, bias=True). `transition=False` drops the head.

    `pairs` lists the P = M (M - 1) ordered pairs: (a, b) for a < b, then their reverses in the
    same order, so pair p and pair (p + P/2) mod P are reverses. `shared=True` keeps one network
    per unordered pair, used in both directions (G_{a->b} = G_{b->a}, as CyIN's netRAE_LA /
    LV / AV); otherwise one per ordered pair. Parameters are stacked over (block, network):
    weight[j] is (K, networks, out, in) for kernel_size 1, else (K, networks, out, in, taps),
    so a pass is a few batched matmuls (or grouped convolutions) whatever M is; initialization
    is nn.Linear's / nn.Conv1d's (U(+-1/sqrt(fan_in)), fan_in = in * taps).
    """

    def __init__(self, num_modalities: int, dim: int, widths: Sequence[int] = (64, 32, 16),
                 n_blocks: int = 8, *, shared: bool = False, transition: bool = True,
                 kernel_size: int = 1, bias: bool = True):
        super().__init__()
        for name, value, low in (("num_modalities", num_modalities, 2), ("dim", dim, 1),
                                 ("n_blocks", n_blocks, 1), ("kernel_size", kernel_size, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd (lengths are kept), got {kernel_size}")
        widths = tuple(widths)
        if not widths or any(isinstance(w, bool) or not isinstance(w, int) or w <= 0 for w in widths):
            raise ValueError(f"widths must be a non-empty sequence of positive ints, got {widths!r}")
        self.num_modalities, self.dim, self.widths, self.n_blocks = num_modalities, dim, widths, n_blocks
        self.shared, self.transition = bool(shared), bool(transition)
        self.kernel_size, self.has_bias = kernel_size, bool(bias)
        half = [(a, b) for a in range(num_modalities) for b in range(a + 1, num_modalities)]
        self.pairs = half + [(b, a) for a, b in half]
        self.num_networks = len(half) if self.shared else len(self.pairs)
        dims = (dim, *widths, *widths[-2::-1], dim)  # one block: encoder, then mirrored decoder
        taps = [kernel_size] * (len(dims) - 2) + [1]  # the decoder's last layer: one tap
        shape = (n_blocks, self.num_networks)
        self.weight = nn.ParameterList(torch.empty(*shape, o, i, *self._taps(k))
                                       for i, o, k in zip(dims, dims[1:], taps))
        self.bias = nn.ParameterList(torch.empty(*shape, o) for o in dims[1:]) if bias else None
        if self.transition:
            self.transition_weight = nn.Parameter(torch.empty(2, self.num_networks, dim, dim,
                                                              *self._taps(kernel_size)))
            self.transition_bias = (nn.Parameter(torch.empty(2, self.num_networks, dim))
                                    if bias else None)
        self.reset_parameters()

    def _taps(self, k: int) -> tuple[int, ...]:
        return () if self.kernel_size == 1 else (k,)

    def reset_parameters(self) -> None:
        """nn.Linear's / nn.Conv1d's default: weight and bias ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
        weights = list(self.weight) + ([self.transition_weight] if self.transition else [])
        biases = (list(self.bias) + ([self.transition_bias] if self.transition else [])
                  if self.has_bias else [None] * len(weights))
        with torch.no_grad():
            for w, b in zip(weights, biases):
                fan_in = w.shape[-1] if self.kernel_size == 1 else w.shape[-2] * w.shape[-1]
                bound = 1.0 / math.sqrt(fan_in)
                w.uniform_(-bound, bound)
                if b is not None:
                    b.uniform_(-bound, bound)

    def network(self, source: int, target: int) -> int:
        """Index of the network that computes G_{source->target}."""
        p = self.pairs.index((source, target))
        return p % self.num_networks

    @staticmethod
    def _linear(x: Tensor, w: Tensor, b: Optional[Tensor]) -> Tensor:
        # x (G, T, N, in), w (T, out, in), b (T, out) -> (G, T, N, out): network t on x[:, t]
        y = torch.matmul(x, w.transpose(-1, -2))
        return y if b is None else y + b.unsqueeze(-2)

    @staticmethod
    def _conv(h: Tensor, w: Tensor, b: Optional[Tensor]) -> Tensor:
        # h (G N, T in, L), w (T, out, in, k), b (T, out) -> (G N, T out, L): a grouped
        # convolution, group t = network t
        T, out, _, k = w.shape
        return F.conv1d(h, w.reshape(T * out, *w.shape[2:]),
                        None if b is None else b.reshape(T * out), padding=k // 2, groups=T)

    def _layer(self, h, w, b, keep):
        if self.kernel_size == 1:
            return self._linear(h, w, b)
        y = self._conv(h, w, b)
        return y if keep is None else torch.where(keep, y, 0)

    def _run(self, x: Tensor, nets: slice = slice(None), mask: Optional[Tensor] = None) -> Tensor:
        """x (G, T, N, D) -> (G, T, N, D): network nets[t] applied to x[:, t]; for
        kernel_size > 1, x is (G, T, N, L, D) and mask (N, L) bool or None."""
        bottleneck, last = len(self.widths) - 1, 2 * len(self.widths) - 1
        keep = None
        if self.kernel_size > 1:  # channels first: (G N, T D, L), network t's channels together
            G, T, N, L, D = x.shape
            x = x.permute(0, 2, 1, 4, 3).reshape(G * N, T * D, L)
            if mask is not None:
                keep = mask.reshape(1, N, 1, L).expand(G, N, 1, L).reshape(G * N, 1, L)
                x = torch.where(keep, x, 0)
        biases = self.bias if self.has_bias else [None] * len(self.weight)
        h = x
        for k in range(self.n_blocks):
            y = h
            for j, (w, b) in enumerate(zip(self.weight, biases)):
                y = self._layer(y, w[k, nets], None if b is None else b[k, nets], keep)
                if j < bottleneck:
                    y = F.leaky_relu(y)
                elif bottleneck < j < last:
                    y = F.relu(y)
            h = h + y
        if self.transition:
            tw = self.transition_weight[:, nets]
            tb = self.transition_bias[:, nets] if self.has_bias else (None, None)
            h = self._layer(F.relu(self._layer(h, tw[0], tb[0], keep)), tw[1], tb[1], keep)
        if self.kernel_size > 1:
            h = h.reshape(G, N, T, D, L).permute(0, 2, 1, 4, 3)
        return h

    def _grouped(self, x: Tensor, groups: int, mask: Optional[Tensor]) -> Tensor:
        """x (P, ...) as (groups, P / groups, N, [L,] D) through _run, back to x's shape."""
        if self.kernel_size == 1:
            return self._run(x.reshape(groups, x.shape[0] // groups, -1, self.dim)).reshape(x.shape)
        if x.dim() < 3:
            raise ValueError(f"kernel_size {self.kernel_size} translates sequences: x must be "
                             f"(P, ..., L, D), got {tuple(x.shape)}")
        L = x.shape[-2]
        if mask is not None:
            if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
                raise TypeError(f"mask must be a bool tensor, got {getattr(mask, 'dtype', type(mask))}")
            mask = mask.expand(x.shape[1:-1]).reshape(-1, L)
        out = self._run(x.reshape(groups, x.shape[0] // groups, -1, L, self.dim), mask=mask)
        return out.reshape(x.shape)

    def forward(self, x: Tensor, reverse: bool = False, mask: Optional[Tensor] = None) -> Tensor:
        """x (P, ..., D), x[p] the input of pair p -> (P, ..., D), out[p] = G_{pairs[p]}(x[p]);
        with reverse=True, out[p] = G_{n->m}(x[p]) for pairs[p] = (m, n) (the cycle step).
        mask: bool broadcastable to x.shape[1:-1] (True = a real token; kernel_size > 1 only
        uses it): tokens outside it are zero in and after every layer."""
        P, D = len(self.pairs), self.dim
        if x.dim() < 2 or x.shape[0] != P or x.shape[-1] != D:
            raise ValueError(f"x must have shape (P={P}, ..., D={D}), got {tuple(x.shape)}")
        if self.shared:  # pairs p and p + P/2 share network p mod P/2: one batch per network
            return self._grouped(x, 2, mask)
        if reverse:  # pair p's reverse is p + P/2 (mod P): route x[p] to that network
            x = x.roll(P // 2, 0)
        out = self._grouped(x, 1, mask)
        return out.roll(P // 2, 0) if reverse else out

    def translate(self, x: Tensor, source: int, target: int, mask: Optional[Tensor] = None) -> Tensor:
        """G_{source->target}(x) for one pair: x (..., D) -> (..., D) ((..., L, D) sequences
        for kernel_size > 1, mask broadcastable to x.shape[:-1])."""
        if x.dim() < 1 or x.shape[-1] != self.dim:
            raise ValueError(f"x must have shape (..., D={self.dim}), got {tuple(x.shape)}")
        t = self.network(source, target)
        if self.kernel_size == 1:
            return self._run(x.reshape(1, 1, -1, self.dim), slice(t, t + 1)).reshape(x.shape)
        if x.dim() < 2:
            raise ValueError(f"kernel_size {self.kernel_size} translates sequences: x must be "
                             f"(..., L, D), got {tuple(x.shape)}")
        L = x.shape[-2]
        if mask is not None:
            mask = mask.expand(x.shape[:-1]).reshape(-1, L)
        out = self._run(x.reshape(1, 1, -1, L, self.dim), slice(t, t + 1), mask)
        return out.reshape(x.shape)

    def extra_repr(self) -> str:
        return (f"num_modalities={self.num_modalities}, dim={self.dim}, widths={self.widths}, "
                f"n_blocks={self.n_blocks}, shared={self.shared}, transition={self.transition}, "
                f"kernel_size={self.kernel_size}, bias={self.has_bias}")
