"""cycle_reconstruction_loss in Triton: one fused pass forward, one fused pass backward.

For a row pair (a, b) of D elements (acc = float32, float64 for float64 inputs), x = a - b:

    mse        d = 1/D sum_i x_i^2                          dd/da_i = 2 x_i / D
    l1         d = 1/D sum_i |x_i|                          dd/da_i = sign(x_i) / D
    smooth_l1  d = 1/D sum_i (|x| < beta ? x^2 / (2 beta)   dd/da_i = (|x| < beta ? x / beta
                              : |x| - beta / 2)                                : sign(x)) / D
    cosine     d = 1 - c,  c = <a, b> / (a' b'),  a' = max(|a|, 1e-8), b' = max(|b|, 1e-8)
               dd/da = c a / (a' |a|) - b / (a' b'),  dd/db = c b / (b' |b|) - a / (a' b')
               (a term with |a| = 0 is 0, as in F.cosine_similarity's autograd)

and dd/db = -dd/da for the first three, so only dd/da is stored for them. The forward writes the
per-row terms (2, rows): terms[0] = d(forward_pred, target), terms[1] = d(cycle_pred, source), and
(when a gradient is wanted) those derivatives. The backward scales them by the upstream gradient
of each row's term: d input[r, :] = grad_terms[k, r] * (stored derivative)[r, :] (negated for
the symmetric distances' second input). Rows excluded by ``mask`` are never read: their terms and
every gradient are 0 whatever they hold (NaN included).

Layout: a (row blocks, 2) grid; axis 1 picks the pair (0: forward_pred/target, 1: cycle_pred/
source). A program owns BLOCK_ROWS rows of its pair and loops over D in chunks of BLOCK_D, so
each input element is read once. Cosine needs the row's dot and norms before its derivatives:
when D fits one chunk the row stays in registers, otherwise a second loop re-reads the row.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..reference.cycle_loss import COSINE_EPS, acc_dtype
from ._device import on_tensor_device

__all__ = ["cycle_loss_forward", "cycle_loss_backward"]

MSE, L1, SMOOTH_L1, COSINE = 0, 1, 2, 3
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_NAMES = ("forward_pred", "target", "cycle_pred", "source")

# Launch heuristics (module-level so tests can shrink them to cover the chunk loop and the
# multi-program grid at tiny shapes).
_MAX_BLOCK_D = 1024          # widest chunk of a row per loop iteration (cosine: widest row kept in registers)
_FWD_TILE = 2048             # elements per program tile, forward (two inputs, two derivatives live)
_BWD_TILE = 4096             # elements per program tile, backward
_INDEX64_LIMIT = 2**31       # int64 offsets once padded flat indices may reach this
_EPS = tl.constexpr(COSINE_EPS)   # cosine's norm clamp, as F.cosine_similarity's eps


# ---- kernels ----

@triton.jit
def _symmetric_elem(x, beta, inv_beta, DIST: tl.constexpr):
    """(value, d value / d a) of one element of mse / l1 / smooth_l1, x = a - b."""
    if DIST == 0:
        value = x * x
        grad = 2.0 * x
    else:
        ax = tl.abs(x)
        sign = tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, 0.0)).to(x.dtype)
        if DIST == 1:
            value = ax
            grad = sign
        else:
            quadratic = ax < beta
            value = tl.where(quadratic, 0.5 * x * x * inv_beta, ax - 0.5 * beta)
            grad = tl.where(quadratic, x * inv_beta, sign)
    return value, grad


@triton.jit
def _cosine_row(dot, n2a, n2b):
    """(term, self_a, self_b, cross) of cosine rows from <a, b>, |a|^2, |b|^2:
    dd/da = self_a a + cross b,  dd/db = cross a + self_b b."""
    if n2a.dtype == tl.float32:  # correctly rounded, as std::sqrt (tl.sqrt is approximate)
        na = tl.sqrt_rn(n2a)
        nb = tl.sqrt_rn(n2b)
    else:                        # float64: tl.sqrt is correctly rounded
        na = tl.sqrt(n2a)
        nb = tl.sqrt(n2b)
    na_c = tl.maximum(na, _EPS)
    nb_c = tl.maximum(nb, _EPS)
    inv = 1.0 / (na_c * nb_c)
    c = dot * inv
    self_a = tl.where(na > 0, c / tl.where(na > 0, na_c * na, 1.0), 0.0)
    self_b = tl.where(nb > 0, c / tl.where(nb > 0, nb_c * nb, 1.0), 0.0)
    return 1.0 - c, self_a, self_b, -inv


@triton.jit
def _load_pair(a_ptr, b_ptr, offs, rd, ACC: tl.constexpr):
    """A (rows, chunk) tile of a and b in ACC; 0 where not read (padding, excluded rows)."""
    a = tl.load(a_ptr + offs, mask=rd, other=0.0).to(ACC)
    b = tl.load(b_ptr + offs, mask=rd, other=0.0).to(ACC)
    return a, b


@triton.jit
def _store_cosine_grads(ga_ptr, gb_ptr, offs, io, keep2, a, b, self_a, self_b, cross):
    ga = self_a[:, None] * a + cross[:, None] * b
    gb = cross[:, None] * a + self_b[:, None] * b
    tl.store(ga_ptr + offs, tl.where(keep2, ga, 0.0), mask=io)
    tl.store(gb_ptr + offs, tl.where(keep2, gb, 0.0), mask=io)


@triton.jit
def _pair_forward(
    a_ptr, b_ptr,   # (n_rows, D) inputs of this pair (forward_pred, target | cycle_pred, source)
    ga_ptr,         # (n_rows, D) accumulation dtype: dd/da, written when NEED_GRAD
    gb_ptr,         # (n_rows, D) accumulation dtype: dd/db, written when NEED_GRAD and cosine
    t_ptr,          # (n_rows,) accumulation dtype: this pair's row of terms, written
    rows, row_ok, keep, D, beta, inv_beta,
    DIST: tl.constexpr, NEED_GRAD: tl.constexpr, ONE_CHUNK: tl.constexpr, BLOCK_D: tl.constexpr,
):
    ACC = t_ptr.dtype.element_ty
    keep2 = keep[:, None]
    base = rows[:, None] * D
    cols0 = tl.arange(0, BLOCK_D)[None, :]
    if DIST == 3 and ONE_CHUNK:  # the whole row in registers: one read
        io, rd = row_ok[:, None] & (cols0 < D), keep2 & (cols0 < D)
        a, b = _load_pair(a_ptr, b_ptr, base + cols0, rd, ACC)
        term, self_a, self_b, cross = _cosine_row(
            tl.sum(a * b, axis=1), tl.sum(a * a, axis=1), tl.sum(b * b, axis=1))
        if NEED_GRAD:
            _store_cosine_grads(ga_ptr, gb_ptr, base + cols0, io, keep2, a, b, self_a, self_b, cross)
    elif DIST == 3:  # first loop: dot and norms; second loop (if wanted): derivatives
        dot = tl.zeros(keep.shape, dtype=ACC)
        n2a = tl.zeros(keep.shape, dtype=ACC)
        n2b = tl.zeros(keep.shape, dtype=ACC)
        for d0 in range(0, D, BLOCK_D):
            a, b = _load_pair(a_ptr, b_ptr, base + d0 + cols0, keep2 & (d0 + cols0 < D), ACC)
            dot += tl.sum(a * b, axis=1)
            n2a += tl.sum(a * a, axis=1)
            n2b += tl.sum(b * b, axis=1)
        term, self_a, self_b, cross = _cosine_row(dot, n2a, n2b)
        if NEED_GRAD:
            for d0 in range(0, D, BLOCK_D):
                io, rd = row_ok[:, None] & (d0 + cols0 < D), keep2 & (d0 + cols0 < D)
                a, b = _load_pair(a_ptr, b_ptr, base + d0 + cols0, rd, ACC)
                _store_cosine_grads(ga_ptr, gb_ptr, base + d0 + cols0, io, keep2, a, b, self_a,
                                    self_b, cross)
    else:
        inv_d = 1.0 / (tl.zeros(keep.shape, dtype=ACC) + D)
        total = tl.zeros(keep.shape, dtype=ACC)
        for d0 in range(0, D, BLOCK_D):
            io, rd = row_ok[:, None] & (d0 + cols0 < D), keep2 & (d0 + cols0 < D)
            a, b = _load_pair(a_ptr, b_ptr, base + d0 + cols0, rd, ACC)
            value, grad = _symmetric_elem(a - b, beta, inv_beta, DIST)
            total += tl.sum(value, axis=1)  # unread elements are a = b = 0: value 0
            if NEED_GRAD:
                grad = tl.where(keep2, grad * inv_d[:, None], 0.0)
                tl.store(ga_ptr + base + d0 + cols0, grad, mask=io)
        term = total * inv_d
    tl.store(t_ptr + rows, tl.where(keep, term, 0.0), mask=row_ok)


@triton.jit(do_not_specialize=["n_rows", "beta_hi", "beta_lo"])
def _cycle_fwd_kernel(
    fp_ptr, tg_ptr, cp_ptr, src_ptr,   # (n_rows, D) float16/bfloat16/float32/float64, one dtype
    mask_ptr,     # (n_rows,) uint8 (a bool mask viewed), 1 = include; read only when HAS_MASK
    terms_ptr,    # (2, n_rows) accumulation dtype (float32, float64 for float64), written
    gf_ptr,       # (n_rows, D) accumulation dtype: d terms[0] / d forward_pred, when NEED_GRAD
    gt_ptr,       # (n_rows, D) accumulation dtype: d terms[0] / d target, when NEED_GRAD and cosine
    gc_ptr,       # (n_rows, D) accumulation dtype: d terms[1] / d cycle_pred, when NEED_GRAD
    gs_ptr,       # (n_rows, D) accumulation dtype: d terms[1] / d source, when NEED_GRAD and cosine
    n_rows,       # number of rows (the product of the leading dims)
    D,            # row length (the last dim)
    beta_hi, beta_lo,          # smooth_l1's beta = beta_hi + beta_lo (float args are float32)
    DIST: tl.constexpr,        # 0 mse, 1 l1, 2 smooth_l1, 3 cosine
    HAS_MASK: tl.constexpr,
    NEED_GRAD: tl.constexpr,
    ONE_CHUNK: tl.constexpr,   # D <= BLOCK_D
    INDEX_64: tl.constexpr,    # int64 offsets
    BLOCK_ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    ACC = terms_ptr.dtype.element_ty
    pair = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    if INDEX_64:
        rows = rows.to(tl.int64)
    row_ok = rows < n_rows
    keep = row_ok
    if HAS_MASK:
        keep = keep & (tl.load(mask_ptr + rows, mask=row_ok, other=0) != 0)
    beta = (tl.zeros((1, 1), dtype=ACC) + beta_hi) + beta_lo   # (1, 1), in ACC
    inv_beta = 1.0 / beta
    if pair == 0:
        _pair_forward(fp_ptr, tg_ptr, gf_ptr, gt_ptr, terms_ptr, rows, row_ok, keep, D, beta,
                      inv_beta, DIST, NEED_GRAD, ONE_CHUNK, BLOCK_D)
    else:
        _pair_forward(cp_ptr, src_ptr, gc_ptr, gs_ptr, terms_ptr + n_rows, rows, row_ok, keep, D,
                      beta, inv_beta, DIST, NEED_GRAD, ONE_CHUNK, BLOCK_D)


@triton.jit
def _pair_backward(
    g_ptr,          # (n_rows,) accumulation dtype: this pair's row of grad_terms
    ga_ptr,         # (n_rows, D) accumulation dtype: stored dd/da
    gb_ptr,         # (n_rows, D) accumulation dtype: stored dd/db (cosine only)
    da_ptr, db_ptr,  # (n_rows, D) output dtype: d input a, d input b, written when NEED_A / NEED_B
    rows, row_ok, keep, D,
    COSINE: tl.constexpr, NEED_A: tl.constexpr, NEED_B: tl.constexpr, BLOCK_D: tl.constexpr,
):
    if NEED_A or NEED_B:
        keep2 = keep[:, None]
        g = tl.load(g_ptr + rows, mask=keep, other=0.0)[:, None]
        base = rows[:, None] * D
        cols0 = tl.arange(0, BLOCK_D)[None, :]
        for d0 in range(0, D, BLOCK_D):
            offs = base + d0 + cols0
            io = row_ok[:, None] & (d0 + cols0 < D)
            rd = keep2 & (d0 + cols0 < D)
            if NEED_A or not COSINE:  # one load of dd/da serves both outputs
                ga = g * tl.load(ga_ptr + offs, mask=rd, other=0.0)
            if NEED_A:
                tl.store(da_ptr + offs, tl.where(keep2, ga, 0.0).to(da_ptr.dtype.element_ty), mask=io)
            if NEED_B:
                if COSINE:
                    gb = g * tl.load(gb_ptr + offs, mask=rd, other=0.0)
                else:
                    gb = -ga
                tl.store(db_ptr + offs, tl.where(keep2, gb, 0.0).to(db_ptr.dtype.element_ty), mask=io)


@triton.jit(do_not_specialize=["n_rows"])
def _cycle_bwd_kernel(
    gterms_ptr,   # (2, n_rows) accumulation dtype: dL / d terms
    gf_ptr, gt_ptr, gc_ptr, gs_ptr,   # (n_rows, D) accumulation dtype: the forward's derivatives
    mask_ptr,     # (n_rows,) uint8, 1 = include; read only when HAS_MASK
    dfp_ptr, dtg_ptr, dcp_ptr, dsrc_ptr,   # (n_rows, D) output dtype, written per NEED_*
    n_rows,
    D,
    COSINE: tl.constexpr,      # gt/gs hold dd/db; otherwise dd/db = -dd/da
    HAS_MASK: tl.constexpr,
    NEED_FP: tl.constexpr, NEED_TG: tl.constexpr, NEED_CP: tl.constexpr, NEED_SRC: tl.constexpr,
    INDEX_64: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pair = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    if INDEX_64:
        rows = rows.to(tl.int64)
    row_ok = rows < n_rows
    keep = row_ok
    if HAS_MASK:
        keep = keep & (tl.load(mask_ptr + rows, mask=row_ok, other=0) != 0)
    if pair == 0:
        _pair_backward(gterms_ptr, gf_ptr, gt_ptr, dfp_ptr, dtg_ptr, rows, row_ok, keep, D,
                       COSINE, NEED_FP, NEED_TG, BLOCK_D)
    else:
        _pair_backward(gterms_ptr + n_rows, gc_ptr, gs_ptr, dcp_ptr, dsrc_ptr, rows, row_ok, keep,
                       D, COSINE, NEED_CP, NEED_SRC, BLOCK_D)


# ---- host side ----

def _check_like(t, name, ref, ref_name, shape=True):
    """`t` has `ref`'s dtype and device (and shape), as check_like in csrc/include/robustmm/checks.h."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"robustmm: {name} must be a tensor, got {type(t).__name__}")
    if t.dtype != ref.dtype:
        raise TypeError(f"robustmm: {name} and {ref_name} must have the same dtype, got {t.dtype} "
                        f"and {ref.dtype}")
    if t.device != ref.device:
        raise ValueError(f"robustmm: {name} and {ref_name} must be on the same device, got "
                         f"{t.device} and {ref.device}")
    if shape and t.shape != ref.shape:
        raise ValueError(f"robustmm: {name} must have the shape of {ref_name} {tuple(ref.shape)}, "
                         f"got {tuple(t.shape)}")


def _check_mask(mask, lead, device):
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise TypeError(f"robustmm: mask must be a bool tensor (True = include), got {got}")
    if mask.shape != lead or mask.device != device:
        raise ValueError(f"robustmm: mask must have shape {tuple(lead)} on {device}, "
                         f"got {tuple(mask.shape)} on {mask.device}")
    return mask.contiguous()


def _check_distance(distance):
    if distance not in (MSE, L1, SMOOTH_L1, COSINE):
        raise ValueError(f"robustmm: distance must be 0 (mse), 1 (l1), 2 (smooth_l1) or 3 (cosine), "
                         f"got {distance}")


def _launch_config(n_rows: int, D: int, tile: int):
    """(grid, BLOCK_ROWS, BLOCK_D, INDEX_64, num_warps) from the shape alone."""
    block_d = min(triton.next_power_of_2(D), _MAX_BLOCK_D)
    block_rows = max(1, min(tile // block_d, triton.next_power_of_2(n_rows)))
    elems = block_rows * block_d
    num_warps = 8 if elems >= 4096 else (4 if elems >= 512 else 2)
    grid = (triton.cdiv(n_rows, block_rows), 2)
    index64 = grid[0] * block_rows * D + block_d >= _INDEX64_LIMIT
    return grid, block_rows, block_d, index64, num_warps


@on_tensor_device
def cycle_loss_forward(forward_pred, target, cycle_pred, source, mask, distance: int, beta: float,
                       need_grad: bool):
    """(terms, grad_forward, grad_target, grad_cycle, grad_source). The schema of
    robustmm_C::cycle_loss_forward; numel-0 tensors where it returns empty ones."""
    inputs = (forward_pred, target, cycle_pred, source)
    if not isinstance(forward_pred, torch.Tensor) or forward_pred.dtype not in _DTYPES:
        got = forward_pred.dtype if isinstance(forward_pred, torch.Tensor) else type(forward_pred).__name__
        raise TypeError(f"robustmm: the triton cycle_loss kernel supports float16, bfloat16, "
                        f"float32 and float64 forward_pred, got {got}")
    for name, t in zip(_NAMES[1:], inputs[1:]):
        _check_like(t, name, forward_pred, "forward_pred")
    if forward_pred.dim() < 1 or forward_pred.shape[-1] == 0:
        raise ValueError(f"robustmm: forward_pred must have shape (..., D) with D > 0, got "
                         f"{tuple(forward_pred.shape)}")
    _check_distance(distance)
    beta = float(beta)
    if distance == SMOOTH_L1 and not (math.isfinite(beta) and beta > 0):
        raise ValueError(f"robustmm: smooth_l1 needs a finite beta > 0 (send beta 0 as l1), got {beta}")
    lead, D = forward_pred.shape[:-1], forward_pred.shape[-1]
    mask = _check_mask(mask, lead, forward_pred.device)
    fp, tg, cp, src = (t.contiguous() for t in inputs)
    acc = acc_dtype(fp.dtype)
    n_rows = lead.numel()
    terms = torch.empty((2, *lead), dtype=acc, device=fp.device)
    both = distance == COSINE
    full = lambda: torch.empty(fp.shape, dtype=acc, device=fp.device)  # noqa: E731
    empty = lambda: torch.empty(0, dtype=acc, device=fp.device)  # noqa: E731
    grads = ([full(), full() if both else empty(), full(), full() if both else empty()]
             if need_grad else [empty() for _ in range(4)])
    if n_rows == 0:
        return (terms, *grads)
    grid, block_rows, block_d, index64, num_warps = _launch_config(n_rows, D, _FWD_TILE)
    beta_hi = float(torch.tensor(beta, dtype=torch.float32)) if distance == SMOOTH_L1 else 1.0
    beta_lo = beta - beta_hi if distance == SMOOTH_L1 else 0.0  # float64 keeps ~48 bits of beta
    gf, gt, gc, gs = (g if g.numel() else terms for g in grads)
    _cycle_fwd_kernel[grid](
        fp, tg, cp, src, mask.view(torch.uint8) if mask is not None else terms,
        terms, gf, gt, gc, gs, n_rows, D, beta_hi, beta_lo,
        DIST=distance, HAS_MASK=mask is not None, NEED_GRAD=bool(need_grad),
        ONE_CHUNK=D <= block_d, INDEX_64=index64, BLOCK_ROWS=block_rows, BLOCK_D=block_d,
        num_warps=num_warps)
    return (terms, *grads)


@on_tensor_device
def cycle_loss_backward(grad_terms, grad_forward, grad_target, grad_cycle, grad_source, mask,
                        distance: int, need_grad: int, dtype: torch.dtype):
    """(d forward_pred, d target, d cycle_pred, d source) in `dtype`, numel 0 where the need_grad
    bit (1, 2, 4, 8) is clear. The schema of robustmm_C::cycle_loss_backward."""
    _check_distance(distance)
    if not 0 <= int(need_grad) <= 15:
        raise ValueError(f"robustmm: need_grad must be a bitmask in [0, 15], got {need_grad}")
    if dtype not in _DTYPES:
        raise TypeError(f"robustmm: dtype must be float16, bfloat16, float32 or float64, got {dtype}")
    if not isinstance(grad_forward, torch.Tensor):
        raise TypeError(f"robustmm: grad_forward must be a tensor, got {type(grad_forward).__name__}")
    if grad_forward.dim() < 1 or grad_forward.shape[-1] == 0:
        got = tuple(grad_forward.shape)
        raise ValueError(f"robustmm: grad_forward must have shape (..., D) with D > 0, got {got}")
    acc, shape, dev = grad_forward.dtype, grad_forward.shape, grad_forward.device
    if acc != acc_dtype(dtype):
        raise TypeError(f"robustmm: grad_forward must be {acc_dtype(dtype)} for dtype {dtype}, got {acc}")
    lead, D = shape[:-1], shape[-1]
    _check_like(grad_cycle, "grad_cycle", grad_forward, "grad_forward")
    if distance == COSINE:
        _check_like(grad_target, "grad_target", grad_forward, "grad_forward")
        _check_like(grad_source, "grad_source", grad_forward, "grad_forward")
    _check_like(grad_terms, "grad_terms", grad_forward, "grad_forward", shape=False)
    if grad_terms.dim() < 1 or grad_terms.shape[0] != 2 or grad_terms.numel() != 2 * lead.numel():
        raise ValueError(f"robustmm: grad_terms must have shape (2, ...) with the leading dims of "
                         f"grad_forward {tuple(shape)}, got {tuple(grad_terms.shape)}")
    mask = _check_mask(mask, lead, dev)
    need = [bool(int(need_grad) & bit) for bit in (1, 2, 4, 8)]
    outs = [torch.empty(shape if n else (0,), dtype=dtype, device=dev) for n in need]
    n_rows = lead.numel()
    if n_rows == 0 or not any(need):
        return tuple(outs)
    gterms, gf, gc = grad_terms.contiguous(), grad_forward.contiguous(), grad_cycle.contiguous()
    gt, gs = (grad_target.contiguous(), grad_source.contiguous()) if distance == COSINE else (gf, gc)
    grid, block_rows, block_d, index64, num_warps = _launch_config(n_rows, D, _BWD_TILE)
    dummy = next(o for o in outs if o.numel())
    _cycle_bwd_kernel[grid](
        gterms, gf, gt, gc, gs, mask.view(torch.uint8) if mask is not None else gterms,
        *(o if o.numel() else dummy for o in outs), n_rows, D,
        COSINE=distance == COSINE, HAS_MASK=mask is not None, NEED_FP=need[0], NEED_TG=need[1],
        NEED_CP=need[2], NEED_SRC=need[3], INDEX_64=index64, BLOCK_ROWS=block_rows,
        BLOCK_D=block_d, num_warps=num_warps)
    return tuple(outs)
