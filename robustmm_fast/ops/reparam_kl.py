"""reparameterize_kl: Gaussian reparameterized sampling fused with its KL divergence.

    z  = mu + exp(logvar / 2) * eps,  eps ~ N(0, I)      (z = mu when sample=False)
    kl = KL(N(mu, e^logvar) || N(pm, e^plv)) over the last dim
       = 1/2 sum_d [ plv - lv + exp(lv - plv) + (mu - pm)^2 exp(-plv) - 1 ]
       = -1/2 sum_d (1 + lv - mu^2 - exp(lv))            (standard normal prior)

Two custom ops in the ``robustmm`` namespace carry it: ``reparam_kl_forward`` (z and per-row KL
in float32/float64) and ``reparam_kl_backward`` (all input gradients in one pass), each taking
the backend chosen at the forward; one autograd.Function calls them (ops/_autograd.py). In-kernel
eps is Philox4x32-10 keyed by a seed drawn from torch's generator; the backward regenerates it
from the saved seed, so no eps-sized tensor is kept for backward.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _backend
from ..reference import reparam_kl as _ref
from ..reference.philox import philox_randn
from ._checks import (check_broadcastable, check_choice, check_float_tensor, check_like,
                      check_row_mask)
from ._autograd import autocast_inputs, autocast_off, fused_function, register_folded_vmap
from ._random import check_not_capturing, draw_seed, zero_seed

__all__ = ["reparameterize_kl"]

OP = "reparam_kl"
NO_NOISE, GIVEN_NOISE, PHILOX_NOISE = 0, 1, 2


# ---- backends: each offers forward(...) and backward(...) with the C++ op's signature ----

class _ReferenceKernel:
    """The reference backend: the pure-PyTorch math, eps from the same Philox stream."""

    @staticmethod
    def reparam_kl_forward(mu, logvar, eps, prior_mu, prior_logvar, mask, seed, noise):
        if noise == PHILOX_NOISE:
            eps = philox_randn(seed, mu.shape, device=mu.device)
        z, kl = _ref.reparam_kl_rows(mu, logvar, eps, prior_mu, prior_logvar, mask, noise != NO_NOISE)
        return (z.clone() if z.data_ptr() == mu.data_ptr() else z), kl

    @staticmethod
    def reparam_kl_backward(grad_z, grad_kl, mu, logvar, eps, prior_mu, prior_logvar, mask, seed,
                            noise, need_grad_eps, need_grad_prior):
        need_grad_eps = need_grad_eps and eps is not None  # only a given eps has a gradient
        if noise == PHILOX_NOISE:
            eps = philox_randn(seed, mu.shape, device=mu.device)
        return _ref.reparam_kl_rows_backward(grad_z, grad_kl, mu, logvar, eps, prior_mu,
                                             prior_logvar, mask, noise != NO_NOISE,
                                             need_grad_eps, need_grad_prior)


def _kernel(backend: str):
    if backend in ("cpp", "cuda"):
        return torch.ops.robustmm_C  # one op, CPU and CUDA kernels registered by device
    if backend == "triton":
        from ..kernels import reparam_kl
        return reparam_kl
    return _ReferenceKernel


# ---- custom ops: the kernels of the chosen backend ----

@torch.library.custom_op("robustmm::reparam_kl_forward", mutates_args=())
def reparam_kl_forward(backend: str, mu: Tensor, logvar: Tensor, eps: Optional[Tensor],
                       prior_mu: Optional[Tensor], prior_logvar: Optional[Tensor],
                       mask: Optional[Tensor], seed: Tensor, noise: int) -> tuple[Tensor, Tensor]:
    """z (mu's dtype) and per-row KL (float32, float64 for float64). seed: CPU int64 scalar."""
    _backend.record(OP, backend)
    return _kernel(backend).reparam_kl_forward(mu, logvar, eps, prior_mu, prior_logvar, mask,
                                               int(seed), noise)


@reparam_kl_forward.register_fake
def _(backend, mu, logvar, eps, prior_mu, prior_logvar, mask, seed, noise):
    return torch.empty_like(mu), mu.new_empty(mu.shape[:-1], dtype=_ref.acc_dtype(mu.dtype))


@torch.library.custom_op("robustmm::reparam_kl_backward", mutates_args=())
def reparam_kl_backward(backend: str, grad_z: Tensor, grad_kl: Tensor, mu: Tensor, logvar: Tensor,
                        eps: Optional[Tensor], prior_mu: Optional[Tensor],
                        prior_logvar: Optional[Tensor], mask: Optional[Tensor], seed: Tensor,
                        noise: int, need_grad_eps: bool,
                        need_grad_prior: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dmu, dlogvar, deps, dprior_mu, dprior_logvar); the last three are empty (numel 0)
    unless asked for and the input exists."""
    _backend.record(OP, backend, backward=True)
    grads = _kernel(backend).reparam_kl_backward(grad_z, grad_kl, mu, logvar, eps, prior_mu,
                                                 prior_logvar, mask, int(seed), noise,
                                                 need_grad_eps, need_grad_prior)
    return tuple(mu.new_empty(0) if g is None else g for g in grads)


@reparam_kl_backward.register_fake
def _(backend, grad_z, grad_kl, mu, logvar, eps, prior_mu, prior_logvar, mask, seed, noise,
      need_grad_eps, need_grad_prior):
    want_eps = need_grad_eps and eps is not None
    want_prior = need_grad_prior and prior_mu is not None
    full, empty = (lambda: torch.empty_like(mu)), (lambda: mu.new_empty(0))
    return (full(), full(), full() if want_eps else empty(), full() if want_prior else empty(),
            full() if want_prior else empty())


# ---- autograd ----

def _setup_context(ctx, inputs, output):
    mu, logvar, eps, prior_mu, prior_logvar, mask, seed, noise = inputs
    ctx.save_for_backward(mu, logvar, eps, prior_mu, prior_logvar, mask, seed)
    ctx.noise = noise


def _backward(ctx, backward_op, grad_z, grad_kl):
    mu, logvar, eps, prior_mu, prior_logvar, mask, seed = ctx.saved_tensors
    need_eps = eps is not None and ctx.needs_input_grad[3]
    need_prior = prior_mu is not None and (ctx.needs_input_grad[4] or ctx.needs_input_grad[5])
    if grad_z is None:
        grad_z = torch.zeros_like(mu)
    if grad_kl is None:
        grad_kl = mu.new_zeros(mu.shape[:-1], dtype=_ref.acc_dtype(mu.dtype))
    dmu, dlogvar, deps, dpm, dplv = backward_op(
        grad_z.contiguous(), grad_kl.contiguous(), mu, logvar, eps, prior_mu, prior_logvar, mask,
        seed, ctx.noise, need_eps, need_prior)
    return (dmu, dlogvar, deps if need_eps else None, dpm if need_prior else None,
            dplv if need_prior else None, None, None, None)


# the vmapped dim is one more leading (row) dim of every operand
register_folded_vmap(reparam_kl_forward, "-rrrrrrs-", "rr", random=lambda *a: a[8] == PHILOX_NOISE)
register_folded_vmap(reparam_kl_backward, "-rrrrrrrrs---", "rrrrr")
_ReparamKL = fused_function("ReparamKL", reparam_kl_forward, reparam_kl_backward, _setup_context,
                            _backward)


# ---- public entry point ----

def _prepare_prior(prior: Optional[Tensor], mu: Tensor) -> Optional[Tensor]:
    if prior is None:
        return None
    # broadcasting happens here, in autograd, so a (D,) prior gets its gradient summed back
    return prior.expand(mu.shape).contiguous() if prior.shape != mu.shape else prior.contiguous()


def _needs_fp32_prior_grad(mu: Tensor, *priors: Optional[Tensor]) -> bool:
    return mu.dtype in (torch.float16, torch.bfloat16) and any(
        p is not None and p.requires_grad and p.shape != mu.shape for p in priors)


def reparameterize_kl(mu: Tensor, logvar: Tensor, *, eps: Optional[Tensor] = None,
                      prior_mu: Optional[Tensor] = None, prior_logvar: Optional[Tensor] = None,
                      mask: Optional[Tensor] = None, sample: bool = True, reduction: str = "none",
                      generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor]:
    """Reparameterized sample of N(mu, exp(logvar)) and its KL divergence to the prior.

    Args:
        mu, logvar: ``(..., D)`` float tensors of one dtype and device.
        eps: ``(..., D)`` noise; drawn inside the kernel (Philox, seeded from torch's generator,
            so ``torch.manual_seed`` reproduces it) when None.
        prior_mu, prior_logvar: prior mean / log-variance broadcastable to ``mu``; the
            standard normal when both are None (a missing one is 0). Gradients reach them.
        mask: bool ``(...)`` over the leading dims, True = include. Excluded rows get z = 0,
            kl = 0 and zero gradients whatever they hold (NaN included).
        sample: False gives z = mu (inference).
        reduction: ``none`` (kl has the leading dims), ``sum``, ``mean`` (over included rows;
            0 when none is included) or ``batchmean`` (sum / mu.shape[0]).
        generator: the torch.Generator the in-kernel seed is drawn from.

    Returns:
        ``(z, kl)``: z like mu; kl in mu's dtype (accumulated in float32/float64).

    Under ``torch.autocast`` the floating inputs are cast to the autocast dtype first (as for
    SDPA), so a float32 prior goes with bfloat16 activations; float64 ones stay float64.
    """
    check_float_tensor(mu, "mu")
    device = mu.device.type
    if not torch.is_autocast_enabled(device):
        return _reparameterize_kl(mu, logvar, eps, prior_mu, prior_logvar, mask, sample,
                                  reduction, generator)
    mu, logvar, eps, prior_mu, prior_logvar = autocast_inputs(device, mu, logvar, eps, prior_mu,
                                                              prior_logvar)
    with autocast_off(device):
        return _reparameterize_kl(mu, logvar, eps, prior_mu, prior_logvar, mask, sample,
                                  reduction, generator)


def _reparameterize_kl(mu, logvar, eps, prior_mu, prior_logvar, mask, sample, reduction,
                       generator):
    """reparameterize_kl after autocast's casts."""
    if mu.dim() < 1:
        raise ValueError("mu must have at least one dim (..., D), got a 0-dim tensor")
    check_like(logvar, "logvar", mu, "mu")
    if eps is not None:
        check_like(eps, "eps", mu, "mu")
    if mask is not None:
        check_row_mask(mask, "mask", mu, "mu")
    for name, prior in (("prior_mu", prior_mu), ("prior_logvar", prior_logvar)):
        if prior is not None:
            check_broadcastable(prior, name, mu, "mu")
    check_choice(reduction, "reduction", _ref.REDUCTIONS)
    if not isinstance(sample, bool):
        raise TypeError(f"sample must be a bool, got {type(sample).__name__}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")

    if _needs_fp32_prior_grad(mu, prior_mu, prior_logvar):
        # A broadcast prior's gradient is a sum over rows: summing half-precision per-row
        # gradients would break "accumulate in fp32", so this rare case runs in float32.
        z, kl = _reparameterize_kl(
            mu.float(), logvar.float(), None if eps is None else eps.float(),
            None if prior_mu is None else prior_mu.float(),
            None if prior_logvar is None else prior_logvar.float(),
            mask, sample, reduction, generator)
        return z.to(mu.dtype), kl.to(mu.dtype)

    prior_mu, prior_logvar = _prepare_prior(prior_mu, mu), _prepare_prior(prior_logvar, mu)
    if (prior_mu is None) != (prior_logvar is None):
        prior_mu = torch.zeros_like(mu) if prior_mu is None else prior_mu
        prior_logvar = torch.zeros_like(mu) if prior_logvar is None else prior_logvar

    noise = NO_NOISE if not sample else (GIVEN_NOISE if eps is not None else PHILOX_NOISE)
    if noise == PHILOX_NOISE:
        check_not_capturing(mu.device, "reparameterize_kl", "an in-kernel eps",
                            "Pass eps= (drawn inside the graph, e.g. torch.randn_like(mu)), or "
                            "sample=False, or run it outside the capture.")
        seed = draw_seed(generator)
    else:
        seed = zero_seed()
    backend = _backend.choose(OP, mu.device.type, mu.dtype)
    z, kl_rows = _ReparamKL.apply(
        backend, mu.contiguous(), logvar.contiguous(),
        eps.contiguous() if noise == GIVEN_NOISE else None, prior_mu, prior_logvar,
        None if mask is None else mask.contiguous(), seed, noise)
    batch = mu.shape[0] if mu.dim() >= 2 else 1
    return z, _ref.reduce_kl(kl_rows, mask, reduction, batch, mu.dtype)
