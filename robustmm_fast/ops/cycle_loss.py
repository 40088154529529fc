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

The reduction (mean over included rows, sum, none) and the weights act on the (2, rows) terms
in plain autograd, so the backward op always receives a per-row upstream gradient. In eager
mode on the C++ backend (float32/float64) the backward scales the derivative buffers in place
(``robustmm_C::cycle_loss_scale_``) and hands them on as the gradients.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .. import _backend
from ..reference import cycle_loss as _ref
from ._checks import check_choice, check_float_tensor, check_like, check_tensor
from ._eager import eager_fast_path

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


# ---- the op's two halves, shared by the custom ops and the eager fast path ----

def _forward_impl(forward_pred, target, cycle_pred, source, mask, distance, beta, need_grad):
    kernel = _kernel(_backend.resolve(OP, forward_pred.device))
    return kernel.cycle_loss_forward(forward_pred, target, cycle_pred, source, mask, distance,
                                     beta, need_grad)


def _backward_impl(grad_terms, grad_forward, grad_target, grad_cycle, grad_source, mask, distance,
                   need_grad, dtype):
    kernel = _kernel(_backend.resolve(OP, grad_forward.device))
    return kernel.cycle_loss_backward(grad_terms, grad_forward, grad_target, grad_cycle,
                                      grad_source, mask, distance, need_grad, dtype)


def _need_bits(need) -> int:
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


def _backward(ctx, grad_terms, *_unused):
    need_grad = _need_bits(ctx.needs_input_grad)
    if grad_terms is None or not need_grad:
        return (None,) * 8
    *grads, mask = ctx.saved_tensors
    if not ctx.need_grad:
        grads = cycle_loss_forward(*ctx.inputs, mask, ctx.distance, ctx.beta, True)[1:]
    grads = cycle_loss_backward(grad_terms.contiguous(), *grads, mask, ctx.distance, need_grad,
                                ctx.dtype)
    return (*(g if ctx.needs_input_grad[i] else None for i, g in enumerate(grads)),
            None, None, None, None)


# ---- custom ops ----

@torch.library.custom_op("robustmm::cycle_loss_forward", mutates_args=())
def cycle_loss_forward(forward_pred: Tensor, target: Tensor, cycle_pred: Tensor, source: Tensor,
                       mask: Optional[Tensor], distance: int, beta: float,
                       need_grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(terms, grad_forward, grad_target, grad_cycle, grad_source).

    terms: (2, ...) per-row forward and cycle distances (float32; float64 for float64), 0 at
    excluded rows. grad_*: each row distance's derivative with respect to that input, same
    dtype, 0 at excluded rows; numel 0 when need_grad is False, and grad_target / grad_source
    numel 0 for the symmetric distances (their derivative is -grad_forward / -grad_cycle).
    """
    return _forward_impl(forward_pred, target, cycle_pred, source, mask, distance, beta, need_grad)


@cycle_loss_forward.register_fake
def _(forward_pred, target, cycle_pred, source, mask, distance, beta, need_grad):
    acc = _ref.acc_dtype(forward_pred.dtype)
    terms = forward_pred.new_empty((2, *forward_pred.shape[:-1]), dtype=acc)
    full = lambda: forward_pred.new_empty(forward_pred.shape, dtype=acc)  # noqa: E731
    empty = lambda: forward_pred.new_empty(0, dtype=acc)  # noqa: E731
    if not need_grad:
        return terms, empty(), empty(), empty(), empty()
    both = distance == COSINE
    return terms, full(), full() if both else empty(), full(), full() if both else empty()


@torch.library.custom_op("robustmm::cycle_loss_backward", mutates_args=())
def cycle_loss_backward(grad_terms: Tensor, grad_forward: Tensor, grad_target: Tensor,
                        grad_cycle: Tensor, grad_source: Tensor, mask: Optional[Tensor],
                        distance: int, need_grad: int,
                        dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(d forward_pred, d target, d cycle_pred, d source) in `dtype`: grad_terms[k, r] times the
    stored derivatives of row r (k = 0 forward, 1 cycle). An input whose need_grad bit (1, 2,
    4, 8 in that order) is clear gets a numel-0 tensor."""
    return _backward_impl(grad_terms, grad_forward, grad_target, grad_cycle, grad_source, mask,
                          distance, need_grad, dtype)


@cycle_loss_backward.register_fake
def _(grad_terms, grad_forward, grad_target, grad_cycle, grad_source, mask, distance, need_grad,
      dtype):
    shape = grad_forward.shape
    return tuple(grad_forward.new_empty(shape if need_grad & bit else (0,), dtype=dtype)
                 for bit in (NEED_FORWARD_PRED, NEED_TARGET, NEED_CYCLE_PRED, NEED_SOURCE))


cycle_loss_forward.register_autograd(_backward, setup_context=_setup_context)


# ---- eager fast path ----

def _scale_in_place(grad_terms, grads, mask, distance, need_grad):
    """The C++ backward in place (float32/float64): the forward's derivative buffers become the
    gradients, so only a symmetric distance's second gradient is allocated."""
    buffers = list(grads)
    outs: list[Optional[Tensor]] = [None] * 4
    for first, second in ((0, 1), (2, 3)):
        want_first, want_second = need_grad >> first & 1, need_grad >> second & 1
        if distance == COSINE:
            outs[first] = buffers[first] if want_first else None
            outs[second] = buffers[second] if want_second else None
        elif want_first and want_second:
            buffers[second] = torch.empty_like(buffers[first])
            outs[first], outs[second] = buffers[first], buffers[second]
        elif want_first:
            outs[first] = buffers[first]
        elif want_second:  # the kernel negates the first buffer in place
            outs[second] = buffers[first]
    torch.ops.robustmm_C.cycle_loss_scale_(grad_terms, *buffers, mask, distance, need_grad)
    return outs


class _EagerCycleLoss(torch.autograd.Function):
    """The custom ops' forward and backward without their dispatch (about 0.1 ms a call), for
    plain tensors in eager mode; under torch.compile, fake tensors, functorch transforms or
    tensor subclasses the custom ops run instead (see ops/_eager.py).

    The derivative buffers are kept on ctx, not saved as outputs, so that the backward can hand
    them on as the gradients after scaling them in place (C++ backend, float32/float64): no
    gradient-sized tensor is allocated for them again. A second backward through the same graph
    (retain_graph=True) finds them gone and recomputes them from the saved inputs."""

    @staticmethod
    def forward(ctx, forward_pred, target, cycle_pred, source, mask, distance, beta, need_grad):
        terms, *grads = _forward_impl(forward_pred, target, cycle_pred, source, mask, distance,
                                      beta, need_grad)
        ctx.save_for_backward(forward_pred, target, cycle_pred, source)
        ctx.grads, ctx.mask, ctx.distance, ctx.beta = grads, mask, distance, beta
        ctx.numel, ctx.dtype = forward_pred.numel(), forward_pred.dtype
        return terms

    @staticmethod
    @once_differentiable  # no double backward: say so instead of returning zeros
    def backward(ctx, grad_terms):
        need = ctx.needs_input_grad
        need_grad = _need_bits(need)
        if not need_grad:
            return (None,) * 8
        grads, ctx.grads = ctx.grads, None
        if grads is None or grads[0].numel() != ctx.numel:  # handed out earlier, or never made
            grads = _forward_impl(*ctx.saved_tensors, ctx.mask, ctx.distance, ctx.beta, True)[1:]
        grad_terms = grad_terms.contiguous()
        backend = _backend.resolve(OP, grads[0].device)
        if backend == "cpp" and ctx.dtype in (torch.float32, torch.float64):
            outs = _scale_in_place(grad_terms, grads, ctx.mask, ctx.distance, need_grad)
        else:
            outs = _kernel(backend).cycle_loss_backward(grad_terms, *grads, ctx.mask,
                                                        ctx.distance, need_grad, ctx.dtype)
        return (*(g if need[i] else None for i, g in enumerate(outs)), None, None, None, None)


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
    """
    check_float_tensor(forward_pred, "forward_pred")
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
    args = (*inputs, mask, code, beta, need_grad)
    if eager_fast_path(*inputs, mask):
        terms = _EagerCycleLoss.apply(*args)
    else:
        terms = cycle_loss_forward(*args)[0]
    terms = _ref.reduce_terms(terms, mask, reduction)
    loss = (forward_weight * terms[0] + cycle_weight * terms[1]).to(forward_pred.dtype)
    if not return_terms:
        return loss
    detached = terms.detach().to(forward_pred.dtype)
    return loss, detached[0], detached[1]
