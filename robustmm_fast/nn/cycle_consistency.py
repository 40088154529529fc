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
OBJECTIVES = ("cyin", "grouped")


class CycleOutput(NamedTuple):
    loss: Tensor           # () for reduction mean/sum; (R, B, ...) rows for none
    reconstructed: Tensor  # (M, B, ..., D): z_n where present, else combined translations
    forward_term: Tensor   # unweighted forward term, reduced as loss, detached
    cycle_term: Tensor     # unweighted cycle term, reduced as loss, detached
    translations: Tensor   # (P, B, ..., D): G_{m->n}(z_m) of every pair (absent sources too)
    combined: Tensor       # (M, B, ..., D): c_n, the combination of the present sources' translations
    sources: Tensor        # (M, B): how many present sources each c_n combines


class CycleConsistency(nn.Module):
    """Cyclic translation among M modality latents z_m (B, ..., D) with a (B, M) `present` mask.

    Terms (R = P + M rows of one cycle_reconstruction_loss call; the last M only for M >= 3
    and combination_loss, CyIN's "sum of the two other sources" terms):

        pair p = (m, n), p < P:  forward  d(G_{m->n}(z_m), z_n)
                                 cycle    d(G_{n->m}(G_{m->n}(z_m)), z_m)
                                 included where m and n are present
        combination n:           forward  d(c_n, z_n),  c_n = C_{k != n} G_{k->n}(z_k)
                                 cycle    d(C_{k != n} G_{k->n}(G_{n->k}(z_n)), z_n)
                                 included where n and at least two other modalities are present

    (C: the sum over the present k -- CyIN's rule -- or their mean, combine="mean"; rows also
    masked by `token_mask`, (B, ...)). Each term's value is its mean over included rows (a row's
    distance d is the mean over D, so a term is nn.MSELoss of its tensors when complete), and
    with reduction="mean" (default) and objective:

        "cyin" (default): loss = (1/T) sum_t [fw F_t + cw C_t] over the T terms with >= 1
            included row -- for M = 3 complete, CyIN's TRANSLATE_loss = (1/9) sum of 6 pair + 3
            combination forward terms + (1/9) the same 9 cycle terms
            (RH-Lin/CyIN models/generationBased/CyIN.py, generation_stage branch). Default: the
            published objective, and no reason found to depart from it.
        "grouped": our earlier objective: fw mean_pairs(F) + cw mean_pairs(C) + fw
            mean_combinations(F), pairs and combinations each pooled over their rows, no
            combination cycles (pair terms weigh 1.5x and combinations 3x CyIN's for M = 3).

    reduction="sum": the sum over every included row; "none": the (R, B, ...) rows.
    forward_term / cycle_term: the same reduction of F and C alone. reconstructed[n] = z_n where
    n is present, else c_n (0 when no source is present). Absent latents (and tokens outside
    `token_mask`) are zeroed before any translator, so what they hold (NaN included) reaches
    neither the loss, the reconstructions of present modalities, nor any gradient.

    Translators: CycleTranslator(widths, n_blocks, shared, transition, kernel_size, bias); with
    kernel_size > 1 the latents are sequences (M, B, L, D) and token_mask (B, L) masks every
    translator layer too.
    """

    def __init__(self, num_modalities: int, dim: int, *, widths: Sequence[int] = (64, 32, 16),
                 n_blocks: int = 8, shared: bool = False, transition: bool = True,
                 kernel_size: int = 1, bias: bool = True, combine: str = "sum",
                 combination_loss: bool = True, objective: str = "cyin", distance: str = "mse",
                 forward_weight: float = 1.0, cycle_weight: float = 1.0, reduction: str = "mean",
                 beta: float = 1.0):
        super().__init__()
        for name, value, choices in (("combine", combine, COMBINES), ("distance", distance, DISTANCES),
                                     ("reduction", reduction, REDUCTIONS),
                                     ("objective", objective, OBJECTIVES)):
            if value not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {value!r}")
        for name, value in (("forward_weight", forward_weight), ("cycle_weight", cycle_weight), ("beta", beta)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        self.translator = CycleTranslator(num_modalities, dim, widths, n_blocks, shared=shared,
                                          transition=transition, kernel_size=kernel_size,
                                          bias=bias)
        self.num_modalities, self.dim, self.combine = num_modalities, dim, combine
        self.objective = objective
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
        tr_mask = None if token_mask is None else token_mask.expand(z.shape[1:-1])
        z_src = z[self.src]                                   # (P, B, ..., D) z_m of pair p
        fwd = self.translator(z_src, mask=tr_mask)            # (P, B, ..., D) G_{m->n}(z_m)
        cyc = self.translator(fwd, reverse=True, mask=tr_mask)  # (P, B, ..., D) G_{n->m}(fwd)
        src_on, rows = on[self.src], on[self.src] & on[self.dst]  # (P, B)
        count = torch.zeros_like(on, dtype=z.dtype).index_add(0, self.dst, src_on.to(z.dtype))  # (M, B)
        total = self._combine(fwd, src_on, self.dst, count, z, tail)  # (M, B, ..., D) c_n
        reconstructed = torch.where(keep, z, total)
        args = [fwd, z[self.dst], cyc, z_src]
        if self.combination_loss:
            if self.objective == "cyin":  # cycle of n through every present k, combined
                cyc_total = self._combine(cyc, on[self.dst], self.src, count, z, tail)
                extra = (total, z, cyc_total, z)
            else:  # "grouped": no combination cycles (a constant compared with itself)
                ones = torch.ones_like(z)
                extra = (total, z, ones, ones)
            args = [torch.cat(pair) for pair in zip(args, extra)]
            rows = torch.cat([rows, on & (count >= 2)])       # (P + M, B)
        mask = rows.view(*rows.shape, *tail[1:])              # (R, B, 1...) -> broadcast over tokens
        if token_mask is not None:
            mask = mask & token_mask
        reduction = self.loss_args["reduction"]
        rows_loss, f_rows, c_rows = cycle_reconstruction_loss(
            *args, mask=mask, return_terms=True, **{**self.loss_args, "reduction": "none"})
        if reduction == "none":
            return CycleOutput(rows_loss, reconstructed, f_rows, c_rows, fwd, total, count)
        included = mask.expand(rows_loss.shape)
        reduce = self._per_term if self.objective == "cyin" else self._per_group
        loss, forward_term, cycle_term = (reduce(x, included, reduction)
                                          for x in (rows_loss, f_rows, c_rows))
        return CycleOutput(loss, reconstructed, forward_term, cycle_term, fwd, total, count)

    def _combine(self, parts: Tensor, part_on: Tensor, index: Tensor, count: Tensor, z: Tensor,
                 tail: tuple) -> Tensor:
        """(M, B, ..., D): for each modality i, C over the pairs p with index[p] == i and
        part_on[p] of parts[p] (sum, or mean over `count`)."""
        used = torch.where(part_on.view(*part_on.shape, *tail), parts, 0)
        total = torch.zeros_like(z).index_add(0, index, used)
        if self.combine == "mean":
            total = total / count.clamp_min(1).view(self.num_modalities, -1, *tail)
        return total

    @staticmethod
    def _per_term(x: Tensor, included: Tensor, reduction: str) -> Tensor:
        """"cyin": mean over the terms with an included row of each term's mean (or the sum)."""
        if reduction == "sum":
            return x.sum()
        flat, n = x.flatten(1).sum(1), included.flatten(1).sum(1)   # (R,) per term
        on = n > 0
        terms = flat / n.clamp_min(1)
        return terms.sum() / on.sum().clamp_min(1)

    def _per_group(self, x: Tensor, included: Tensor, reduction: str) -> Tensor:
        """"grouped": per group (pairs, combinations), the sum or the mean over its rows."""
        groups = (slice(0, len(self.pairs)), slice(len(self.pairs), None))
        parts = [x[g].sum() if reduction == "sum" else
                 x[g].sum() / included[g].sum().clamp_min(1) for g in groups]
        return parts[0] + parts[1]

    def extra_repr(self) -> str:
        return (f"combine={self.combine!r}, combination_loss={self.combination_loss}, "
                f"objective={self.objective!r}, "
                + ", ".join(f"{k}={v!r}" for k, v in self.loss_args.items()))
