"""cycle_reconstruction_loss in Triton: one fused pass forward, one fused pass backward.

For a row pair (a, b) of D elements (acc = float32, float64 for float64 inputs), x = a - b:

    mse        d = 1/D sum_i x_i^2                          dd/da_i = 2 x_i / D
    l1         d = 1/D sum_i |x_i|                          dd/da_i = sign(x_i) / D
    smooth_l1  d = 1/D sum_i (|x| < beta ? x^2 / (2 beta)   dd/da_i = (|x| < beta ? x / beta
                              : |x| - beta / 2)                                : sign(x)) / D
    cosine     d = 1 - c,  c = <a, b> / (a' b'),  a' = max(|a|, 1e-8), b' = max(|b|, 1e-8)
               dd/da = c a / (a' |a|) - b / (a' b'),  dd/db = c b / (b' |b|) - a / (a' b')
               (a term with |a| = 0 is 0, as in F.cosine_similarity's autograd)

and dd/db = -dd/da for the first three. The forward writes only the per-row terms (2, rows):
terms[0] = d(forward_pred, target), terms[1] = d(cycle_pred, source). The backward reads the
four inputs again, recomputes the derivatives and writes the gradients directly:
d input[r, :] = grad_terms[k, r] * dd/d input[r, :] in the inputs' dtype (accumulated in acc,
rounded once), only for the inputs asked for (NEED_*); the symmetric distances compute the
derivative once for both inputs of a pair. Rows excluded by ``mask`` are never read (neither
the inputs nor grad_terms): their terms and every gradient are 0 whatever they hold (NaN
included).

Layout: a (row blocks, 2) grid; axis 1 picks the pair (0: forward_pred/target, 1: cycle_pred/
source). A program owns BLOCK_ROWS rows of its pair and loops over D in chunks of BLOCK_D, so
each input element is read once. Cosine's backward needs the row's dot and norms before its
gradients: when D fits one chunk the row stays in registers between the two, otherwise a
second loop re-reads the row.
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
_FWD_TILE = 2048             # elements per program tile, forward (two inputs live)
_BWD_TILE = 4096             # elements per program tile, backward (two inputs, two gradients live)
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
def _cosine_sums(a_ptr, b_ptr, base, keep, D, ACC: tl.constexpr, BLOCK_D: tl.constexpr):
    """Each row's <a, b>, |a|^2, |b|^2 over D in chunks of BLOCK_D (0 for excluded rows)."""
    keep2 = keep[:, None]
    cols0 = tl.arange(0, BLOCK_D)[None, :]
    dot = tl.zeros(keep.shape, dtype=ACC)
    n2a = tl.zeros(keep.shape, dtype=ACC)
    n2b = tl.zeros(keep.shape, dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        a, b = _load_pair(a_ptr, b_ptr, base + d0 + cols0, keep2 & (d0 + cols0 < D), ACC)
        dot += tl.sum(a * b, axis=1)
        n2a += tl.sum(a * a, axis=1)
        n2b += tl.sum(b * b, axis=1)
    return dot, n2a, n2b


@triton.jit
def _pair_forward(
    a_ptr, b_ptr,   # (n_rows, D) inputs of this pair (forward_pred, target | cycle_pred, source)
    t_ptr,          # (n_rows,) accumulation dtype: this pair's row of terms, written
    rows, row_ok, keep, D, beta, inv_beta,
    DIST: tl.constexpr, BLOCK_D: tl.constexpr,
):
    ACC = t_ptr.dtype.element_ty
    base = rows[:, None] * D
    if DIST == 3:
        dot, n2a, n2b = _cosine_sums(a_ptr, b_ptr, base, keep, D, ACC, BLOCK_D)
        term, _, _, _ = _cosine_row(dot, n2a, n2b)
    else:
        keep2 = keep[:, None]
        cols0 = tl.arange(0, BLOCK_D)[None, :]
        inv_d = 1.0 / (tl.zeros(keep.shape, dtype=ACC) + D)
        total = tl.zeros(keep.shape, dtype=ACC)
        for d0 in range(0, D, BLOCK_D):
            a, b = _load_pair(a_ptr, b_ptr, base + d0 + cols0, keep2 & (d0 + cols0 < D), ACC)
            value, _ = _symmetric_elem(a - b, beta, inv_beta, DIST)
            total += tl.sum(value, axis=1)  # unread elements are a = b = 0: value 0
        term = total * inv_d
    tl.store(t_ptr + rows, tl.where(keep, term, 0.0), mask=row_ok)


@triton.jit(do_not_specialize=["n_rows", "beta_hi", "beta_lo"])
def _cycle_fwd_kernel(
    fp_ptr, tg_ptr, cp_ptr, src_ptr,   # (n_rows, D) float16/bfloat16/float32/float64, one dtype
    mask_ptr,     # (n_rows,) uint8 (a bool mask viewed), 1 = include; read only when HAS_MASK
    terms_ptr,    # (2, n_rows) accumulation dtype (float32, float64 for float64), written
    n_rows,       # number of rows (the product of the leading dims)
    D,            # row length (the last dim)
    beta_hi, beta_lo,          # smooth_l1's beta = beta_hi + beta_lo (float args are float32)
    DIST: tl.constexpr,        # 0 mse, 1 l1, 2 smooth_l1, 3 cosine
    HAS_MASK: tl.constexpr,
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
        _pair_forward(fp_ptr, tg_ptr, terms_ptr, rows, row_ok, keep, D, beta, inv_beta, DIST,
                      BLOCK_D)
    else:
        _pair_forward(cp_ptr, src_ptr, terms_ptr + n_rows, rows, row_ok, keep, D, beta, inv_beta,
                      DIST, BLOCK_D)


@triton.jit
def _store_cosine_grads(da_ptr, db_ptr, offs, io, keep2, a, b, self_a, self_b, cross,
                        NEED_A: tl.constexpr, NEED_B: tl.constexpr):
    """d a = self_a a + cross b, d b = cross a + self_b b (coefficients already scaled by the
    row's upstream gradient), 0 at excluded rows, in the outputs' dtype."""
    if NEED_A:
        ga = self_a[:, None] * a + cross[:, None] * b
        tl.store(da_ptr + offs, tl.where(keep2, ga, 0.0).to(da_ptr.dtype.element_ty), mask=io)
    if NEED_B:
        gb = cross[:, None] * a + self_b[:, None] * b
        tl.store(db_ptr + offs, tl.where(keep2, gb, 0.0).to(db_ptr.dtype.element_ty), mask=io)


@triton.jit
def _pair_backward(
    g_ptr,           # (n_rows,) accumulation dtype: this pair's row of grad_terms
    a_ptr, b_ptr,    # (n_rows, D) inputs of this pair
    da_ptr, db_ptr,  # (n_rows, D) inputs' dtype: d input a, d input b, written when NEED_A / NEED_B
    rows, row_ok, keep, D, beta, inv_beta,
    DIST: tl.constexpr, NEED_A: tl.constexpr, NEED_B: tl.constexpr, ONE_CHUNK: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    if NEED_A or NEED_B:
        ACC = g_ptr.dtype.element_ty
        keep2 = keep[:, None]
        g = tl.load(g_ptr + rows, mask=keep, other=0.0)   # excluded rows: not read
        base = rows[:, None] * D
        cols0 = tl.arange(0, BLOCK_D)[None, :]
        if DIST == 3 and ONE_CHUNK:  # the whole row in registers: one read
            io, rd = row_ok[:, None] & (cols0 < D), keep2 & (cols0 < D)
            a, b = _load_pair(a_ptr, b_ptr, base + cols0, rd, ACC)
            _, self_a, self_b, cross = _cosine_row(
                tl.sum(a * b, axis=1), tl.sum(a * a, axis=1), tl.sum(b * b, axis=1))
            _store_cosine_grads(da_ptr, db_ptr, base + cols0, io, keep2, a, b, g * self_a,
                                g * self_b, g * cross, NEED_A, NEED_B)
        elif DIST == 3:  # first loop: dot and norms; second loop: the gradients
            dot, n2a, n2b = _cosine_sums(a_ptr, b_ptr, base, keep, D, ACC, BLOCK_D)
            _, self_a, self_b, cross = _cosine_row(dot, n2a, n2b)
            self_a, self_b, cross = g * self_a, g * self_b, g * cross
            for d0 in range(0, D, BLOCK_D):
                io, rd = row_ok[:, None] & (d0 + cols0 < D), keep2 & (d0 + cols0 < D)
                a, b = _load_pair(a_ptr, b_ptr, base + d0 + cols0, rd, ACC)
                _store_cosine_grads(da_ptr, db_ptr, base + d0 + cols0, io, keep2, a, b, self_a,
                                    self_b, cross, NEED_A, NEED_B)
        else:  # elementwise: one derivative for both inputs
            scale = (g * (1.0 / (tl.zeros(keep.shape, dtype=ACC) + D)))[:, None]  # g / D
            for d0 in range(0, D, BLOCK_D):
                offs = base + d0 + cols0
                io, rd = row_ok[:, None] & (d0 + cols0 < D), keep2 & (d0 + cols0 < D)
                a, b = _load_pair(a_ptr, b_ptr, offs, rd, ACC)
                _, grad = _symmetric_elem(a - b, beta, inv_beta, DIST)
                grad = tl.where(keep2, grad * scale, 0.0)
                if NEED_A:
                    tl.store(da_ptr + offs, grad.to(da_ptr.dtype.element_ty), mask=io)
                if NEED_B:
                    tl.store(db_ptr + offs, (-grad).to(db_ptr.dtype.element_ty), mask=io)


@triton.jit(do_not_specialize=["n_rows", "beta_hi", "beta_lo"])
def _cycle_bwd_kernel(
    gterms_ptr,   # (2, n_rows) accumulation dtype: dL / d terms
    fp_ptr, tg_ptr, cp_ptr, src_ptr,   # (n_rows, D) the forward's inputs, one dtype
    mask_ptr,     # (n_rows,) uint8, 1 = include; read only when HAS_MASK
    dfp_ptr, dtg_ptr, dcp_ptr, dsrc_ptr,   # (n_rows, D) inputs' dtype, written per NEED_*
    n_rows,
    D,
    beta_hi, beta_lo,          # smooth_l1's beta = beta_hi + beta_lo
    DIST: tl.constexpr,        # 0 mse, 1 l1, 2 smooth_l1, 3 cosine
    HAS_MASK: tl.constexpr,
    NEED_FP: tl.constexpr, NEED_TG: tl.constexpr, NEED_CP: tl.constexpr, NEED_SRC: tl.constexpr,
    ONE_CHUNK: tl.constexpr,   # D <= BLOCK_D
    INDEX_64: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    ACC = gterms_ptr.dtype.element_ty
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
        _pair_backward(gterms_ptr, fp_ptr, tg_ptr, dfp_ptr, dtg_ptr, rows, row_ok, keep, D, beta,
                       inv_beta, DIST, NEED_FP, NEED_TG, ONE_CHUNK, BLOCK_D)
    else:
        _pair_backward(gterms_ptr + n_rows, cp_ptr, src_ptr, dcp_ptr, dsrc_ptr, rows, row_ok,
                       keep, D, beta, inv_beta, DIST, NEED_CP, NEED_SRC, ONE_CHUNK, BLOCK_D)


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


def _check_inputs(forward_pred, target, cycle_pred, source, mask, distance, beta):
    """(contiguous inputs, mask, leading shape, D, beta), as check_cycle_loss_inputs in
    csrc/include/robustmm/cycle_loss_inputs.h."""
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
    return tuple(t.contiguous() for t in inputs), mask, lead, D, beta


def _beta_parts(distance: int, beta: float):
    """beta as two float32 kernel arguments whose sum keeps ~48 bits (float64 math)."""
    if distance != SMOOTH_L1:
        return 1.0, 0.0
    hi = float(torch.tensor(beta, dtype=torch.float32))
    return hi, beta - hi


@on_tensor_device
def cycle_loss_forward(forward_pred, target, cycle_pred, source, mask, distance: int, beta: float):
    """terms (2, ...): the schema of robustmm_C::cycle_loss_forward."""
    (fp, tg, cp, src), mask, lead, D, beta = _check_inputs(forward_pred, target, cycle_pred,
                                                           source, mask, distance, beta)
    n_rows = lead.numel()
    terms = torch.empty((2, *lead), dtype=acc_dtype(fp.dtype), device=fp.device)
    if n_rows == 0:
        return terms
    grid, block_rows, block_d, index64, num_warps = _launch_config(n_rows, D, _FWD_TILE)
    _cycle_fwd_kernel[grid](
        fp, tg, cp, src, mask.view(torch.uint8) if mask is not None else terms,
        terms, n_rows, D, *_beta_parts(distance, beta),
        DIST=distance, HAS_MASK=mask is not None, INDEX_64=index64, BLOCK_ROWS=block_rows,
        BLOCK_D=block_d, num_warps=num_warps)
    return terms


@on_tensor_device
def cycle_loss_backward(grad_terms, forward_pred, target, cycle_pred, source, mask,
                        distance: int, beta: float, need_grad: int):
    """(d forward_pred, d target, d cycle_pred, d source) in the inputs' dtype, numel 0 where
    the need_grad bit (1, 2, 4, 8) is clear. The schema of robustmm_C::cycle_loss_backward."""
    (fp, tg, cp, src), mask, lead, D, beta = _check_inputs(forward_pred, target, cycle_pred,
                                                           source, mask, distance, beta)
    if isinstance(need_grad, bool) or not 0 <= int(need_grad) <= 15:
        raise ValueError(f"robustmm: need_grad must be a 4-bit mask (1 forward_pred, 2 target, "
                         f"4 cycle_pred, 8 source), got {need_grad}")
    acc = acc_dtype(fp.dtype)
    if not isinstance(grad_terms, torch.Tensor):
        raise TypeError(f"robustmm: grad_terms must be a tensor, got {type(grad_terms).__name__}")
    if grad_terms.dtype != acc:
        raise TypeError(f"robustmm: grad_terms must be {acc} (the dtype of the terms for "
                        f"{fp.dtype} forward_pred), got {grad_terms.dtype}")
    if grad_terms.device != fp.device:
        raise ValueError(f"robustmm: grad_terms and forward_pred must be on the same device, got "
                         f"{grad_terms.device} and {fp.device}")
    if grad_terms.shape != (2, *lead):
        raise ValueError(f"robustmm: grad_terms must have shape {(2, *lead)} (2, then the leading "
                         f"dims of forward_pred {tuple(fp.shape)}), got {tuple(grad_terms.shape)}")
    need = [bool(int(need_grad) & bit) for bit in (1, 2, 4, 8)]
    outs = [torch.empty(fp.shape if n else (0,), dtype=fp.dtype, device=fp.device) for n in need]
    n_rows = lead.numel()
    if n_rows == 0 or not any(need):
        return tuple(outs)
    grid, block_rows, block_d, index64, num_warps = _launch_config(n_rows, D, _BWD_TILE)
    dummy = next(o for o in outs if o.numel())
    _cycle_bwd_kernel[grid](
        grad_terms.contiguous(), fp, tg, cp, src,
        mask.view(torch.uint8) if mask is not None else grad_terms,
        *(o if o.numel() else dummy for o in outs), n_rows, D, *_beta_parts(distance, beta),
        DIST=distance, HAS_MASK=mask is not None, NEED_FP=need[0], NEED_TG=need[1],
        NEED_CP=need[2], NEED_SRC=need[3], ONE_CHUNK=D <= block_d, INDEX_64=index64,
        BLOCK_ROWS=block_rows, BLOCK_D=block_d, num_warps=num_warps)
    return tuple(outs)
