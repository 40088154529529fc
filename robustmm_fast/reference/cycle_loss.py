"""Reference cycle_reconstruction_loss: plain PyTorch, autograd for the gradients. The test
oracle, the benchmark's eager baseline and the reference backend's math.

For rows r (every leading index, the pair dimension included) with a row distance d(a, b):

    F_r = d(forward_pred_r, target_r)        forward term:  G_{m->n}(z_m) vs z_n
    C_r = d(cycle_pred_r, source_r)          cycle term:    G_{n->m}(G_{m->n}(z_m)) vs z_m
    loss = forward_weight * reduce(F) + cycle_weight * reduce(C)

    mse        d = 1/D sum_i (a_i - b_i)^2
    l1         d = 1/D sum_i |a_i - b_i|
    smooth_l1  d = 1/D sum_i (|x| < beta ? x^2 / (2 beta) : |x| - beta / 2),  x = a_i - b_i
    cosine     d = 1 - <a, b> / (max(|a|, 1e-8) * max(|b|, 1e-8))   (as F.cosine_similarity)

reduce: ``mean`` = sum over included rows / number of included rows (0 when none is),
``sum``, ``none`` (the leading shape). Rows excluded by `mask` (True = include) contribute 0 and
receive no gradient, whatever they hold (NaN included). Math runs in float32 for
float16/bfloat16 inputs (float64 stays float64); the loss is returned in the inputs' dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

DISTANCES = ("mse", "l1", "smooth_l1", "cosine")
REDUCTIONS = ("mean", "sum", "none")
COSINE_EPS = 1e-8


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 math for float16/bfloat16/float32 inputs, float64 for float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def row_distance(a: Tensor, b: Tensor, distance: str, beta: float = 1.0) -> Tensor:
    """d(a, b) over the last dim: (..., D) -> (...)."""
    if distance == "mse":
        return F.mse_loss(a, b, reduction="none").mean(-1)
    if distance == "l1":
        return F.l1_loss(a, b, reduction="none").mean(-1)
    if distance == "smooth_l1":
        return F.smooth_l1_loss(a, b, reduction="none", beta=beta).mean(-1)
    if distance == "cosine":
        return 1.0 - F.cosine_similarity(a, b, dim=-1, eps=COSINE_EPS)
    raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")


def row_terms(forward_pred: Tensor, target: Tensor, cycle_pred: Tensor, source: Tensor,
              mask: Tensor | None, distance: str, beta: float = 1.0) -> Tensor:
    """(2, ...) per-row forward and cycle distances in the accumulation dtype; 0 at excluded rows."""
    acc = acc_dtype(forward_pred.dtype)
    keep = None if mask is None else mask.unsqueeze(-1)

    # excluded rows are replaced before any arithmetic, so NaN/Inf there reach neither the
    # result nor the gradients
    def clean(t: Tensor) -> Tensor:
        t = t.to(acc)
        return t if keep is None else torch.where(keep, t, torch.zeros((), dtype=acc, device=t.device))

    fp, tg, cp, src = clean(forward_pred), clean(target), clean(cycle_pred), clean(source)
    terms = torch.stack([row_distance(fp, tg, distance, beta), row_distance(cp, src, distance, beta)])
    if mask is not None:
        terms = torch.where(mask, terms, torch.zeros((), dtype=acc, device=terms.device))
    return terms


def reduce_terms(terms: Tensor, mask: Tensor | None, reduction: str) -> Tensor:
    """(2, ...) per-row terms -> (2,) for sum/mean, unchanged for none."""
    if reduction == "none":
        return terms
    sums = terms.reshape(2, -1).sum(1)
    if reduction == "sum":
        return sums
    count = terms[0].numel() if mask is None else mask.sum().clamp_min(1)
    return sums / count if terms[0].numel() else sums


def cycle_reconstruction_loss(forward_pred: Tensor, target: Tensor, cycle_pred: Tensor,
                              source: Tensor, *, mask: Tensor | None = None, distance: str = "mse",
                              forward_weight: float = 1.0, cycle_weight: float = 1.0,
                              reduction: str = "mean", return_terms: bool = False,
                              beta: float = 1.0):
    """The oracle: same arguments and results as robustmm_fast.ops.cycle_reconstruction_loss."""
    terms = reduce_terms(row_terms(forward_pred, target, cycle_pred, source, mask, distance, beta),
                         mask, reduction)
    loss = (forward_weight * terms[0] + cycle_weight * terms[1]).to(forward_pred.dtype)
    if not return_terms:
        return loss
    detached = terms.detach().to(forward_pred.dtype)
    return loss, detached[0], detached[1]


# ---- closed-form per-row gradients: the reference backend's kernel math ----

def distance_grads(a: Tensor, b: Tensor, distance: str, beta: float) -> tuple[Tensor, Tensor | None]:
    """(d row_distance / d a, d row_distance / d b), in a's dtype; the second is None for the
    symmetric distances (mse, l1, smooth_l1), whose b-gradient is the negative of a's."""
    dim = a.shape[-1]
    diff = a - b
    if distance == "mse":
        return diff * (2.0 / dim), None
    if distance == "l1":
        return torch.sign(diff) / dim, None
    if distance == "smooth_l1":
        if beta == 0.0:
            return torch.sign(diff) / dim, None
        return torch.where(diff.abs() < beta, diff / beta, torch.sign(diff)) / dim, None
    # cosine: c = <a, b> / (na' nb'), na' = max(|a|, eps). As in F.cosine_similarity the clamp
    # is constant for autograd but the norm is not: dc/da = b / (na' nb') - c a / (na' |a|),
    # the second term dropped where |a| = 0.
    na, nb = a.norm(dim=-1, keepdim=True), b.norm(dim=-1, keepdim=True)
    na_c, nb_c = na.clamp_min(COSINE_EPS), nb.clamp_min(COSINE_EPS)
    cos = (a * b).sum(-1, keepdim=True) / (na_c * nb_c)
    inv_na = torch.where(na > 0, 1.0 / (na_c * na), torch.zeros_like(na))
    inv_nb = torch.where(nb > 0, 1.0 / (nb_c * nb), torch.zeros_like(nb))
    return cos * a * inv_na - b / (na_c * nb_c), cos * b * inv_nb - a / (na_c * nb_c)
