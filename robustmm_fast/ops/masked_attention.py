"""masked_cross_attention: attention over the concatenated keys of M modality segments that skips
the segments of absent modalities, flash-style.

    keep[b, j] = present[b, segment(j)] and not key_padding_mask[b, j]     (and j <= i if causal)
    out[b,h,i] = sum_j softmax_j(scale q.k_j | keep) (dropout) v_j,   0 for a row with no key kept
    lse[b,h,i] = log sum_{kept j} exp(scale q.k_j)                      (-inf for such a row)

Backward (P = softmax with dropout Z/(1-p), dO the upstream gradient, D_i = sum_d dO_i O_i):

    dV = P^T dO,   dP = dO V^T,   dS = P_nodrop * (dP * Z/(1-p) - D),   dQ = scale dS K,
    dK = scale dS^T Q

Two custom ops carry it, each taking the backend chosen at the forward (one autograd.Function
calls them, ops/_autograd.py): ``robustmm::masked_attention_forward`` -> (out, lse) and
``robustmm::masked_attention_backward`` -> (dq, dk, dv), which recomputes the scores from q, k
and the saved lse instead of storing them. The kernels receive the per-sample key mask
(B, Lk) and skip key tiles with no key kept; dropout is regenerated from (seed, element index)
with the Philox stream of reference/philox.philox_uniform.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from .. import _backend
from ..reference import masked_attention as _ref
from ._autograd import autocast_inputs, autocast_off, fused_function, register_folded_vmap
from ._checks import check_float_tensor, check_same_dtype_device, check_tensor
from ._random import check_not_capturing, draw_seed, zero_seed

__all__ = ["masked_cross_attention"]

OP = "masked_attention"
# No CUDA C++ kernel (it could not be run and tested without a GPU): CUDA tensors go to Triton.
IMPLEMENTED = ("reference", "cpp", "triton")


class _ReferenceKernel:
    """The reference backend: materialized scores, the closed-form backward."""

    @staticmethod
    def masked_attention_forward(q, k, v, key_keep, is_causal, dropout_p, scale, seed):
        with torch.no_grad():
            return _ref.attention_rows(q, k, v, key_keep, is_causal, dropout_p, scale, int(seed))

    @staticmethod
    def masked_attention_backward(grad_out, q, k, v, out, lse, key_keep, is_causal, dropout_p,
                                  scale, seed):
        return _ref.attention_rows_backward(grad_out, q, k, v, key_keep, is_causal, dropout_p,
                                            scale, int(seed))


def _kernel(backend: str):
    if backend == "cpp":
        return torch.ops.robustmm_C
    if backend == "triton":
        from ..kernels import masked_attention
        return masked_attention
    return _ReferenceKernel


# ---- custom ops: the kernels of the backend chosen at the forward ----

@torch.library.custom_op("robustmm::masked_attention_forward", mutates_args=())
def masked_attention_forward(backend: str, q: Tensor, k: Tensor, v: Tensor,
                             key_keep: Optional[Tensor], is_causal: bool, dropout_p: float,
                             scale: float, seed: Tensor) -> tuple[Tensor, Tensor]:
    """(out (B, H, Lq, d) in q's dtype, lse (B, H, Lq) float32/float64). seed: CPU int64."""
    _backend.record(OP, backend)
    return _kernel(backend).masked_attention_forward(q, k, v, key_keep, is_causal, dropout_p,
                                                     scale, int(seed))


@masked_attention_forward.register_fake
def _(backend, q, k, v, key_keep, is_causal, dropout_p, scale, seed):
    return torch.empty_like(q), q.new_empty(q.shape[:-1], dtype=_ref.acc_dtype(q.dtype))


@torch.library.custom_op("robustmm::masked_attention_backward", mutates_args=())
def masked_attention_backward(backend: str, grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor,
                              out: Tensor, lse: Tensor, key_keep: Optional[Tensor],
                              is_causal: bool, dropout_p: float, scale: float,
                              seed: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) like q, k, v."""
    _backend.record(OP, backend, backward=True)
    return tuple(_kernel(backend).masked_attention_backward(
        grad_out, q, k, v, out, lse, key_keep, is_causal, dropout_p, scale, int(seed)))


@masked_attention_backward.register_fake
def _(backend, grad_out, q, k, v, out, lse, key_keep, is_causal, dropout_p, scale, seed):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


# ---- autograd ----

def _setup_context(ctx, inputs, output):
    q, k, v, key_keep, is_causal, dropout_p, scale, seed = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, key_keep, seed)
    ctx.is_causal, ctx.dropout_p, ctx.scale = is_causal, dropout_p, scale
    ctx.mark_non_differentiable(lse)


def _backward(ctx, backward_op, grad_out, _grad_lse):
    q, k, v, out, lse, key_keep, seed = ctx.saved_tensors
    if grad_out is None:
        return (None,) * 8
    dq, dk, dv = backward_op(grad_out.contiguous(), q, k, v, out, lse, key_keep, ctx.is_causal,
                             ctx.dropout_p, ctx.scale, seed)
    need = ctx.needs_input_grad  # [0] is the backend
    return (dq if need[1] else None, dk if need[2] else None, dv if need[3] else None,
            None, None, None, None, None)


# the vmapped dim folds into B: (V, B, H, L, d) -> (V B, H, L, d), key_keep (V B, Lk)
register_folded_vmap(masked_attention_forward, "-bbbb---s", "bb",
                     random=lambda *args: args[6] > 0.0)
register_folded_vmap(masked_attention_backward, "-bbbbbbb---s", "bbb")
_MaskedAttention = fused_function("MaskedAttention", masked_attention_forward,
                                  masked_attention_backward, _setup_context, _backward)


def _check_inputs(q, k, v, present, key_lengths, key_padding_mask, dropout_p, scale):
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_float_tensor(t, name)
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape (B, H, L, d) (4 dims), got {tuple(t.shape)}")
    check_same_dtype_device(k, "k", q, "q")
    check_same_dtype_device(v, "v", q, "q")
    B, H, _, d = q.shape
    if k.shape[0] != B or k.shape[1] != H or k.shape[3] != d:
        raise ValueError(f"k must have shape (B={B}, H={H}, Lk, d={d}) to match q "
                         f"{tuple(q.shape)}, got {tuple(k.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"v must have the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    Lk = k.shape[2]
    if present is not None:
        check_tensor(present, "present")
        if present.dtype != torch.bool:
            raise TypeError(f"present must be a bool tensor (True = available), got {present.dtype}")
        if present.device != q.device:
            raise ValueError(f"present and q must be on the same device, got {present.device} and {q.device}")
        if key_lengths is None:
            raise ValueError("present needs key_lengths (the M segment lengths of the keys)")
        if present.dim() != 2 or present.shape[0] != B:
            raise ValueError(f"present must have shape (B={B}, M), got {tuple(present.shape)}")
    if key_lengths is not None:
        lengths = list(key_lengths) if not isinstance(key_lengths, Tensor) else key_lengths.tolist()
        if any(isinstance(n, bool) or not isinstance(n, int) or n < 0 for n in lengths):
            raise ValueError(f"key_lengths must be non-negative ints, got {lengths}")
        if sum(lengths) != Lk:
            raise ValueError(f"key_lengths must sum to Lk = {Lk} (k.shape[2]), got {lengths} "
                             f"(sum {sum(lengths)})")
        if present is not None and len(lengths) != present.shape[1]:
            raise ValueError(f"key_lengths has {len(lengths)} segments but present has "
                             f"M = {present.shape[1]} columns")
        key_lengths = lengths
    if key_padding_mask is not None:
        check_tensor(key_padding_mask, "key_padding_mask")
        if key_padding_mask.dtype != torch.bool:
            raise TypeError(f"key_padding_mask must be a bool tensor (True = padding), got "
                            f"{key_padding_mask.dtype}")
        if key_padding_mask.shape != (B, Lk):
            raise ValueError(f"key_padding_mask must have shape (B={B}, Lk={Lk}), got "
                             f"{tuple(key_padding_mask.shape)}")
        if key_padding_mask.device != q.device:
            raise ValueError(f"key_padding_mask and q must be on the same device, got "
                             f"{key_padding_mask.device} and {q.device}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) \
            or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be a float in [0, 1), got {dropout_p!r}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                              or not math.isfinite(scale)):
        raise ValueError(f"scale must be a finite float or None, got {scale!r}")
    return key_lengths


def masked_cross_attention(q: Tensor, k: Tensor, v: Tensor, *, present: Optional[Tensor] = None,
                           key_lengths: Optional[Sequence[int]] = None,
                           key_padding_mask: Optional[Tensor] = None, is_causal: bool = False,
                           dropout_p: float = 0.0, scale: Optional[float] = None,
                           generator: Optional[torch.Generator] = None) -> Tensor:
    """Attention of q over keys made of M modality segments, skipping absent modalities.

    Args:
        q: ``(B, H, Lq, d)``; k, v: ``(B, H, Lk, d)``, one dtype and device.
        present: ``(B, M)`` bool, True = modality available; sample b attends only to the key
            segments of its present modalities. Needs `key_lengths`.
        key_lengths: M ints summing to Lk: the segment lengths, in key order.
        key_padding_mask: ``(B, Lk)`` bool, True = padding to ignore (nn.MultiheadAttention's).
        is_causal: key j only for queries i >= j (top-left aligned, as SDPA).
        dropout_p: attention dropout in [0, 1); the mask is regenerated in backward from a
            seed drawn from torch's generator (``generator`` or the default CPU one).
        scale: defaults to d^-1/2.

    Returns:
        ``(B, H, Lq, d)`` like q; rows with no key left are 0 (gradients 0), never NaN.

    Under ``torch.autocast`` q, k and v are cast to the autocast dtype first (as for SDPA);
    float64 ones stay float64. The backend is chosen here, once: the backward runs on it too.
    """
    device = q.device.type
    if torch.is_autocast_enabled(device):
        q, k, v = autocast_inputs(device, q, k, v)
        with autocast_off(device):
            return _masked_cross_attention(q, k, v, present, key_lengths, key_padding_mask,
                                           is_causal, dropout_p, scale, generator)
    return _masked_cross_attention(q, k, v, present, key_lengths, key_padding_mask, is_causal,
                                   dropout_p, scale, generator)


def _masked_cross_attention(q, k, v, present, key_lengths, key_padding_mask, is_causal,
                            dropout_p, scale, generator):
    """masked_cross_attention after autocast's casts."""
    key_lengths = _check_inputs(q, k, v, present, key_lengths, key_padding_mask, dropout_p, scale)
    if not isinstance(is_causal, bool):
        raise TypeError(f"is_causal must be a bool, got {type(is_causal).__name__}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
    keep = _ref.key_keep_mask(q.shape[0], k.shape[2], present, key_lengths, key_padding_mask,
                              q.device)
    if dropout_p > 0.0:
        check_not_capturing(q.device, "masked_cross_attention", "attention dropout",
                            "Set dropout_p=0 inside the captured region (e.g. model.eval()), or "
                            "run it outside the capture.")
        seed = draw_seed(generator)
    else:
        seed = zero_seed()
    backend = _backend.choose(OP, q.device.type, q.dtype, IMPLEMENTED)
    out, _ = _MaskedAttention.apply(
        backend, q.contiguous(), k.contiguous(), v.contiguous(),
        None if keep is None else keep.contiguous(), is_causal, float(dropout_p), scale, seed)
    return out
