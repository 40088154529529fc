"""reparameterize_kl in Triton: one fused pass forward, one fused pass backward.

Forward, per element of a row (acc = float32, float64 for float64 inputs):

    sigma = exp(lv / 2)
    z     = mu + sigma * eps                                  (z = mu when noise == 0)
    kl    = 1/2 [ plv - lv + exp(lv - plv) + (mu - pm)^2 exp(-plv) - 1 ]
          = 1/2 [ sigma^2 + mu^2 - 1 - lv ]                   (standard normal prior)
    KL_row = sum_d kl

Backward, with gz = dL/dz and gk = dL/dKL_row:

    dmu  = gz + gk (mu - pm) exp(-plv)
    dlv  = gz eps sigma / 2 + gk (exp(lv - plv) - 1) / 2
    deps = gz sigma
    dpm  = -gk (mu - pm) exp(-plv)
    dplv = gk (1 - exp(lv - plv) - (mu - pm)^2 exp(-plv)) / 2

Rows excluded by ``mask`` are never read: their z, KL and gradients are 0 whatever they hold.

In-kernel eps (noise == 2) is the stream every backend shares: element i of the flattened tensor
is component (i & 3) of ``tl.randn4x(seed, i >> 2)`` (components n1, n2, n3, n4 in that order;
see robustmm_fast/reference/philox.py and csrc/include/robustmm/philox.h). When D % 4 == 0 a tile
makes one Philox call per 4 elements and interleaves the four outputs; otherwise each element
makes its own call and picks its component. The backward regenerates eps from (seed, i).

Layout: one program per block of BLOCK_ROWS rows; it loops over D in chunks of BLOCK_D and sums
each row's KL in the accumulation dtype. Each input is read once, each output written once.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._device import on_tensor_device

from ..reference.reparam_kl import acc_dtype

__all__ = ["reparam_kl_forward", "reparam_kl_backward"]

NO_NOISE, GIVEN_NOISE, PHILOX_NOISE = 0, 1, 2
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# Launch heuristics (module-level so tests can shrink them to cover the chunk loop and the
# multi-program grid at tiny shapes).
_MAX_BLOCK_D = 1024          # widest chunk of a row per loop iteration
_FWD_TILE = 4096             # elements per program tile, forward
_BWD_TILE = 2048             # elements per program tile, backward (more live tensors)
_INDEX64_LIMIT = 2**31       # int64 offsets once padded flat indices may reach this


# ---- kernels ----

@triton.jit
def _philox_eps(seed, first, ALIGNED4: tl.constexpr, BLOCK_D: tl.constexpr):
    """float32 eps of a (ROWS, BLOCK_D) tile whose row r starts at flat index first[r]:
    eps[r, c] = component ((first[r] + c) & 3) of tl.randn4x(seed, (first[r] + c) >> 2).

    ALIGNED4 (first % 4 == 0 everywhere): one Philox call per 4 elements, the outputs
    interleaved to n1, n2, n3, n4, n1, ...  Otherwise one call per element.
    """
    if ALIGNED4:
        groups = tl.arange(0, BLOCK_D // 4)
        counter = (first >> 2)[:, None] + groups[None, :]          # (ROWS, BLOCK_D // 4)
        n1, n2, n3, n4 = tl.randn4x(seed, counter)
        # interleave(interleave(n1, n3), interleave(n2, n4)) = n1, n2, n3, n4, n1, n2, ...
        eps = tl.interleave(tl.interleave(n1, n3), tl.interleave(n2, n4))
    else:
        flat = first[:, None] + tl.arange(0, BLOCK_D)[None, :]    # (ROWS, BLOCK_D)
        n1, n2, n3, n4 = tl.randn4x(seed, flat >> 2)
        k = flat & 3
        eps = tl.where(k == 0, n1, tl.where(k == 1, n2, tl.where(k == 2, n3, n4)))
    return eps


@triton.jit(do_not_specialize=["n_rows", "seed"])
def _reparam_kl_fwd_kernel(
    mu_ptr,       # (n_rows, D) float16/bfloat16/float32/float64
    lv_ptr,       # (n_rows, D) like mu
    eps_ptr,      # (n_rows, D) like mu; read only when NOISE == 1
    pm_ptr,       # (n_rows, D) like mu; read only when HAS_PRIOR
    plv_ptr,      # (n_rows, D) like mu; read only when HAS_PRIOR
    mask_ptr,     # (n_rows,) uint8 (a bool mask viewed), 1 = include; read only when HAS_MASK
    z_ptr,        # (n_rows, D) like mu, written
    kl_ptr,       # (n_rows,) accumulation dtype (float32, float64 for float64), written
    n_rows,       # number of rows (the product of the leading dims)
    D,            # row length (the last dim)
    seed,         # Philox key, [0, 2^62); used only when NOISE == 2
    NOISE: tl.constexpr,       # 0: z = mu, 1: eps given, 2: eps = Philox(seed, flat index)
    HAS_PRIOR: tl.constexpr,
    HAS_MASK: tl.constexpr,
    ALIGNED4: tl.constexpr,    # D % 4 == 0: grouped Philox
    INDEX_64: tl.constexpr,    # int64 offsets and counters
    BLOCK_ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    ACC = kl_ptr.dtype.element_ty
    pid = tl.program_id(0)
    rows = pid * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    if INDEX_64:
        rows = rows.to(tl.int64)
    row_ok = rows < n_rows
    keep = row_ok
    if HAS_MASK:
        keep = keep & (tl.load(mask_ptr + rows, mask=row_ok, other=0) != 0)
    base = rows * D
    cols0 = tl.arange(0, BLOCK_D)
    kl_acc = tl.zeros((BLOCK_ROWS,), dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + cols0
        col_ok = cols < D
        offs = base[:, None] + cols[None, :]
        io = row_ok[:, None] & col_ok[None, :]    # written: every real element
        rd = keep[:, None] & col_ok[None, :]      # read: included rows only
        m = tl.load(mu_ptr + offs, mask=rd, other=0.0).to(ACC)
        lv = tl.load(lv_ptr + offs, mask=rd, other=0.0).to(ACC)
        sigma = tl.exp(0.5 * lv)
        if NOISE == 1:
            e = tl.load(eps_ptr + offs, mask=rd, other=0.0).to(ACC)
            z = m + sigma * e
        elif NOISE == 2:
            e = _philox_eps(seed, base + d0, ALIGNED4, BLOCK_D).to(ACC)
            z = m + sigma * e
        else:
            z = m
        if HAS_PRIOR:
            pm = tl.load(pm_ptr + offs, mask=rd, other=0.0).to(ACC)
            plv = tl.load(plv_ptr + offs, mask=rd, other=0.0).to(ACC)
            diff = m - pm
            terms = 0.5 * (plv - lv + tl.exp(lv - plv) + diff * diff * tl.exp(-plv) - 1.0)
        else:
            terms = 0.5 * (sigma * sigma + m * m - 1.0 - lv)
        kl_acc += tl.sum(tl.where(rd, terms, 0.0), axis=1)
        z = tl.where(keep[:, None], z, 0.0)
        tl.store(z_ptr + offs, z.to(z_ptr.dtype.element_ty), mask=io)
    tl.store(kl_ptr + rows, tl.where(keep, kl_acc, 0.0), mask=row_ok)


@triton.jit(do_not_specialize=["n_rows", "seed"])
def _reparam_kl_bwd_kernel(
    gz_ptr,       # (n_rows, D) like mu: dL/dz
    gk_ptr,       # (n_rows,) accumulation dtype: dL/dKL_row
    mu_ptr,       # (n_rows, D)
    lv_ptr,       # (n_rows, D)
    eps_ptr,      # (n_rows, D); read only when NOISE == 1
    pm_ptr,       # (n_rows, D); read only when HAS_PRIOR
    plv_ptr,      # (n_rows, D); read only when HAS_PRIOR
    mask_ptr,     # (n_rows,) uint8, 1 = include; read only when HAS_MASK
    dmu_ptr,      # (n_rows, D) like mu, written
    dlv_ptr,      # (n_rows, D) like mu, written
    deps_ptr,     # (n_rows, D) like mu, written only when NEED_EPS
    dpm_ptr,      # (n_rows, D) like mu, written only when NEED_PRIOR
    dplv_ptr,     # (n_rows, D) like mu, written only when NEED_PRIOR
    n_rows,
    D,
    seed,
    NOISE: tl.constexpr,
    HAS_PRIOR: tl.constexpr,
    HAS_MASK: tl.constexpr,
    NEED_EPS: tl.constexpr,    # write deps (eps given and it requires grad)
    NEED_PRIOR: tl.constexpr,  # write dpm, dplv (HAS_PRIOR and they require grad)
    ALIGNED4: tl.constexpr,
    INDEX_64: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    ACC = gk_ptr.dtype.element_ty
    OUT = dmu_ptr.dtype.element_ty
    pid = tl.program_id(0)
    rows = pid * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    if INDEX_64:
        rows = rows.to(tl.int64)
    row_ok = rows < n_rows
    keep = row_ok
    if HAS_MASK:
        keep = keep & (tl.load(mask_ptr + rows, mask=row_ok, other=0) != 0)
    gk = tl.load(gk_ptr + rows, mask=keep, other=0.0).to(ACC)[:, None]
    keep2 = keep[:, None]
    base = rows * D
    cols0 = tl.arange(0, BLOCK_D)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + cols0
        col_ok = cols < D
        offs = base[:, None] + cols[None, :]
        io = row_ok[:, None] & col_ok[None, :]
        rd = keep2 & col_ok[None, :]
        gz = tl.load(gz_ptr + offs, mask=rd, other=0.0).to(ACC)
        m = tl.load(mu_ptr + offs, mask=rd, other=0.0).to(ACC)
        lv = tl.load(lv_ptr + offs, mask=rd, other=0.0).to(ACC)
        sigma = tl.exp(0.5 * lv)
        if HAS_PRIOR:
            pm = tl.load(pm_ptr + offs, mask=rd, other=0.0).to(ACC)
            plv = tl.load(plv_ptr + offs, mask=rd, other=0.0).to(ACC)
            diff = m - pm
            inv_prior_var = tl.exp(-plv)
            ratio = tl.exp(lv - plv)
            pull = gk * diff * inv_prior_var
        else:
            ratio = sigma * sigma
            pull = gk * m
        dlv = gk * (ratio - 1.0)
        if NOISE == 1:
            e = tl.load(eps_ptr + offs, mask=rd, other=0.0).to(ACC)
            dlv += gz * e * sigma
        elif NOISE == 2:
            e = _philox_eps(seed, base + d0, ALIGNED4, BLOCK_D).to(ACC)
            dlv += gz * e * sigma
        dlv = 0.5 * dlv
        tl.store(dmu_ptr + offs, tl.where(keep2, gz + pull, 0.0).to(OUT), mask=io)
        tl.store(dlv_ptr + offs, tl.where(keep2, dlv, 0.0).to(OUT), mask=io)
        if NEED_EPS:
            tl.store(deps_ptr + offs, tl.where(keep2, gz * sigma, 0.0).to(OUT), mask=io)
        if NEED_PRIOR:
            dplv = 0.5 * gk * (1.0 - ratio - diff * diff * inv_prior_var)
            tl.store(dpm_ptr + offs, tl.where(keep2, -pull, 0.0).to(OUT), mask=io)
            tl.store(dplv_ptr + offs, tl.where(keep2, dplv, 0.0).to(OUT), mask=io)


# ---- host side ----

def _check(mu, logvar, eps, prior_mu, prior_logvar, mask, seed, noise):
    """Validated, contiguous inputs (the same checks as the C++ op)."""
    if not isinstance(mu, torch.Tensor) or mu.dtype not in _DTYPES:
        got = mu.dtype if isinstance(mu, torch.Tensor) else type(mu).__name__
        raise TypeError(f"robustmm: the triton reparam_kl kernel supports float16, bfloat16, "
                        f"float32 and float64 mu, got {got}")
    if mu.dim() < 1:
        raise ValueError("robustmm: mu must have at least 1 dim (..., D), got a scalar")
    if noise not in (NO_NOISE, GIVEN_NOISE, PHILOX_NOISE):
        raise ValueError(f"robustmm: noise must be 0 (none), 1 (given eps) or 2 (in-kernel), got {noise}")
    if (eps is not None) != (noise == GIVEN_NOISE):
        raise ValueError("robustmm: eps must be given exactly when noise == 1")
    if (prior_mu is None) != (prior_logvar is None):
        raise ValueError("robustmm: prior_mu and prior_logvar must be given together at this level")
    if not 0 <= int(seed) < 2**64:
        raise ValueError(f"robustmm: seed must be in [0, 2^64), got {seed}")
    named = [("logvar", logvar), ("eps", eps), ("prior_mu", prior_mu), ("prior_logvar", prior_logvar)]
    for name, t in named:
        if t is None:
            continue
        if t.dtype != mu.dtype:
            raise TypeError(f"robustmm: {name} and mu must have the same dtype, got {t.dtype} and {mu.dtype}")
        if t.device != mu.device:
            raise ValueError(f"robustmm: {name} and mu must be on the same device, got {t.device} and {mu.device}")
        if t.shape != mu.shape:
            raise ValueError(f"robustmm: {name} must have the shape of mu {tuple(mu.shape)}, got {tuple(t.shape)}")
    if mask is not None:
        if mask.dtype != torch.bool:
            raise TypeError(f"robustmm: mask must be a bool tensor (True = include), got {mask.dtype}")
        if mask.shape != mu.shape[:-1] or mask.device != mu.device:
            raise ValueError(f"robustmm: mask must have shape {tuple(mu.shape[:-1])} on {mu.device}, "
                             f"got {tuple(mask.shape)} on {mask.device}")

    def c(t):
        return None if t is None else t.contiguous()
    return c(mu), c(logvar), c(eps), c(prior_mu), c(prior_logvar), c(mask)


def _launch_config(n_rows: int, D: int, tile: int, noise: int):
    """(grid, BLOCK_ROWS, BLOCK_D, ALIGNED4, INDEX_64, num_warps) from the shape alone."""
    aligned4 = D % 4 == 0
    if noise == PHILOX_NOISE and not aligned4:
        tile = max(tile // 2, 1)  # one Philox call per element: keep the tile's registers in check
    block_d = min(triton.next_power_of_2(D), _MAX_BLOCK_D)
    if aligned4:
        block_d = max(block_d, 4)
    block_rows = max(1, min(tile // block_d, triton.next_power_of_2(n_rows)))
    elems = block_rows * block_d
    num_warps = 8 if elems >= 4096 else (4 if elems >= 512 else 2)
    grid = (triton.cdiv(n_rows, block_rows),)
    # padded flat indices reach (grid * block_rows) * D + block_d
    index64 = grid[0] * block_rows * D + block_d >= _INDEX64_LIMIT
    return grid, block_rows, block_d, aligned4, index64, num_warps


@on_tensor_device
def reparam_kl_forward(mu, logvar, eps, prior_mu, prior_logvar, mask, seed: int, noise: int):
    """(z like mu, per-row KL in float32 / float64). The schema of robustmm_C::reparam_kl_forward."""
    mu, logvar, eps, prior_mu, prior_logvar, mask = _check(
        mu, logvar, eps, prior_mu, prior_logvar, mask, seed, noise)
    D = mu.shape[-1]
    lead = mu.shape[:-1]
    n_rows = mu.numel() // D if D > 0 else lead.numel()
    z = torch.empty_like(mu)
    kl = torch.empty(lead, dtype=acc_dtype(mu.dtype), device=mu.device)
    if n_rows == 0:
        return z, kl
    if D == 0:
        return z, kl.zero_()
    grid, block_rows, block_d, aligned4, index64, num_warps = _launch_config(n_rows, D, _FWD_TILE, noise)
    has_prior = prior_mu is not None
    _reparam_kl_fwd_kernel[grid](
        mu, logvar,
        eps if eps is not None else mu,
        prior_mu if has_prior else mu,
        prior_logvar if has_prior else mu,
        mask.view(torch.uint8) if mask is not None else kl,
        z, kl, n_rows, D, int(seed) if noise == PHILOX_NOISE else 0,
        NOISE=noise, HAS_PRIOR=has_prior, HAS_MASK=mask is not None, ALIGNED4=aligned4,
        INDEX_64=index64, BLOCK_ROWS=block_rows, BLOCK_D=block_d, num_warps=num_warps)
    return z, kl


@on_tensor_device
def reparam_kl_backward(grad_z, grad_kl, mu, logvar, eps, prior_mu, prior_logvar, mask, seed: int,
                        noise: int, need_grad_eps: bool, need_grad_prior: bool):
    """[dmu, dlogvar, deps | None, dprior_mu | None, dprior_logvar | None], one pass.
    The schema of robustmm_C::reparam_kl_backward (None where the C++ op returns an empty tensor)."""
    mu, logvar, eps, prior_mu, prior_logvar, mask = _check(
        mu, logvar, eps, prior_mu, prior_logvar, mask, seed, noise)
    acc = acc_dtype(mu.dtype)
    if grad_z.shape != mu.shape:
        raise ValueError(f"robustmm: grad_z must have the shape of mu {tuple(mu.shape)}, got {tuple(grad_z.shape)}")
    if grad_kl.shape != mu.shape[:-1]:
        raise ValueError(f"robustmm: grad_kl must have shape {tuple(mu.shape[:-1])}, got {tuple(grad_kl.shape)}")
    # grad_z from autograd may be an expanded (stride-0) tensor
    grad_z = grad_z.to(mu.dtype).contiguous()
    grad_kl = grad_kl.to(acc).contiguous()
    want_eps = bool(need_grad_eps) and eps is not None
    want_prior = bool(need_grad_prior) and prior_mu is not None
    dmu, dlv = torch.empty_like(mu), torch.empty_like(mu)
    deps = torch.empty_like(mu) if want_eps else None
    dpm = torch.empty_like(mu) if want_prior else None
    dplv = torch.empty_like(mu) if want_prior else None
    D = mu.shape[-1]
    n_rows = mu.numel() // D if D > 0 else 0
    if n_rows == 0:
        return [dmu, dlv, deps, dpm, dplv]
    grid, block_rows, block_d, aligned4, index64, num_warps = _launch_config(n_rows, D, _BWD_TILE, noise)
    has_prior = prior_mu is not None
    _reparam_kl_bwd_kernel[grid](
        grad_z, grad_kl, mu, logvar,
        eps if eps is not None else mu,
        prior_mu if has_prior else mu,
        prior_logvar if has_prior else mu,
        mask.view(torch.uint8) if mask is not None else grad_kl,
        dmu, dlv,
        deps if want_eps else dmu,
        dpm if want_prior else dmu,
        dplv if want_prior else dmu,
        n_rows, D, int(seed) if noise == PHILOX_NOISE else 0,
        NOISE=noise, HAS_PRIOR=has_prior, HAS_MASK=mask is not None, NEED_EPS=want_eps,
        NEED_PRIOR=want_prior, ALIGNED4=aligned4, INDEX_64=index64, BLOCK_ROWS=block_rows,
        BLOCK_D=block_d, num_warps=num_warps)
    return [dmu, dlv, deps, dpm, dplv]
