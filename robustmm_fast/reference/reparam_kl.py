"""Reference reparameterize_kl: plain PyTorch, autograd for the gradients. The test oracle,
the benchmark's eager baseline and the CPU fallback's math.

    z  = mu + exp(logvar / 2) * eps            (z = mu when sample=False)
    kl = 1/2 sum_d [ plv - lv + exp(lv - plv) + (mu - pm)^2 exp(-plv) - 1 ]
       = -1/2 sum_d (1 + lv - mu^2 - exp(lv))  (standard normal prior)

Rows excluded by `mask` get z = 0 and kl = 0 and pass no gradient, whatever they hold.
Math runs in float32 for float16/bfloat16 inputs (float64 stays float64).
"""
from __future__ import annotations

import torch
from torch import Tensor

REDUCTIONS = ("none", "sum", "mean", "batchmean")


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 math for float16/bfloat16/float32 inputs, float64 for float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def reparam_kl_rows(mu: Tensor, logvar: Tensor, eps: Tensor | None, prior_mu: Tensor | None,
                    prior_logvar: Tensor | None, mask: Tensor | None,
                    sample: bool) -> tuple[Tensor, Tensor]:
    """(z in mu's dtype, per-row kl in float32/float64). Priors must broadcast to mu."""
    acc = acc_dtype(mu.dtype)
    keep = None if mask is None else mask.unsqueeze(-1)
    # excluded rows are replaced before any arithmetic, so NaN/Inf there reach neither the
    # result nor the gradients
    def clean(t):
        if t is None:
            return None
        t = t.to(acc)
        return t if keep is None else torch.where(keep, t, torch.zeros((), dtype=acc, device=t.device))
    m, lv = clean(mu), clean(logvar)
    pm = clean(prior_mu) if prior_mu is not None else None
    plv = clean(prior_logvar) if prior_logvar is not None else None
    if sample:
        z = m + torch.exp(0.5 * lv) * clean(eps)
    else:
        z = m
    if pm is None and plv is None:
        kl_terms = -0.5 * (1.0 + lv - m * m - torch.exp(lv))
    else:
        pm = torch.zeros_like(m) if pm is None else pm
        plv = torch.zeros_like(m) if plv is None else plv
        kl_terms = 0.5 * (plv - lv + torch.exp(lv - plv) + (m - pm) ** 2 * torch.exp(-plv) - 1.0)
    kl = kl_terms.sum(-1)
    if mask is not None:
        zero = torch.zeros((), dtype=acc, device=mu.device)
        z = torch.where(keep, z, zero)
        kl = torch.where(mask, kl, zero)
    return z.to(mu.dtype), kl


def reduce_kl(kl_rows: Tensor, mask: Tensor | None, reduction: str, batch_size: int,
              dtype: torch.dtype) -> Tensor:
    """Reduce per-row KL (accumulation dtype) and cast to `dtype`.

    mean divides by the number of included rows; batchmean by `batch_size` (mu's dim 0).
    With no included rows (or no rows) mean and batchmean are 0, not NaN.
    """
    if reduction == "none":
        return kl_rows.to(dtype)
    total = kl_rows.sum()
    if reduction == "sum":
        return total.to(dtype)
    if reduction == "mean":
        if mask is None:
            return (total / max(kl_rows.numel(), 1)).to(dtype)
        return (total / mask.sum().clamp_min(1).to(total.dtype)).to(dtype)
    if reduction == "batchmean":
        return (total / max(batch_size, 1)).to(dtype)
    raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def reparameterize_kl(mu: Tensor, logvar: Tensor, *, eps: Tensor | None = None,
                      prior_mu: Tensor | None = None, prior_logvar: Tensor | None = None,
                      mask: Tensor | None = None, sample: bool = True, reduction: str = "none",
                      generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Reference of robustmm_fast.ops.reparameterize_kl (same arguments and results).

    eps, when not given and sample=True, is drawn with torch.randn (float32, `generator`).
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if sample and eps is None:
        if generator is None:  # randn_like traces under torch.compile with dynamic shapes
            eps = torch.randn_like(mu, dtype=torch.float32)
        else:
            eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=torch.float32)
    z, kl = reparam_kl_rows(mu, logvar, eps, prior_mu, prior_logvar, mask, sample)
    batch = mu.shape[0] if mu.dim() >= 2 else 1
    return z, reduce_kl(kl, mask, reduction, batch, mu.dtype)


def reparam_kl_rows_backward(grad_z: Tensor, grad_kl: Tensor, mu: Tensor, logvar: Tensor,
                             eps: Tensor | None, prior_mu: Tensor | None,
                             prior_logvar: Tensor | None, mask: Tensor | None, sample: bool,
                             need_grad_eps: bool, need_grad_prior: bool) -> list[Tensor | None]:
    """Closed-form gradients of reparam_kl_rows (the reference backend's backward; the
    autograd of reparam_kl_rows is its oracle in the tests). Priors, if any, have mu's shape.

        dmu  = gz + gk (mu - pm) exp(-plv)
        dlv  = gz eps sigma / 2 + gk (exp(lv - plv) - 1) / 2
        deps = gz sigma
        dpm  = -gk (mu - pm) exp(-plv)
        dplv = gk (1 - exp(lv - plv) - (mu - pm)^2 exp(-plv)) / 2

    Returns [dmu, dlogvar, deps, dprior_mu, dprior_logvar], None where not asked for.
    """
    acc = acc_dtype(mu.dtype)
    keep = None if mask is None else mask.unsqueeze(-1)
    zero = torch.zeros((), dtype=acc, device=mu.device)

    def clean(t):
        t = t.to(acc)
        return t if keep is None else torch.where(keep, t, zero)

    gz, m, lv = clean(grad_z), clean(mu), clean(logvar)
    gk = grad_kl.to(acc) if mask is None else torch.where(mask, grad_kl.to(acc), zero)
    gk = gk.unsqueeze(-1)
    sigma = torch.exp(0.5 * lv)
    has_prior = prior_mu is not None
    if has_prior:
        plv = clean(prior_logvar)
        diff, inv_prior_var, ratio = m - clean(prior_mu), torch.exp(-plv), torch.exp(lv - plv)
    else:
        diff, inv_prior_var, ratio = m, torch.ones_like(m), sigma * sigma
    pull = gk * diff * inv_prior_var
    z_term = gz * clean(eps) * sigma if sample else torch.zeros_like(m)
    grads = [gz + pull, 0.5 * (z_term + gk * (ratio - 1.0)), None, None, None]
    if need_grad_eps and eps is not None:
        grads[2] = gz * sigma if sample else torch.zeros_like(m)
    if need_grad_prior and has_prior:
        grads[3] = -pull
        grads[4] = 0.5 * gk * (1.0 - ratio - diff * diff * inv_prior_var)
    out = []
    for g in grads:
        if g is not None:
            g = g if keep is None else torch.where(keep, g, zero)
            g = g.to(mu.dtype)
        out.append(g)
    return out
