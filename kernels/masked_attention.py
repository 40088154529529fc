"""masked_cross_attention in Triton: flash-attention-2 forward and backward that skip the key
tiles of absent modalities.

Per (b, h), query row i and key j (acc = float32, float64 for float64 inputs):

    allowed(i, j) = key_keep[b, j] and (not is_causal or j <= i)          (top-left causal)
    s_ij   = scale <q_i, k_j>
    lse_i  = log sum_{allowed j} exp(s_ij)          (-inf for a row with no allowed key)
    P_ij   = exp(s_ij - lse_i) where allowed, else 0
    Z_ij   = (u_n >= dropout_p),  n = ((b H + h) Lq + i) Lk + j,
             u_n = component (n & 3) of tl.rand4x(seed, n >> 2)    (1 when dropout_p == 0)
    out_i  = sum_j P_ij Z_ij / (1 - p) v_j          (0 for a row with no allowed key)

(dropout_p and the factor 1 / (1 - p) are float32 for every dtype, as in the reference and the
C++ kernels, so that all backends drop the same elements and scale them alike.)

Forward: online softmax over key tiles (running max m_i, running sum l_i of the undropped
exp(s - m_i), accumulator of the dropped ones); lse_i = m_i + log l_i.

Backward (dO = grad_out), recomputing P from q, k and the saved lse:

    D_i  = sum_d dO_id O_id
    dV   = (P Z / (1-p))^T dO,     dP = dO V^T,     dS = P (dP Z / (1-p) - D)
    dQ   = scale dS K,             dK = scale dS^T Q

Layout: four launches, no atomics. Forward: grid (B H, cdiv(Lq, BLOCK_M)), a program owns a
query block and loops over key blocks. Backward: D = rowsum(dO O) (one program per row block);
dK/dV: grid (B H, cdiv(Lk, BLOCK_N)), a program owns a key block and loops over query blocks,
its tiles computed transposed (keys x rows: s^T = K Q^T) so that only loaded tiles are
transposed; dQ: grid (B H, cdiv(Lq, BLOCK_M)), looping over key blocks like the forward.
BLOCK_D is the next power of two >= max(d, 16), its padding masked (any head dim works; 80 pays
for 128). Blocks (fp16/bf16): forward 64 x 64, dK/dV 32 x 64, dQ 64 x 32, halved for fp32/fp64
(quartered from d > 64) so that the kernels compile for sm_90 without spilling registers.

Tile skipping (compute falls as modalities go missing): the wrapper splits the keys into blocks
of BLOCK_N and builds, with torch ops, per sample b the ascending list of key blocks holding at
least one kept key (tiles, (B, NB) int32, kept blocks first) and its prefix count (cum,
(B, NB + 1) int32; cum[b, t] = kept blocks among the first t). A query-block program loops over
the first cum[b, NB] entries of its sample's list only (causal: the first cum[b, t_hi], the kept
blocks left of the diagonal); a key-block program whose block holds no kept key writes zero
dK/dV without reading anything. Inside a visited tile, keys that are not kept are masked at load
(never read, so NaN there cannot leak) and their scores set to -inf.

Dropout is regenerated in every kernel from (seed, n), never stored. When Lk % 4 == 0 a tile
makes one Philox call per 4 elements and interleaves the four outputs (as kernels/reparam_kl.py);
otherwise each element makes its own call and picks its component. The seed (< 2^64) goes to
Triton's Philox whole: tl.philox splits it into the key (low 32, high 32), as
reference/philox.py and csrc/include/robustmm/philox.h do.

Precision: dots accumulate in fp32 (fp64 for fp64 inputs). float16/bfloat16 tiles enter the
dots in their own dtype (P and dS rounded to it, as flash-attention); float32 dots use IEEE fp32
(_FP32_DOT_PRECISION, "tf32" trades accuracy for tensor cores); float64 uses fp64 dots, on
CPU tensors under TRITON_INTERPRET=1 only: Triton compiles no float64 tl.dot at these tiles
for CUDA, so the wrappers refuse float64 CUDA tensors (TypeError) before any compile.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._device import on_tensor_device

__all__ = ["masked_attention_forward", "masked_attention_backward"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# Launch heuristics (module-level so tests can shrink them to get several tiles at tiny shapes).
_FWD_BLOCK_M = 64            # query rows per forward program
_FWD_BLOCK_N = 64            # keys per forward tile
_DKDV_BLOCK_M = 32           # query rows per inner step of the dK/dV kernel
_DKDV_BLOCK_N = 64           # keys per dK/dV program
_DQ_BLOCK_M = 64             # query rows per dQ program
_DQ_BLOCK_N = 32             # keys per inner step of the dQ kernel
_DELTA_TILE = 4096           # elements per program of the D = rowsum(dO * O) kernel
_MIN_BLOCK = 16              # tl.dot's smallest M, N and K on NVIDIA GPUs
_FP32_DOT_PRECISION = "ieee"  # float32 inputs: "ieee" (matches the reference), or "tf32"
_INDEX64_LIMIT = 2**31       # int64 offsets and dropout counters once padded indices may reach this


# Arguments that vary from call to call (the lengths, B H Lq rows, the seed): not specialised
# (Triton would otherwise compile one kernel per residue mod 16 and for == 1), so that
# variable-length training compiles once per block size. H and d stay specialised (fixed by
# the model; d's divisibility lets the loads vectorise).
_VARYING = ["Lq", "Lk", "NB", "seed"]


# ---- kernels ----

@triton.jit
def _dropout_keep(seed, first, p_drop, Lk, BLOCK_N: tl.constexpr):
    """(ROWS, BLOCK_N) bool Z of a tile whose row r starts at flat index first[r] (a row of
    Lk keys, from a multiple of BLOCK_N): element n = first[r] + c is kept when component
    (n & 3) of tl.rand4x(seed, n >> 2) is >= p_drop.

    Lk % 4 == 0 (then first % 4 == 0 everywhere): one Philox call per 4 elements, the outputs
    interleaved to u1, u2, u3, u4, u1, ...  Otherwise one call per element. A runtime branch,
    uniform over the program, rather than a constexpr: the key length's residue must not
    compile another kernel (issue 14.8). Both paths give the same stream.
    """
    if Lk % 4 == 0:
        groups = tl.arange(0, BLOCK_N // 4)
        counter = (first >> 2)[:, None] + groups[None, :]            # (ROWS, BLOCK_N // 4)
        u1, u2, u3, u4 = tl.rand4x(seed, counter)
        u = tl.interleave(tl.interleave(u1, u3), tl.interleave(u2, u4))
    else:
        # names of their own: Triton types every name the two branches share, and the grouped
        # u1..u4 are (ROWS, BLOCK_N // 4) where these are (ROWS, BLOCK_N)
        flat = first[:, None] + tl.arange(0, BLOCK_N)[None, :]      # (ROWS, BLOCK_N)
        e1, e2, e3, e4 = tl.rand4x(seed, flat >> 2)
        c = flat & 3
        u = tl.where(c == 0, e1, tl.where(c == 1, e2, tl.where(c == 2, e3, e4)))
    return u >= p_drop


@triton.jit
def _key_block(t, b, NB, tiles_ptr, HAS_KEEP: tl.constexpr):
    """Index of the t-th visited key block of sample b (the t-th kept one when HAS_KEEP)."""
    if HAS_KEEP:
        return tl.load(tiles_ptr + b * NB + t)
    else:
        return t


@triton.jit
def _visited_blocks(b, NB, hi, cum_ptr, HAS_KEEP: tl.constexpr, IS_CAUSAL: tl.constexpr,
                    BLOCK_N: tl.constexpr):
    """How many key blocks a query block of sample b visits: those left of `hi` (causal), of
    those only the kept ones (HAS_KEEP; the kept list is ascending, so a prefix)."""
    if IS_CAUSAL:
        nb_hi = tl.minimum(tl.cdiv(hi, BLOCK_N), NB)
    else:
        nb_hi = NB
    if HAS_KEEP:
        return tl.load(cum_ptr + b * (NB + 1) + nb_hi)
    else:
        return nb_hi


@triton.jit(do_not_specialize=_VARYING)
def _attn_fwd_kernel(
    q_ptr,        # (B, H, Lq, d) float16/bfloat16/float32/float64
    k_ptr,        # (B, H, Lk, d) like q
    v_ptr,        # (B, H, Lk, d) like q
    keep_ptr,     # (B, Lk) uint8 (a bool mask viewed), 1 = key may be attended; when HAS_KEEP
    tiles_ptr,    # (B, NB) int32: the key blocks with a kept key, ascending, first; when HAS_KEEP
    cum_ptr,      # (B, NB + 1) int32: cum[b, t] = kept blocks among the first t; when HAS_KEEP
    out_ptr,      # (B, H, Lq, d) like q, written
    lse_ptr,      # (B, H, Lq) accumulation dtype (float32, float64 for float64), written
    H, Lq, Lk, d,
    NB,           # key blocks: cdiv(Lk, BLOCK_N)
    scale_hi, scale_lo,        # scale = scale_hi + scale_lo (float args are float32)
    p_drop,                    # dropout_p (float32, as the reference's comparison)
    rescale,                   # 1 / (1 - dropout_p) rounded to float32 (every backend's factor)
    seed,                      # Philox key, [0, 2^64); used only when HAS_DROPOUT
    HAS_KEEP: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    INDEX_64: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    ACC = lse_ptr.dtype.element_ty
    IN = q_ptr.dtype.element_ty
    bh = tl.program_id(0)  # B H on axis 0 (limit 2^31 - 1; axis 1 stops at 65535)
    pid_m = tl.program_id(1)
    b = bh // H
    if INDEX_64:
        bh = bh.to(tl.int64)
    scale = (tl.zeros((1, 1), dtype=ACC) + scale_hi) + scale_lo
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < Lq
    d_ok = offs_d < d
    rows = bh * Lq + offs_m                                          # (BLOCK_M,) row of (B H Lq)
    q = tl.load(q_ptr + rows[:, None] * d + offs_d[None, :], mask=m_ok[:, None] & d_ok[None, :],
                other=0.0)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=ACC)
    l_i = tl.zeros((BLOCK_M,), dtype=ACC)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=ACC)
    hi = Lk
    if IS_CAUSAL:
        hi = tl.minimum(Lk, (pid_m + 1) * BLOCK_M)                   # keys j <= the last row
    n_visit = _visited_blocks(b, NB, hi, cum_ptr, HAS_KEEP, IS_CAUSAL, BLOCK_N)
    kv_base = bh * Lk
    for t in range(0, n_visit):
        start_n = _key_block(t, b, NB, tiles_ptr, HAS_KEEP) * BLOCK_N
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kv_ok = offs_n < Lk
        if HAS_KEEP:
            kv_ok = kv_ok & (tl.load(keep_ptr + b * Lk + offs_n, mask=kv_ok, other=0) != 0)
        kv_offs = (kv_base + offs_n)[:, None] * d + offs_d[None, :]
        kv_mask = kv_ok[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + kv_offs, mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION, out_dtype=ACC) * scale
        allowed = kv_ok[None, :]
        if IS_CAUSAL:
            allowed = allowed & (offs_n[None, :] <= offs_m[:, None])
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)       # a row with no key yet
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if HAS_DROPOUT:
            z = _dropout_keep(seed, rows * Lk + start_n, p_drop, Lk, BLOCK_N)
            p = tl.where(z, p * rescale, 0.0)
        v = tl.load(v_ptr + kv_offs, mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(IN), v, input_precision=DOT_PRECISION,
                                            out_dtype=ACC)
        m_i = m_new
    has_key = l_i > 0.0
    lse = tl.where(has_key, m_i + tl.log(tl.where(has_key, l_i, 1.0)), float("-inf"))
    out = tl.where(has_key[:, None], acc / tl.where(has_key, l_i, 1.0)[:, None], 0.0)
    tl.store(lse_ptr + rows, lse, mask=m_ok)
    tl.store(out_ptr + rows[:, None] * d + offs_d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=m_ok[:, None] & d_ok[None, :])


@triton.jit(do_not_specialize=["n_rows"])
def _attn_bwd_delta_kernel(
    out_ptr,      # (B H Lq, d) like q: the forward's output
    do_ptr,       # (B H Lq, d) like q: grad_out
    delta_ptr,    # (B H Lq,) accumulation dtype, written: D_i = sum_d dO_id O_id
    n_rows, d,
    INDEX_64: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    ACC = delta_ptr.dtype.element_ty
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    if INDEX_64:
        rows = rows.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = rows < n_rows
    mask = m_ok[:, None] & (offs_d < d)[None, :]
    offs = rows[:, None] * d + offs_d[None, :]
    o = tl.load(out_ptr + offs, mask=mask, other=0.0).to(ACC)
    do = tl.load(do_ptr + offs, mask=mask, other=0.0).to(ACC)
    tl.store(delta_ptr + rows, tl.sum(o * do, axis=1), mask=m_ok)


@triton.jit(do_not_specialize=_VARYING)
def _attn_bwd_dkdv_kernel(
    q_ptr,        # (B, H, Lq, d)
    k_ptr,        # (B, H, Lk, d) like q
    v_ptr,        # (B, H, Lk, d) like q
    do_ptr,       # (B, H, Lq, d) like q: grad_out
    lse_ptr,      # (B, H, Lq) accumulation dtype: the forward's log-sum-exp
    delta_ptr,    # (B, H, Lq) accumulation dtype: D
    keep_ptr,     # (B, Lk) uint8, 1 = key may be attended; when HAS_KEEP
    cum_ptr,      # (B, NB + 1) int32: prefix counts of kept key blocks (of BLOCK_N); when HAS_KEEP
    dk_ptr,       # (B, H, Lk, d) like q, written
    dv_ptr,       # (B, H, Lk, d) like q, written
    H, Lq, Lk, d,
    NB,
    scale_hi, scale_lo,
    p_drop,
    rescale,
    seed,
    HAS_KEEP: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    INDEX_64: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,     # query rows per inner step
    BLOCK_N: tl.constexpr,     # keys of this program
    BLOCK_D: tl.constexpr,
):
    ACC = lse_ptr.dtype.element_ty
    IN = q_ptr.dtype.element_ty
    bh = tl.program_id(0)  # B H on axis 0 (limit 2^31 - 1; axis 1 stops at 65535)
    pid_n = tl.program_id(1)
    b = bh // H
    if INDEX_64:
        bh = bh.to(tl.int64)
    scale = (tl.zeros((1, 1), dtype=ACC) + scale_hi) + scale_lo
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < d
    kv_ok = offs_n < Lk
    m_end = Lq
    if HAS_KEEP:
        kv_ok = kv_ok & (tl.load(keep_ptr + b * Lk + offs_n, mask=kv_ok, other=0) != 0)
        block_kept = tl.load(cum_ptr + b * (NB + 1) + pid_n + 1) - tl.load(cum_ptr + b * (NB + 1) + pid_n)
        m_end = tl.where(block_kept > 0, Lq, 0)                     # no kept key: no work
    kv_offs = (bh * Lk + offs_n)[:, None] * d + offs_d[None, :]
    kv_mask = kv_ok[:, None] & d_ok[None, :]
    k = tl.load(k_ptr + kv_offs, mask=kv_mask, other=0.0)
    v = tl.load(v_ptr + kv_offs, mask=kv_mask, other=0.0)
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=ACC)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=ACC)
    m_start = 0
    if IS_CAUSAL:
        m_start = (start_n // BLOCK_M) * BLOCK_M                    # rows i >= start_n
    for start_m in range(m_start, m_end, BLOCK_M):
        # the tile is computed transposed, (keys, rows), so that no computed tensor is transposed
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_ok = offs_m < Lq
        rows = bh * Lq + offs_m
        qT = tl.load(q_ptr + rows[None, :] * d + offs_d[:, None],
                     mask=d_ok[:, None] & m_ok[None, :], other=0.0)     # (BLOCK_D, BLOCK_M)
        do = tl.load(do_ptr + rows[:, None] * d + offs_d[None, :],
                     mask=m_ok[:, None] & d_ok[None, :], other=0.0)     # (BLOCK_M, BLOCK_D)
        lse = tl.load(lse_ptr + rows, mask=m_ok, other=0.0)
        lse = tl.where(lse == float("-inf"), float("inf"), lse)     # a row with no key: P = 0
        delta = tl.load(delta_ptr + rows, mask=m_ok, other=0.0)
        sT = tl.dot(k, qT, input_precision=DOT_PRECISION, out_dtype=ACC) * scale
        allowed = kv_ok[:, None] & m_ok[None, :]
        if IS_CAUSAL:
            allowed = allowed & (offs_n[:, None] <= offs_m[None, :])
        pT = tl.where(allowed, tl.exp(sT - lse[None, :]), 0.0)      # (BLOCK_N, BLOCK_M)
        dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION, out_dtype=ACC)
        if HAS_DROPOUT:
            z = tl.trans(_dropout_keep(seed, rows * Lk + start_n, p_drop, Lk, BLOCK_N))
            pdT = tl.where(z, pT * rescale, 0.0)
            dpT = tl.where(z, dpT * rescale, 0.0)
        else:
            pdT = pT
        dv += tl.dot(pdT.to(IN), do, input_precision=DOT_PRECISION, out_dtype=ACC)
        dsT = pT * (dpT - delta[None, :])
        dk += tl.dot(dsT.to(IN), tl.trans(qT), input_precision=DOT_PRECISION, out_dtype=ACC)
    io = (offs_n < Lk)[:, None] & d_ok[None, :]
    tl.store(dk_ptr + kv_offs, (dk * scale).to(dk_ptr.dtype.element_ty), mask=io)
    tl.store(dv_ptr + kv_offs, dv.to(dv_ptr.dtype.element_ty), mask=io)


@triton.jit(do_not_specialize=_VARYING)
def _attn_bwd_dq_kernel(
    q_ptr,        # (B, H, Lq, d)
    k_ptr,        # (B, H, Lk, d) like q
    v_ptr,        # (B, H, Lk, d) like q
    do_ptr,       # (B, H, Lq, d) like q: grad_out
    lse_ptr,      # (B, H, Lq) accumulation dtype
    delta_ptr,    # (B, H, Lq) accumulation dtype: D
    keep_ptr,     # (B, Lk) uint8, 1 = key may be attended; when HAS_KEEP
    tiles_ptr,    # (B, NB) int32: kept key blocks (of BLOCK_N) first, ascending; when HAS_KEEP
    cum_ptr,      # (B, NB + 1) int32: their prefix counts; when HAS_KEEP
    dq_ptr,       # (B, H, Lq, d) like q, written
    H, Lq, Lk, d,
    NB,
    scale_hi, scale_lo,
    p_drop,
    rescale,
    seed,
    HAS_KEEP: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    INDEX_64: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,     # query rows of this program
    BLOCK_N: tl.constexpr,     # keys per inner step
    BLOCK_D: tl.constexpr,
):
    ACC = lse_ptr.dtype.element_ty
    IN = q_ptr.dtype.element_ty
    bh = tl.program_id(0)  # B H on axis 0 (limit 2^31 - 1; axis 1 stops at 65535)
    pid_m = tl.program_id(1)
    b = bh // H
    if INDEX_64:
        bh = bh.to(tl.int64)
    scale = (tl.zeros((1, 1), dtype=ACC) + scale_hi) + scale_lo
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < Lq
    d_ok = offs_d < d
    rows = bh * Lq + offs_m
    qo_offs = rows[:, None] * d + offs_d[None, :]
    qo_mask = m_ok[:, None] & d_ok[None, :]
    q = tl.load(q_ptr + qo_offs, mask=qo_mask, other=0.0)
    do = tl.load(do_ptr + qo_offs, mask=qo_mask, other=0.0)
    lse = tl.load(lse_ptr + rows, mask=m_ok, other=0.0)
    lse = tl.where(lse == float("-inf"), float("inf"), lse)
    delta = tl.load(delta_ptr + rows, mask=m_ok, other=0.0)
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=ACC)
    hi = Lk
    if IS_CAUSAL:
        hi = tl.minimum(Lk, (pid_m + 1) * BLOCK_M)
    n_visit = _visited_blocks(b, NB, hi, cum_ptr, HAS_KEEP, IS_CAUSAL, BLOCK_N)
    kv_base = bh * Lk
    for t in range(0, n_visit):
        start_n = _key_block(t, b, NB, tiles_ptr, HAS_KEEP) * BLOCK_N
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kv_ok = offs_n < Lk
        if HAS_KEEP:
            kv_ok = kv_ok & (tl.load(keep_ptr + b * Lk + offs_n, mask=kv_ok, other=0) != 0)
        kv_offs = (kv_base + offs_n)[:, None] * d + offs_d[None, :]
        kv_mask = kv_ok[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + kv_offs, mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + kv_offs, mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION, out_dtype=ACC) * scale
        allowed = m_ok[:, None] & kv_ok[None, :]
        if IS_CAUSAL:
            allowed = allowed & (offs_n[None, :] <= offs_m[:, None])
        p = tl.where(allowed, tl.exp(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION, out_dtype=ACC)
        if HAS_DROPOUT:
            z = _dropout_keep(seed, rows * Lk + start_n, p_drop, Lk, BLOCK_N)
            dp = tl.where(z, dp * rescale, 0.0)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(IN), k, input_precision=DOT_PRECISION, out_dtype=ACC)
    tl.store(dq_ptr + qo_offs, (dq * scale).to(dq_ptr.dtype.element_ty), mask=qo_mask)


# ---- host side ----

def _check_qkv(q, k, v):
    if not isinstance(q, torch.Tensor) or q.dtype not in _DTYPES:
        got = q.dtype if isinstance(q, torch.Tensor) else type(q).__name__
        raise TypeError(f"robustmm: the triton masked_attention kernel supports float16, bfloat16, "
                        f"float32 and float64 q, got {got}")
    if q.dtype == torch.float64 and q.is_cuda:
        raise TypeError("robustmm: float64 is not supported by the Triton attention kernels: "
                        "Triton compiles no float64 tl.dot at these tiles for CUDA (MMAv2: "
                        "'Currently fp64 don't support largeK MMA'); float64 CUDA attention runs "
                        "on the reference backend (what 'auto' picks), or cast to float32")
    for name, t in (("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"robustmm: {name} must be a tensor, got {type(t).__name__}")
        if t.dtype != q.dtype:
            raise TypeError(f"robustmm: {name} and q must have the same dtype, got {t.dtype} and {q.dtype}")
        if t.device != q.device:
            raise ValueError(f"robustmm: {name} and q must be on the same device, got {t.device} and {q.device}")
    if q.dim() != 4:
        raise ValueError(f"robustmm: q must have shape (B, H, Lq, d), got {tuple(q.shape)}")
    B, H, _, d = q.shape
    if k.dim() != 4 or k.shape[0] != B or k.shape[1] != H or k.shape[3] != d:
        raise ValueError(f"robustmm: k must have shape (B={B}, H={H}, Lk, d={d}) to match q, got "
                         f"{tuple(k.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"robustmm: v must have the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")


def _check_options(q, k, key_keep, is_causal, dropout_p, scale, seed):
    B, Lk = q.shape[0], k.shape[2]
    if key_keep is not None:
        if not isinstance(key_keep, torch.Tensor) or key_keep.dtype != torch.bool:
            got = key_keep.dtype if isinstance(key_keep, torch.Tensor) else type(key_keep).__name__
            raise TypeError(f"robustmm: key_keep must be a bool tensor (True = attend), got {got}")
        if key_keep.shape != (B, Lk):
            raise ValueError(f"robustmm: key_keep must have shape (B={B}, Lk={Lk}), got "
                             f"{tuple(key_keep.shape)}")
        if key_keep.device != q.device:
            raise ValueError(f"robustmm: key_keep and q must be on the same device, got "
                             f"{key_keep.device} and {q.device}")
    if not isinstance(is_causal, bool):
        raise TypeError(f"robustmm: is_causal must be a bool, got {type(is_causal).__name__}")
    dropout_p, scale = float(dropout_p), float(scale)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"robustmm: dropout_p must be in [0, 1), got {dropout_p}")
    if not math.isfinite(scale):
        raise ValueError(f"robustmm: scale must be finite, got {scale}")
    if not 0 <= int(seed) < 2**64:
        raise ValueError(f"robustmm: seed must be in [0, 2^64), got {seed}")
    return dropout_p, scale, int(seed)


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _split(x: float) -> tuple[float, float]:
    """(hi, lo): hi is x rounded to float32 and hi + lo carries x to ~48 bits (a float64 kernel
    adds them; a float32 one gets hi)."""
    hi = float(torch.tensor(x, dtype=torch.float32))
    return hi, x - hi


def _block(cap: int, length: int) -> int:
    """A power-of-two block in [_MIN_BLOCK, cap], no wider than the length needs."""
    return max(_MIN_BLOCK, min(cap, triton.next_power_of_2(max(length, 1))))


def _block_d(d: int) -> int:
    return max(_MIN_BLOCK, triton.next_power_of_2(max(d, 1)))


def _cap(block: int, dtype, block_d: int) -> int:
    """Shrink a tile for wide elements so that it fits the registers without spilling (checked
    with ptxas for sm_90, dropout on): float32 (FMA dots) and float64 halve it for d <= 64 and
    quarter it beyond; float16/bfloat16 halve it beyond d = 128."""
    if dtype in (torch.float32, torch.float64):
        block //= 2 if block_d <= 64 else 4
    elif block_d > 128:
        block //= 2
    return max(_MIN_BLOCK, block)


def _num_warps(block_m: int, block_n: int, block_d: int) -> int:
    return 8 if max(block_m, block_n) * block_d >= 64 * 128 else 4


def _index64(BH: int, Lq_pad: int, Lk_pad: int, block_d: int, dropout: bool) -> bool:
    """Whether padded element offsets (or dropout's flat index) may reach _INDEX64_LIMIT."""
    biggest = BH * max(Lq_pad, Lk_pad) * block_d
    if dropout:
        biggest = max(biggest, BH * Lq_pad * Lk_pad)
    return biggest >= _INDEX64_LIMIT


def _key_tiles(key_keep, Lk: int, block_n: int):
    """(tiles (B, NB) int32, cum (B, NB + 1) int32) for key blocks of `block_n`: per sample the
    blocks holding a kept key, ascending, first; cum[b, t] = such blocks among the first t."""
    B = key_keep.shape[0]
    nb = triton.cdiv(Lk, block_n)
    padded = torch.zeros(B, nb * block_n, dtype=torch.bool, device=key_keep.device)
    padded[:, :Lk] = key_keep
    flags = padded.view(B, nb, block_n).any(dim=2)                   # (B, NB)
    tiles = torch.sort((~flags).to(torch.uint8), dim=1, stable=True).indices.to(torch.int32)
    cum = torch.zeros(B, nb + 1, dtype=torch.int32, device=key_keep.device)
    cum[:, 1:] = flags.to(torch.int32).cumsum(dim=1)
    return tiles.contiguous(), cum


def _dot_precision(dtype):
    return _FP32_DOT_PRECISION if dtype == torch.float32 else "ieee"


@on_tensor_device
def masked_attention_forward(q, k, v, key_keep, is_causal: bool, dropout_p: float, scale: float,
                             seed: int):
    """(out like q, lse (B, H, Lq) float32 / float64). The schema of
    robustmm_C::masked_attention_forward (key_keep None = every key kept)."""
    _check_qkv(q, k, v)
    dropout_p, scale, seed = _check_options(q, k, key_keep, is_causal, dropout_p, scale, seed)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    B, H, Lq, d = q.shape
    Lk = k.shape[2]
    acc = _acc_dtype(q.dtype)
    out = torch.empty_like(q)
    lse = torch.empty((B, H, Lq), dtype=acc, device=q.device)
    if out.numel() == 0 and lse.numel() == 0:
        return out, lse
    if Lk == 0:
        return out.zero_(), lse.fill_(float("-inf"))
    block_d = _block_d(d)
    block_m = _block(_cap(_FWD_BLOCK_M, q.dtype, block_d), Lq)
    block_n = _block(_cap(_FWD_BLOCK_N, q.dtype, block_d), Lk)
    nb = triton.cdiv(Lk, block_n)
    has_keep = key_keep is not None
    if has_keep:
        keep = key_keep.contiguous()
        tiles, cum = _key_tiles(keep, Lk, block_n)
        keep = keep.view(torch.uint8)
    else:
        keep = tiles = cum = lse  # unused
    has_dropout = dropout_p > 0.0
    scale_hi, scale_lo = _split(scale)
    rescale = _split(1.0 / (1.0 - dropout_p))[0]  # float32, as the reference and C++
    index64 = _index64(B * H, Lq + block_m, Lk + block_n, block_d, has_dropout)
    grid = (B * H, triton.cdiv(Lq, block_m))
    _attn_fwd_kernel[grid](
        q, k, v, keep, tiles, cum, out, lse,
        H, Lq, Lk, d, nb, scale_hi, scale_lo, dropout_p, rescale,
        seed if has_dropout else 0,
        HAS_KEEP=has_keep, IS_CAUSAL=is_causal, HAS_DROPOUT=has_dropout,
        INDEX_64=index64, DOT_PRECISION=_dot_precision(q.dtype), BLOCK_M=block_m,
        BLOCK_N=block_n, BLOCK_D=block_d, num_warps=_num_warps(block_m, block_n, block_d))
    return out, lse


@on_tensor_device
def masked_attention_backward(grad_out, q, k, v, out, lse, key_keep, is_causal: bool,
                              dropout_p: float, scale: float, seed: int):
    """(dq, dk, dv) like q, k, v: the schema of robustmm_C::masked_attention_backward.
    `out` and `lse` are the forward's outputs; dropout is regenerated from `seed`."""
    _check_qkv(q, k, v)
    dropout_p, scale, seed = _check_options(q, k, key_keep, is_causal, dropout_p, scale, seed)
    B, H, Lq, d = q.shape
    Lk = k.shape[2]
    acc = _acc_dtype(q.dtype)
    for name, t in (("grad_out", grad_out), ("out", out)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"robustmm: {name} must be a tensor, got {type(t).__name__}")
        if t.dtype != q.dtype:
            raise TypeError(f"robustmm: {name} and q must have the same dtype, got {t.dtype} and {q.dtype}")
        if t.device != q.device:
            raise ValueError(f"robustmm: {name} and q must be on the same device, got {t.device} and {q.device}")
        if t.shape != q.shape:
            raise ValueError(f"robustmm: {name} must have the shape of q {tuple(q.shape)}, got {tuple(t.shape)}")
    if not isinstance(lse, torch.Tensor) or lse.dtype != acc:
        got = lse.dtype if isinstance(lse, torch.Tensor) else type(lse).__name__
        raise TypeError(f"robustmm: lse must be {acc} for {q.dtype} q, got {got}")
    if lse.shape != (B, H, Lq) or lse.device != q.device:
        raise ValueError(f"robustmm: lse must have shape (B={B}, H={H}, Lq={Lq}) on {q.device}, got "
                         f"{tuple(lse.shape)} on {lse.device}")
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    grad_out, out, lse = grad_out.contiguous(), out.contiguous(), lse.contiguous()
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if d == 0 or B * H == 0 or Lq == 0 or Lk == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    block_d = _block_d(d)
    has_keep = key_keep is not None
    has_dropout = dropout_p > 0.0
    scale_hi, scale_lo = _split(scale)
    rescale = _split(1.0 / (1.0 - dropout_p))[0]  # float32, as the reference and C++
    seed = seed if has_dropout else 0
    precision = _dot_precision(q.dtype)

    delta = torch.empty((B, H, Lq), dtype=acc, device=q.device)
    n_rows = B * H * Lq
    tile = _DELTA_TILE // (2 if q.dtype == torch.float64 else 1)
    block_rows = max(1, min(tile // block_d, triton.next_power_of_2(n_rows)))
    _attn_bwd_delta_kernel[(triton.cdiv(n_rows, block_rows),)](
        out, grad_out, delta, n_rows, d,
        INDEX_64=(n_rows + block_rows) * block_d >= _INDEX64_LIMIT, BLOCK_M=block_rows,
        BLOCK_D=block_d, num_warps=4)

    keep = key_keep.contiguous() if has_keep else None
    common = dict(HAS_KEEP=has_keep, IS_CAUSAL=is_causal, HAS_DROPOUT=has_dropout,
                  DOT_PRECISION=precision, BLOCK_D=block_d)
    scalars = (scale_hi, scale_lo, dropout_p, rescale, seed)

    # dK, dV: one program per key block, looping over the query blocks
    block_m = _block(_cap(_DKDV_BLOCK_M, q.dtype, block_d), Lq)
    block_n = _block(_cap(_DKDV_BLOCK_N, q.dtype, block_d), Lk)
    nb = triton.cdiv(Lk, block_n)
    cum = _key_tiles(keep, Lk, block_n)[1] if has_keep else lse
    _attn_bwd_dkdv_kernel[(B * H, nb)](
        q, k, v, grad_out, lse, delta, keep.view(torch.uint8) if has_keep else lse, cum, dk, dv,
        H, Lq, Lk, d, nb, *scalars,
        INDEX_64=_index64(B * H, Lq + block_m, Lk + block_n, block_d, has_dropout),
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=_num_warps(block_m, block_n, block_d),
        **common)

    # dQ: one program per query block, looping over the kept key blocks
    block_m = _block(_cap(_DQ_BLOCK_M, q.dtype, block_d), Lq)
    block_n = _block(_cap(_DQ_BLOCK_N, q.dtype, block_d), Lk)
    nb = triton.cdiv(Lk, block_n)
    tiles, cum = _key_tiles(keep, Lk, block_n) if has_keep else (lse, lse)
    _attn_bwd_dq_kernel[(B * H, triton.cdiv(Lq, block_m))](
        q, k, v, grad_out, lse, delta, keep.view(torch.uint8) if has_keep else lse, tiles, cum,
        dq, H, Lq, Lk, d, nb, *scalars,
        INDEX_64=_index64(B * H, Lq + block_m, Lk + block_n, block_d, has_dropout),
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=_num_warps(block_m, block_n, block_d),
        **common)
    return dq, dk, dv
