"""cycle_reconstruction_loss: every modality pair's forward and cycle reconstruction terms in one
pass, and all four input gradients in one pass.

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
  (2, ...) (float32; float64 for float64), and nothing else.
- ``robustmm::cycle_loss_backward`` reads the four inputs again (saved by the forward), recomputes
  each row's derivatives and writes the gradients directly:
  grad_input[r, :] = grad_terms[k, r] * dd/dinput of row r (k = 0 forward, 1 cycle). mse, l1 and
  smooth_l1 are elementwise (one derivative gives both +g and -g); cosine first reduces the row
  (dot and norms), then writes. Only the gradients asked for are computed.

No tensor of the inputs' size is kept from the forward to the backward beyond the inputs
themselves. Both ops take the backend chosen at the forward; one autograd.Function calls them
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
# need_grad bits of the backward op, in input order
NEED_FORWARD_PRED, NEED_TARGET, NEED_CYCLE_PRED, NEED_SOURCE = 1, 2, 4, 8
_NEED_BITS = (NEED_FORWARD_PRED, NEED_TARGET, NEED_CYCLE_PRED, NEED_SOURCE)


# ---- the reference backend, with the C++ op's signature ----

class _ReferenceKernel:
    """The reference backend: the closed-form derivatives of reference/cycle_loss.py."""

    @staticmethod
    def cycle_loss_forward(forward_pred, target, cycle_pred, source, mask, distance, beta):
        with torch.no_grad():
            return _ref.row_terms(forward_pred, target, cycle_pred, source, mask,
                                  _ref.DISTANCES[distance], beta)

    @staticmethod
    def cycle_loss_backward(grad_terms, forward_pred, target, cycle_pred, source, mask, distance,
                            beta, need_grad):
        name = _ref.DISTANCES[distance]
        dtype, acc = forward_pred.dtype, _ref.acc_dtype(forward_pred.dtype)
        keep = None if mask is None else mask.unsqueeze(-1)
        zero = torch.zeros((), dtype=acc, device=forward_pred.device)

        def clean(t):  # excluded rows (NaN allowed there) replaced before any arithmetic
            t = t.to(acc)
            return t if keep is None else torch.where(keep, t, zero)

        outs = [forward_pred.new_empty(0) for _ in _NEED_BITS]
        with torch.no_grad():
            for k, (a, b) in enumerate(((forward_pred, target), (cycle_pred, source))):
                wanted = [bool(need_grad & bit) for bit in _NEED_BITS[2 * k:2 * k + 2]]
                if not any(wanted):
                    continue
                ga, gb = _ref.distance_grads(clean(a), clean(b), name, beta)
                scale = grad_terms[k].unsqueeze(-1)
                for j, g in enumerate((ga, -ga if gb is None else gb)):
                    if wanted[j]:
                        g = g * scale
                        outs[2 * k + j] = (g if keep is None else torch.where(keep, g, zero)).to(dtype)
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
                       source: Tensor, mask: Optional[Tensor], distance: int,
                       beta: float) -> Tensor:
    """terms: (2, ...) per-row forward and cycle distances (float32; float64 for float64), 0 at
    excluded rows."""
    _backend.record(OP, backend)
    return _kernel(backend).cycle_loss_forward(forward_pred, target, cycle_pred, source, mask,
                                               distance, beta)


@cycle_loss_forward.register_fake
def _(backend, forward_pred, target, cycle_pred, source, mask, distance, beta):
    acc = _ref.acc_dtype(forward_pred.dtype)
    return forward_pred.new_empty((2, *forward_pred.shape[:-1]), dtype=acc)


@torch.library.custom_op("robustmm::cycle_loss_backward", mutates_args=())
def cycle_loss_backward(backend: str, grad_terms: Tensor, forward_pred: Tensor, target: Tensor,
                        cycle_pred: Tensor, source: Tensor, mask: Optional[Tensor], distance: int,
                        beta: float, need_grad: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(d forward_pred, d target, d cycle_pred, d source) in the inputs' dtype: grad_terms[k, r]
    times row r's derivatives, recomputed from the inputs (k = 0 forward, 1 cycle); 0 at
    excluded rows. An input whose need_grad bit (1, 2, 4, 8 in that order) is clear gets a
    numel-0 tensor."""
    _backend.record(OP, backend, backward=True)
    return tuple(_kernel(backend).cycle_loss_backward(grad_terms, forward_pred, target,
                                                      cycle_pred, source, mask, distance, beta,
                                                      need_grad))


@cycle_loss_backward.register_fake
def _(backend, grad_terms, forward_pred, target, cycle_pred, source, mask, distance, beta,
      need_grad):
    shape = forward_pred.shape
    return tuple(forward_pred.new_empty(shape if need_grad & bit else (0,)) for bit in _NEED_BITS)


# ---- autograd ----

def _need_bits(need) -> int:
    """need_grad bits from needs_input_grad of (forward_pred, target, cycle_pred, source)."""
    return sum(bit for bit, n in zip(_NEED_BITS, need) if n)


def _setup_context(ctx, inputs, output):
    forward_pred, target, cycle_pred, source, mask, distance, beta = inputs
    ctx.save_for_backward(forward_pred, target, cycle_pred, source, mask)
    ctx.distance, ctx.beta = distance, beta


def _backward(ctx, backward_op, grad_terms):
    need = ctx.needs_input_grad[1:5]  # [0] is the backend
    need_grad = _need_bits(need)
    if grad_terms is None or not need_grad:
        return (None,) * 7
    *inputs, mask = ctx.saved_tensors
    grads = backward_op(grad_terms.contiguous(), *inputs, mask, ctx.distance, ctx.beta, need_grad)
    return (*(g if need[i] else None for i, g in enumerate(grads)), None, None, None)


# the vmapped dim is one more leading (row) dim; in the (2, ...) terms it is dim 1
register_folded_vmap(cycle_loss_forward, "-rrrrr--", "t")
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
    # smooth_l1 with beta 0 is l1 (as in torch), so kernels may divide by beta
    code = DISTANCE_CODES["l1" if distance == "smooth_l1" and beta == 0.0 else distance]
    backend = _backend.choose(OP, forward_pred.device.type, forward_pred.dtype)
    terms = _CycleLoss.apply(backend, *inputs, mask, code, beta)
    terms = _ref.reduce_terms(terms, mask, reduction)
    loss = (forward_weight * terms[0] + cycle_weight * terms[1]).to(forward_pred.dtype)
    if not return_terms:
        return loss
    detached = terms.detach().to(forward_pred.dtype)
    return loss, detached[0], detached[1]
