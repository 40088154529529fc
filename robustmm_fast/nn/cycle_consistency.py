"""CycleConsistency: CyIN's cross-modal cyclic translation -- translate every present pair,
score forward and cycle reconstruction in one fused op call, rebuild absent modalities."""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ..ops.cycle_loss import cycle_reconstruction_loss
from ..reference.cycle_loss import DISTANCES, REDUCTIONS
from .cycle_translator import CycleTranslator

COMBINES = ("sum", "mean")


class CycleOutput(NamedTuple):
    loss: Tensor           # () for reduction mean/sum; (R, B, ...) rows for none
    reconstructed: Tensor  # (M, B, ..., D): z_n where present, else combined translations
    forward_term: Tensor   # unweighted forward term, reduced as loss, detached
    cycle_term: Tensor     # unweighted cycle term, reduced as loss, detached


class CycleConsistency(nn.Module):
    """Cyclic translation among M modality latents z_m (B, ..., D) with a (B, M) `present` mask.

    For the P ordered pairs (m, n) of `pairs` (CycleTranslator's order):

        rows 0..P-1   forward  G_{m->n}(z_m) vs z_n,  cycle  G_{n->m}(G_{m->n}(z_m)) vs z_m
                      included where present[:, m] & present[:, n]
        rows P..P+M-1 (M >= 3, combination_loss) forward  c_n vs z_n, where c_n combines the
                      translations into n from every present m != n; included where n is
                      present and at least two sources are (CyIN sums the two sources'
                      translations). Their cycle half compares a constant with itself: 0.

    all in ONE cycle_reconstruction_loss call (rows also masked by `token_mask`, (B, ...)).
    reduction="mean" averages each group over its included rows and adds the groups:
    loss = fw * mean_pairs(F) + cw * mean_pairs(C) + fw * mean_combinations(F), so the
    combination rows neither dilute the cycle term nor weigh on the pair term.
    c_n is the sum of the translations (CyIN's rule) or their mean (combine="mean");
    reconstructed[n] = z_n where n is present, else c_n (0 when no source is present).
    Absent latents (and tokens outside `token_mask`) are zeroed before any translator, so what
    they hold (NaN included) reaches neither the loss, the reconstructions of present
    modalities, nor any gradient.
    """

    def __init__(self, num_modalities: int, dim: int, *, widths: Sequence[int] = (64, 32, 16),
                 n_blocks: int = 8, shared: bool = False, transition: bool = True,
                 combine: str = "sum", combination_loss: bool = True, distance: str = "mse",
                 forward_weight: float = 1.0, cycle_weight: float = 1.0, reduction: str = "mean",
                 beta: float = 1.0):
        super().__init__()
        for name, value, choices in (("combine", combine, COMBINES), ("distance", distance, DISTANCES),
                                     ("reduction", reduction, REDUCTIONS)):
            if value not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {value!r}")
        for name, value in (("forward_weight", forward_weight), ("cycle_weight", cycle_weight), ("beta", beta)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        self.translator = CycleTranslator(num_modalities, dim, widths, n_blocks, shared=shared,
                                          transition=transition)
        self.num_modalities, self.dim, self.combine = num_modalities, dim, combine
        self.combination_loss = bool(combination_loss) and num_modalities >= 3
        self.loss_args = dict(distance=distance, forward_weight=float(forward_weight),
                              cycle_weight=float(cycle_weight), reduction=reduction, beta=float(beta))
        src, dst = zip(*self.translator.pairs)
        self.register_buffer("src", torch.tensor(src), persistent=False)  # (P,) source m of pair p
        self.register_buffer("dst", torch.tensor(dst), persistent=False)  # (P,) target n of pair p

    @property
    def pairs(self) -> list[tuple[int, int]]:
        return self.translator.pairs

    def forward(self, latents: Union[Tensor, Sequence[Tensor]], present: Optional[Tensor] = None,
                token_mask: Optional[Tensor] = None) -> CycleOutput:
        """latents: (M, B, ..., D) or M tensors (B, ..., D); present: (B, M) bool, None = all;
        token_mask: bool broadcastable to (B, ...), True = include (e.g. not padding)."""
        z = latents if isinstance(latents, Tensor) else torch.stack(list(latents))
        M, D = self.num_modalities, self.dim
        if z.dim() < 3 or z.shape[0] != M or z.shape[-1] != D:
            raise ValueError(f"latents must have shape (M={M}, B, ..., D={D}), got {tuple(z.shape)}")
        if present is None:
            present = torch.ones(z.shape[1], M, dtype=torch.bool, device=z.device)
        if not isinstance(present, Tensor) or present.dtype != torch.bool:
            raise TypeError(f"present must be a bool tensor, got {getattr(present, 'dtype', type(present))}")
        if present.shape != (z.shape[1], M):
            raise ValueError(f"present must have shape (B, M) = {(z.shape[1], M)}, got {tuple(present.shape)}")
        if token_mask is not None and (not isinstance(token_mask, Tensor) or token_mask.dtype != torch.bool):
            raise TypeError(f"token_mask must be a bool tensor, got {getattr(token_mask, 'dtype', type(token_mask))}")
        on = present.t()                                      # (M, B)
        tail = (1,) * (z.dim() - 2)
        keep = on.view(M, -1, *tail)                          # (M, B, 1...)
        z = torch.where(keep if token_mask is None else keep & token_mask.unsqueeze(-1), z, 0)
        z_src = z[self.src]                                   # (P, B, ..., D) z_m of pair p
        fwd = self.translator(z_src)                          # (P, B, ..., D) G_{m->n}(z_m)
        cyc = self.translator(fwd, reverse=True)              # (P, B, ..., D) G_{n->m}(fwd)
        src_on, rows = on[self.src], on[self.src] & on[self.dst]  # (P, B)
        used = torch.where(src_on.view(*src_on.shape, *tail), fwd, 0)
        total = torch.zeros_like(z).index_add(0, self.dst, used)  # (M, B, ..., D) sum over sources
        count = torch.zeros_like(on, dtype=z.dtype).index_add(0, self.dst, src_on.to(z.dtype))  # (M, B)
        if self.combine == "mean":
            total = total / count.clamp_min(1).view(M, -1, *tail)
        reconstructed = torch.where(keep, z, total)
        args = [fwd, z[self.dst], cyc, z_src]
        if self.combination_loss:
            ones = torch.ones_like(z)
            args = [torch.cat(pair) for pair in zip(args, (total, z, ones, ones))]
            rows = torch.cat([rows, on & (count >= 2)])       # (P + M, B)
        mask = rows.view(*rows.shape, *tail[1:])              # (R, B, 1...) -> broadcast over tokens
        if token_mask is not None:
            mask = mask & token_mask
        reduction = self.loss_args["reduction"]
        rows_loss, f_rows, c_rows = cycle_reconstruction_loss(
            *args, mask=mask, return_terms=True, **{**self.loss_args, "reduction": "none"})
        if reduction == "none":
            return CycleOutput(rows_loss, reconstructed, f_rows, c_rows)
        included = mask.expand(rows_loss.shape)
        groups = (slice(0, len(self.pairs)), slice(len(self.pairs), None))

        def reduce(x: Tensor) -> Tensor:  # per group: sum, or mean over its included rows
            parts = [x[g].sum() if reduction == "sum" else
                     x[g].sum() / included[g].sum().clamp_min(1) for g in groups]
            return parts[0] + parts[1]

        return CycleOutput(reduce(rows_loss), reconstructed, reduce(f_rows), reduce(c_rows))

    def extra_repr(self) -> str:
        return f"combine={self.combine!r}, combination_loss={self.combination_loss}, " + ", ".join(
            f"{k}={v!r}" for k, v in self.loss_args.items())
