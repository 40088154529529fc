"""cycle_reconstruction_loss: every modality pair's forward and cycle reconstruction terms, and
all four input gradients, in one pass.

For each row r (the leading dims, a pair dimension included) and a row distance d:

    F_r = d(forward_pred_r, target_r),   C_r = d(cycle_pred_r, source_r)
    loss = forward_weight * reduce(F) + cycle_weight * reduce(C)

    mse        d = 1/D sum_i (a_i - b_i)^2                dd/da_i = 2 (a_i - b_i) / D
    l1         d = 1/D sum_i |a_i - b_i|                  dd/da_i = sign(a_i - b_i) / D
    smooth_l1  d = 1/D sum_i huber_beta(a_i - b_i)        dd/da_i = clamp((a_i - b_i) / beta, -1, 1) / D
    cosine     d = 1 - c,  c = <a, b> / (a' b'),  a' = max(|a|, 1e-8)
               dd/da = c a / (a' |a|) - b / (a' b')       (the first term 0 when |a| = 0)

For the first three dd/db = -dd/da. Two custom ops carry it:

- ``robustmm::cycle_loss_forward`` reads the four tensors once and writes the per-row terms
  (2, ...) and, when a gradient is wanted, each row distance's derivative with respect to each
  input (float32; float64 for float64). The symmetric distances store one derivative per pair.
- ``robustmm::cycle_loss_backward`` scales them by the upstream gradient of each row's term:
  grad_input[r, :] = grad_terms[k, r] * G[r, :]. No other intermediate tensor exists.

Both take the backend chosen at the forward; one autograd.Function calls them
(ops/_autograd.py). The reduction (mean over included rows, sum, none) and the weights act on
the (2, rows) terms in plain autograd, so the backward op always receives a per-row upstream
gradient.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .. import _backend
from ..reference import cycle_loss as _ref
from ._autograd import autocast_inputs, autocast_off, fused_function, register_folded_vmap
from ._checks import check_choice, check_float_tensor, check_like, check_tensor

__all__ = ["cycle_reconstruction_loss", "DISTANCE_CODES"]

OP = "cycle_loss"
DISTANCE_CODES = {"mse": 0, "l1": 1, "smooth_l1": 2, "cosine": 3}
COSINE = DISTANCE_CODES["cosine"]
# need_grad bits of the backward op, in input order
NEED_FORWARD_PRED, NEED_TARGET, NEED_CYCLE_PRED, NEED_SOURCE = 1, 2, 4, 8


# ---- the reference backend, with the C++ op's signature ----

class _ReferenceKernel:
    """The reference backend: the closed-form derivatives of reference/cycle_loss.py."""

    @staticmethod
    def cycle_loss_forward(forward_pred, target, cycle_pred, source, mask, distance, beta, need_grad):
        name = _ref.DISTANCES[distance]
        acc = _ref.acc_dtype(forward_pred.dtype)
        with torch.no_grad():
            terms = _ref.row_terms(forward_pred, target, cycle_pred, source, mask, name, beta)
            if not need_grad:
                empty = forward_pred.new_empty(0, dtype=acc)
                return terms, empty, empty.clone(), empty.clone(), empty.clone()
            keep = None if mask is None else mask.unsqueeze(-1)

            def clean(t):
                t = t.to(acc)
                return t if keep is None else torch.where(keep, t, torch.zeros((), dtype=acc))

            grads = []
            for a, b in ((forward_pred, target), (cycle_pred, source)):
                ga, gb = _ref.distance_grads(clean(a), clean(b), name, beta)
                if keep is not None:
                    ga = torch.where(keep, ga, torch.zeros((), dtype=acc))
                    gb = None if gb is None else torch.where(keep, gb, torch.zeros((), dtype=acc))
                grads += [ga, forward_pred.new_empty(0, dtype=acc) if gb is None else gb]
        return (terms, *grads)

    @staticmethod
    def cycle_loss_backward(grad_terms, grad_forward, grad_target, grad_cycle, grad_source, mask,
                            distance, need_grad, dtype):
        outs = []
        for bit, k, g, g_other, sign in (
                (NEED_FORWARD_PRED, 0, grad_forward, None, 1.0),
                (NEED_TARGET, 0, grad_target, grad_forward, -1.0),
                (NEED_CYCLE_PRED, 1, grad_cycle, None, 1.0),
                (NEED_SOURCE, 1, grad_source, grad_cycle, -1.0)):
            if not need_grad & bit:
                outs.append(grad_forward.new_empty(0, dtype=dtype))
                continue
            if distance != COSINE and g_other is not None:
                g = g_other * sign  # symmetric distances: d/db = -d/da
            scale = grad_terms[k].unsqueeze(-1)
            if mask is not None:
                scale = torch.where(mask.unsqueeze(-1), scale, torch.zeros((), dtype=scale.dtype))
            outs.append((g * scale).to(dtype))
        return tuple(outs)


def _kernel(backend: str):
    if backend in ("cpp", "cuda"):
        return torch.ops.robustmm_C  # CPU and CUDA kernels registered by device
    if backend == "triton":
        from ..kernels import cycle_loss
        return cycle_loss
    return _ReferenceKernel


# ---- custom ops: the kernels of the backend chosen at the forward ----

@torch.library.custom_op("robustmm::cycle_loss_forward", mutates_args=())
def cycle_loss_forward(backend: str, forward_pred: Tensor, target: Tensor, cycle_pred: Tensor,
                       source: Tensor, mask: Optional[Tensor], distance: int, beta: float,
                       need_grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(terms, grad_forward, grad_target, grad_cycle, grad_source).

    terms: (2, ...) per-row forward and cycle distances (float32; float64 for float64), 0 at
    excluded rows. grad_*: each row distance's derivative with respect to that input, same
    dtype, 0 at excluded rows; numel 0 when need_grad is False, and grad_target / grad_source
    numel 0 for the symmetric distances (their derivative is -grad_forward / -grad_cycle).
    """
    _backend.record(OP, backend)
    return _kernel(backend).cycle_loss_forward(forward_pred, target, cycle_pred, source, mask,
                                               distance, beta, need_grad)


@cycle_loss_forward.register_fake
def _(backend, forward_pred, target, cycle_pred, source, mask, distance, beta, need_grad):
    acc = _ref.acc_dtype(forward_pred.dtype)
    terms = forward_pred.new_empty((2, *forward_pred.shape[:-1]), dtype=acc)
    full = lambda: forward_pred.new_empty(forward_pred.shape, dtype=acc)  # noqa: E731
    empty = lambda: forward_pred.new_empty(0, dtype=acc)  # noqa: E731
    if not need_grad:
        return terms, empty(), empty(), empty(), empty()
    both = distance == COSINE
    return terms, full(), full() if both else empty(), full(), full() if both else empty()


@torch.library.custom_op("robustmm::cycle_loss_backward", mutates_args=())
def cycle_loss_backward(backend: str, grad_terms: Tensor, grad_forward: Tensor,
                        grad_target: Tensor, grad_cycle: Tensor, grad_source: Tensor,
                        mask: Optional[Tensor], distance: int, need_grad: int,
                        dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(d forward_pred, d target, d cycle_pred, d source) in `dtype`: grad_terms[k, r] times the
    stored derivatives of row r (k = 0 forward, 1 cycle). An input whose need_grad bit (1, 2,
    4, 8 in that order) is clear gets a numel-0 tensor."""
    _backend.record(OP, backend, backward=True)
    return tuple(_kernel(backend).cycle_loss_backward(grad_terms, grad_forward, grad_target,
                                                      grad_cycle, grad_source, mask, distance,
                                                      need_grad, dtype))


@cycle_loss_backward.register_fake
def _(backend, grad_terms, grad_forward, grad_target, grad_cycle, grad_source, mask, distance,
      need_grad, dtype):
    shape = grad_forward.shape
    return tuple(grad_forward.new_empty(shape if need_grad & bit else (0,), dtype=dtype)
                 for bit in (NEED_FORWARD_PRED, NEED_TARGET, NEED_CYCLE_PRED, NEED_SOURCE))


# ---- autograd ----

def _need_bits(need) -> int:
    """need_grad bits from needs_input_grad of (forward_pred, target, cycle_pred, source)."""
    return ((NEED_FORWARD_PRED if need[0] else 0) | (NEED_TARGET if need[1] else 0)
            | (NEED_CYCLE_PRED if need[2] else 0) | (NEED_SOURCE if need[3] else 0))


def _setup_context(ctx, inputs, output):
    forward_pred, target, cycle_pred, source, mask, distance, beta, need_grad = inputs
    ctx.save_for_backward(*output[1:], mask)
    if not need_grad:  # no derivatives were computed: the backward recomputes them
        ctx.inputs = (forward_pred, target, cycle_pred, source)
    ctx.distance, ctx.beta, ctx.need_grad = distance, beta, need_grad
    ctx.dtype = forward_pred.dtype
    ctx.mark_non_differentiable(*output[1:])


def _backward(ctx, backward_op, grad_terms, *_unused):
    need = ctx.needs_input_grad[1:5]  # [0] is the backend
    need_grad = _need_bits(need)
    if grad_terms is None or not need_grad:
        return (None,) * 8
    *grads, mask = ctx.saved_tensors
    if not ctx.need_grad:
        grads = _FORWARD(ctx.backend, *ctx.inputs, mask, ctx.distance, ctx.beta, True)[1:]
    grads = backward_op(grad_terms.contiguous(), *grads, mask, ctx.distance, need_grad,
                        ctx.dtype)
    return (*(g if need[i] else None for i, g in enumerate(grads)), None, None, None, None)


_FORWARD = torch.ops.robustmm.cycle_loss_forward.default
# the vmapped dim is one more leading (row) dim; in the (2, ...) terms it is dim 1
register_folded_vmap(cycle_loss_forward, "-rrrrr---", "trrrr")
register_folded_vmap(cycle_loss_backward, "-trrrrr---", "rrrr")
_CycleLoss = fused_function("CycleLoss", cycle_loss_forward, cycle_loss_backward, _setup_context,
                            _backward)


# ---- public entry point ----

def _check_weight(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be finite and >= 0, got {value}")
    return float(value)


def _row_mask(mask, ref: Tensor) -> Tensor:
    """A bool mask broadcastable to the leading dims of `ref`, expanded to them."""
    check_tensor(mask, "mask")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor (True = include), got {mask.dtype}")
    if mask.device != ref.device:
        raise ValueError(f"mask and forward_pred must be on the same device, got {mask.device} "
                         f"and {ref.device}")
    lead = ref.shape[:-1]
    if mask.shape == lead:
        return mask.contiguous()
    try:
        ok = torch.broadcast_shapes(mask.shape, lead) == lead
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(f"mask must have shape {tuple(lead)} (the leading dims of forward_pred) "
                         f"or broadcast to it, got {tuple(mask.shape)}")
    return mask.expand(lead).contiguous()


def cycle_reconstruction_loss(forward_pred: Tensor, target: Tensor, cycle_pred: Tensor,
                              source: Tensor, *, mask: Optional[Tensor] = None,
                              distance: str = "mse", forward_weight: float = 1.0,
                              cycle_weight: float = 1.0, reduction: str = "mean",
                              return_terms: bool = False, beta: float = 1.0):
    """Forward and cycle reconstruction loss of translated latents, fused.

    Args:
        forward_pred: ``(..., D)`` the forward translation G_{m->n}(z_m).
        target: ``(..., D)`` the target latent z_n.
        cycle_pred: ``(..., D)`` the cycle translation G_{n->m}(forward_pred).
        source: ``(..., D)`` the source latent z_m. All four share shape, dtype and device;
            a leading pair dimension ``(P, ..., D)`` lets one call cover every modality pair.
        mask: bool over the leading dims (or broadcastable to them), True = include. Excluded
            rows add 0 and get zero gradients whatever they hold (NaN included).
        distance: ``mse``, ``l1``, ``smooth_l1`` or ``cosine``; each row's distance is the
            mean over D (1 - cosine similarity for ``cosine``).
        forward_weight, cycle_weight: finite, >= 0.
        reduction: ``mean`` (over the included rows of all pairs; 0 when none is), ``sum`` or
            ``none`` (the leading shape; excluded rows 0).
        return_terms: also return the unweighted forward and cycle terms, reduced the same
            way and detached.
        beta: smooth_l1's threshold between the quadratic and linear parts, >= 0 (0 = l1).

    Returns:
        ``loss`` in the inputs' dtype (accumulated in float32/float64), or
        ``(loss, forward_term, cycle_term)`` with ``return_terms=True``.

    Under ``torch.autocast`` the four inputs are cast to the autocast dtype first (as for
    SDPA), so float32 targets go with bfloat16 predictions; float64 ones stay float64.
    """
    check_float_tensor(forward_pred, "forward_pred")
    device = forward_pred.device.type
    if torch.is_autocast_enabled(device):
        forward_pred, target, cycle_pred, source = autocast_inputs(
            device, forward_pred, target, cycle_pred, source)
        with autocast_off(device):
            return _cycle_reconstruction_loss(forward_pred, target, cycle_pred, source, mask,
                                              distance, forward_weight, cycle_weight, reduction,
                                              return_terms, beta)
    return _cycle_reconstruction_loss(forward_pred, target, cycle_pred, source, mask, distance,
                                      forward_weight, cycle_weight, reduction, return_terms, beta)


def _cycle_reconstruction_loss(forward_pred, target, cycle_pred, source, mask, distance,
                               forward_weight, cycle_weight, reduction, return_terms, beta):
    """cycle_reconstruction_loss after autocast's casts."""
    for name, t in (("target", target), ("cycle_pred", cycle_pred), ("source", source)):
        check_like(t, name, forward_pred, "forward_pred")
    if forward_pred.dim() < 1 or forward_pred.shape[-1] == 0:
        raise ValueError(f"forward_pred must have shape (..., D) with D > 0, got "
                         f"{tuple(forward_pred.shape)}")
    check_choice(distance, "distance", _ref.DISTANCES)
    check_choice(reduction, "reduction", _ref.REDUCTIONS)
    forward_weight = _check_weight(forward_weight, "forward_weight")
    cycle_weight = _check_weight(cycle_weight, "cycle_weight")
    beta = _check_weight(beta, "beta")
    if not isinstance(return_terms, bool):
        raise TypeError(f"return_terms must be a bool, got {type(return_terms).__name__}")
    if mask is not None:
        mask = _row_mask(mask, forward_pred)

    inputs = (forward_pred.contiguous(), target.contiguous(), cycle_pred.contiguous(),
              source.contiguous())
    need_grad = torch.is_grad_enabled() and any(t.requires_grad for t in inputs)
    # smooth_l1 with beta 0 is l1 (as in torch), so kernels may divide by beta
    code = DISTANCE_CODES["l1" if distance == "smooth_l1" and beta == 0.0 else distance]
    backend = _backend.choose(OP, forward_pred.device.type, forward_pred.dtype)
    terms = _CycleLoss.apply(backend, *inputs, mask, code, beta, need_grad)[0]
    terms = _ref.reduce_terms(terms, mask, reduction)
    loss = (forward_weight * terms[0] + cycle_weight * terms[1]).to(forward_pred.dtype)
    if not return_terms:
        return loss
    detached = terms.detach().to(forward_pred.dtype)
    return loss, detached[0], detached[1]
