"""gpu tier of masked_cross_attention: the `triton` backend (kernels/masked_attention.py) on CUDA
tensors against the oracle robustmm_fast.reference.masked_cross_attention run on the same CUDA
tensors in fp64 (DESIGN §4, §7), its raw kernel outputs against the C++ CPU kernel, and the
MaskedCrossModalAttention layer on CUDA against nn.MultiheadAttention.

    pytest -m gpu tests/test_masked_attention_gpu.py

On CUDA tensors this op has two backends, `triton` and `reference` (there is no CUDA C++ kernel):
every test names triton (`run_on("triton", OP)`) and fails if it did not run. When triton cannot
run CUDA tensors the tests skip, or fail under ROBUSTMM_REQUIRE_EXT=1.

Keys and values no query may attend to hold NaN / Inf wherever triton runs (the oracle gets the
clean tensors). Ground truth: the reference in fp64 on the inputs rounded to the tested dtype.
fp32/fp64: conftest's fixed tolerances. fp16/bf16: the error is at most 2x that of PyTorch's own
low-precision attention (matmuls and probabilities in the low dtype, flash-attention's
attention_ref(upcast=False)). Dropout: the op's seed is replayed (torch.manual_seed) and the
oracle drops the same elements (reference/philox.py's philox_uniform stream).
"""
from __future__ import annotations

import os
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from robustmm_fast import _backend
from robustmm_fast.ops.masked_attention import _kernel, _ReferenceKernel, masked_cross_attention
from robustmm_fast.reference import masked_attention as ref

import test_masked_attention as tma
from attention_oracles import allowed_of, eager_lowp
from conftest import (LOW_PRECISION, assert_close_dtype, late_copies_on_side_stream,
                      opcheck_kernel_op, require_cpp, run_on)
from test_masked_attention import DTYPE_IDS, OP, PRESENCE, make_inputs, poison, run
from test_masked_attention_layers import E, LENGTHS, _assert_same, _expand, _grads, _pair, _present, _qkv

pytestmark = pytest.mark.gpu

DEV = torch.device("cuda")
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# (B, H, Lq, key_lengths, d): test_masked_attention's (M = 1..4 segments, head dims 16/20/32/64/
# 80/128, Lq != Lk, nothing a tile multiple) and MulT-sized ones (3 modalities of 50 steps)
SHAPES = {
    **tma.SHAPES,
    "mult_d32": (8, 8, 50, (50, 50, 50), 32),
    "mult_d64": (8, 8, 50, (50, 50, 50), 64),
    "tiles": (2, 3, 130, (63, 1, 70, 129), 48),   # several 64-key tiles, segment edges inside
    "aligned4": (4, 2, 37, (13, 1, 29, 9), 32),   # Lk % 4 == 0: the grouped Philox path
    "long_q": (2, 2, 200, (17, 9), 32),           # Lq >> Lk
}
# the long case: no (Lq, Lk) score matrix may be stored (memory grows linearly in L)
LONG = (2, 4, 1000, (1000, 1000, 1000), 64)
LONG_HALF = (2, 4, 500, (500, 500, 500), 64)


@pytest.fixture(autouse=True)
def triton_on_cuda():
    """Skip (fail under ROBUSTMM_REQUIRE_EXT=1) unless triton can run masked_attention on CUDA."""
    why = _backend._unavailable_reason("triton", DEV, OP)
    if why is None and DEV.type == "cuda" and not torch.cuda.is_available():
        why = "no CUDA device is visible"
    if why is not None:
        msg = f"backend 'triton' cannot run {OP} on CUDA tensors: {why}"
        if os.environ.get("ROBUSTMM_REQUIRE_EXT", "0") == "1":
            pytest.fail(msg + " (ROBUSTMM_REQUIRE_EXT=1 requires it)", pytrace=False)
        pytest.skip(msg)


# ---------------------------------------------------------------- helpers

def inputs(shape, presence="random", seed=0):
    """test_masked_attention.make_inputs for a shape of this module, on the GPU: fp64 q, k, v,
    present (B, M) and key_lengths (a list)."""
    key = "_gpu_shape"
    with mock.patch.dict(tma.SHAPES, {key: SHAPES[shape] if isinstance(shape, str) else shape}):
        q, k, v, present, lengths = make_inputs(key, presence, seed=seed)
    return q.to(DEV), k.to(DEV), v.to(DEV), present.to(DEV), list(lengths)


def upstream_for(q, seed=7):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(q.shape, generator=gen, dtype=torch.float64).to(q.device)


def padding_for(B, Lk, seed=3, p=0.3):
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(B, Lk, generator=gen) < p).to(DEV)


def op_seed(s):
    """The dropout seed masked_cross_attention draws after torch.manual_seed(s)."""
    torch.manual_seed(s)
    return int(torch.randint(0, 2**62, (), dtype=torch.int64))


def keep_of(q, k, kw):
    return ref.key_keep_mask(q.shape[0], k.shape[2], kw.get("present"), kw.get("key_lengths"),
                             kw.get("key_padding_mask"), q.device)


def check(q, k, v, dtype, *, rng=1234, poison_absent=True, **kw):
    """The op on triton (unattended keys poisoned) vs the fp64 oracle on the same rounded
    inputs: the output and dq/dk/dv for a random upstream gradient. Rows with no key: output
    and dq exactly 0; keys nobody attends to: dk and dv exactly 0. Returns (out, grads)."""
    keep = keep_of(q, k, kw)
    upstream = upstream_for(q)
    kp, vp = poison(k, v, keep) if (poison_absent and keep is not None) else (k, v)
    seed_kw = {}
    if kw.get("dropout_p", 0.0) > 0:
        seed_kw = dict(seed=op_seed(rng))
        torch.manual_seed(rng)  # the op draws its seed from the default generator
    with run_on("triton", OP):
        out, grads = run(masked_cross_attention, q, kp, vp, dtype, upstream, **kw)
    rounded = [t.to(dtype).double() for t in (q, k, v)]
    truth, truth_grads = run(ref.masked_cross_attention, *rounded, torch.float64, upstream, **kw,
                             **seed_kw)
    lowp, lowp_grads = None, [None] * 3
    if dtype in LOW_PRECISION:
        lowp, lowp_grads = run(eager_lowp, q, k, v, dtype, upstream, **kw, **seed_kw)
    assert out.device.type == DEV.type and out.dtype == dtype and out.shape == q.shape
    assert torch.isfinite(out).all(), "non-finite output"
    assert_close_dtype(out, truth, "out", lowp)
    for name, g, t, lg, x in zip(("dq", "dk", "dv"), grads, truth_grads, lowp_grads, (q, k, v)):
        assert g.dtype == dtype and g.shape == x.shape, name
        assert torch.isfinite(g).all(), f"{name}: non-finite"
        assert_close_dtype(g, t, name, lg)
    allowed = allowed_of(q, k, keep, kw.get("is_causal", False))
    B, H, Lq, Lk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    empty = (~allowed.any(2))[:, None, :].expand(B, H, Lq)      # rows with no key
    assert (out[empty] == 0).all() and (grads[0][empty] == 0).all(), "a row with no key"
    dead = (~allowed.any(1))[:, None, :].expand(B, H, Lk)       # keys nobody attends to
    assert (grads[1][dead] == 0).all() and (grads[2][dead] == 0).all(), "an unattended key"
    return out, grads


# ---------------------------------------------------------------- values and gradients

@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("shape", SHAPES)
def test_values_and_gradients(shape, dtype):
    q, k, v, present, lengths = inputs(shape, "random", seed=1)
    check(q, k, v, dtype, present=present, key_lengths=lengths)


@pytest.mark.parametrize("is_causal", (False, True), ids=("full", "causal"))
@pytest.mark.parametrize("presence", PRESENCE)
@pytest.mark.parametrize("shape", ("mult_d32", "awkward", "tiles"))
def test_presence_patterns(shape, presence, is_causal):
    q, k, v, present, lengths = inputs(shape, presence, seed=2)
    out, grads = check(q, k, v, torch.float32, present=present, key_lengths=lengths,
                       is_causal=is_causal)
    if presence == "none":
        assert (out == 0).all() and not any(g.any() for g in grads)


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16), ids=DTYPE_IDS.get)
@pytest.mark.parametrize("with_present", (False, True), ids=("padding", "present+padding"))
@pytest.mark.parametrize("shape", ("mult_d64", "awkward", "d128"))
def test_key_padding_mask(shape, with_present, dtype):
    q, k, v, present, lengths = inputs(shape, "random", seed=3)
    padding = padding_for(k.shape[0], k.shape[2], seed=4)
    padding[0] = True  # a sample whose every key is padding
    kw = dict(present=present, key_lengths=lengths) if with_present else {}
    check(q, k, v, dtype, key_padding_mask=padding, scale=0.3, **kw)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=DTYPE_IDS.get)
@pytest.mark.parametrize("shape", ("mult_d32", "awkward", "one_segment"))
def test_causal(shape, dtype):
    """Top-left causal: cross (Lq != Lk), self (Lq == Lk) and Lq > Lk, with and without masks."""
    q, k, v, present, lengths = inputs(shape, "random", seed=5)
    check(q, k, v, dtype, is_causal=True)
    check(q, k, v, dtype, is_causal=True, present=present, key_lengths=lengths)
    B, H, _, d = q.shape
    Lk = k.shape[2]
    gen = torch.Generator().manual_seed(6)
    for Lq in (Lk, Lk + 37):
        qs = torch.randn(B, H, Lq, d, generator=gen, dtype=torch.float64).to(DEV)
        check(qs, k, v, dtype, is_causal=True, present=present, key_lengths=lengths)


@pytest.mark.parametrize("dropout_p", (0.0, 0.3))
@pytest.mark.parametrize("is_causal", (False, True), ids=("full", "causal"))
def test_fully_masked_rows(is_causal, dropout_p):
    """Samples with no modality, a sample all padding and (causal) rows before the first kept
    key: output and dq exactly 0, unattended keys get dk = dv = 0; the rest matches."""
    q, k, v, present, lengths = inputs("tiles", "random", seed=7)
    present[1] = False
    padding = torch.zeros(k.shape[0], k.shape[2], dtype=torch.bool, device=DEV)
    padding[0, :40] = True  # sample 0: causal rows 0..39 see no key
    out, grads = check(q, k, v, torch.float32, present=present, key_lengths=lengths,
                       key_padding_mask=padding, is_causal=is_causal, dropout_p=dropout_p)
    assert (out[1] == 0).all() and not grads[0][1].any()
    assert not grads[1][1].any() and not grads[2][1].any()
    if is_causal:
        assert (out[0, :, :40] == 0).all() and not grads[0][0, :, :40].any()
        assert out[0, :, 40:].any()


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16), ids=DTYPE_IDS.get)
@pytest.mark.parametrize("dropout_p", (0.0, 0.2))
@pytest.mark.parametrize("is_causal", (False, True), ids=("full", "causal"))
def test_nan_in_absent_keys_does_not_leak(is_causal, dropout_p, dtype):
    """NaN/Inf in the absent and padded keys and values leave the output and every gradient
    bitwise equal to the run with zeros there."""
    q, k, v, present, lengths = inputs("tiles", "random", seed=8)
    padding = padding_for(k.shape[0], k.shape[2], seed=9, p=0.2)
    kw = dict(present=present, key_lengths=lengths, key_padding_mask=padding,
              is_causal=is_causal, dropout_p=dropout_p)
    dead = ~keep_of(q, k, kw)[:, None, :, None].expand_as(k)
    upstream = upstream_for(q)

    def go(fill_k, fill_v):
        kk, vv = k.masked_fill(dead, fill_k), v.masked_fill(dead, fill_v)
        torch.manual_seed(10)
        with run_on("triton", OP):
            out, grads = run(masked_cross_attention, q, kk, vv, dtype, upstream, **kw)
        return [out, *grads]

    clean = go(0.0, 0.0)
    assert all(torch.isfinite(t).all() for t in clean)
    for fill in ((float("nan"), float("inf")), (float("inf"), float("nan")),
                 (float("-inf"), float("-inf"))):
        for name, a, b in zip(("out", "dq", "dk", "dv"), go(*fill), clean):
            assert torch.equal(a, b), f"{name}: {fill} in unattended keys changed the result"


# ---------------------------------------------------------------- dropout

@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("is_causal", (False, True), ids=("full", "causal"))
@pytest.mark.parametrize("shape", ("mult_d32", "aligned4"))  # Lk 150: per element; 52: grouped
def test_dropout_matches_reference_stream(shape, is_causal, dtype):
    """The op's seed replayed: the oracle drops the same elements (forward and backward)."""
    q, k, v, present, lengths = inputs(shape, "random", seed=11)
    kw = dict(present=present, key_lengths=lengths, is_causal=is_causal, dropout_p=0.3)
    out, _ = check(q, k, v, dtype, rng=2024, **kw)
    plain = ref.masked_cross_attention(q, k, v, present=present, key_lengths=lengths,
                                       is_causal=is_causal)
    assert not torch.allclose(out.double(), plain, atol=1e-2), "nothing was dropped"


def test_dropout_same_seed_same_result():
    q, k, v, present, lengths = inputs("mult_d32", "random", seed=12)
    upstream = upstream_for(q)
    kw = dict(present=present, key_lengths=lengths, dropout_p=0.5)
    results = []
    for s in (3, 3, 4):
        torch.manual_seed(s)
        with run_on("triton", OP):
            results.append(run(masked_cross_attention, q, k, v, torch.float32, upstream, **kw))
    (a, ga), (b, gb), (c, _) = results
    assert torch.equal(a, b) and all(torch.equal(x, y) for x, y in zip(ga, gb))
    assert not torch.equal(a, c), "another seed dropped the same elements"
    absent = ~present.any(1)
    assert absent.any() and (a[absent] == 0).all() and (ga[0][absent] == 0).all()


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=DTYPE_IDS.get)
def test_deterministic(dtype):
    """The same call twice gives bitwise the same output and gradients (no atomics)."""
    q, k, v, present, lengths = inputs("tiles", "random", seed=13)
    upstream = upstream_for(q)
    results = []
    for _ in range(2):
        with run_on("triton", OP):
            results.append(run(masked_cross_attention, q, k, v, dtype, upstream, present=present,
                               key_lengths=lengths, is_causal=True))
    assert torch.equal(results[0][0], results[1][0])
    assert all(torch.equal(x, y) for x, y in zip(results[0][1], results[1][1]))


# ---------------------------------------------------------------- raw kernel outputs

def raw_outputs(kernel, xs, keep, is_causal, dropout_p, scale, seed, grad_out):
    out, lse = kernel.masked_attention_forward(*xs, keep, is_causal, dropout_p, scale, seed)
    grads = kernel.masked_attention_backward(grad_out, *xs, out, lse, keep, is_causal, dropout_p,
                                             scale, seed)
    return [out, lse, *grads]


def compare_raw(got, want, tol, what):
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        a = a.to(b.device)
        assert a.shape == b.shape and a.dtype == b.dtype, (
            f"{what} {name}: {tuple(a.shape)} {a.dtype} vs {tuple(b.shape)} {b.dtype}")
        if name == "lse":  # -inf exactly where the other has it
            assert torch.equal(a == float("-inf"), b == float("-inf")), f"{what} lse: -inf rows differ"
            a, b = a.nan_to_num(neginf=0.0), b.nan_to_num(neginf=0.0)
        torch.testing.assert_close(a, b, atol=tol, rtol=tol, msg=lambda m: f"{what} {name}: {m}")


@pytest.mark.parametrize("dropout_p", (0.0, 0.3))
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=DTYPE_IDS.get)
@pytest.mark.parametrize("shape", ("mult_d32", "tiles"))
def test_kernel_matches_cpp(shape, dtype, dropout_p):
    """Triton's masked_attention_forward/backward on CUDA (unattended keys poisoned) against the
    C++ CPU kernel on CPU copies (clean) and the reference backend's kernel on CUDA: out, lse,
    dq, dk, dv, causal or not, with and without key_keep, the same Philox stream."""
    require_cpp(OP)  # skips, or fails under ROBUSTMM_REQUIRE_EXT=1 (CI)
    q, k, v, present, lengths = inputs(shape, "random", seed=14)
    keep = ref.key_keep_mask(q.shape[0], k.shape[2], present, lengths, None, DEV)
    xs = [t.to(dtype) for t in (q, k, v)]
    poisoned = [xs[0], *poison(xs[1], xs[2], keep)]
    grad_out = upstream_for(q, 15).to(dtype)
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    triton_kernel = _kernel("triton")
    for causal in (False, True):
        for kk, inp in ((keep, poisoned), (None, xs)):
            args = (causal, dropout_p, 0.3, 2**40 + 77)
            got = raw_outputs(triton_kernel, inp, kk, *args, grad_out)
            assert all(t.device.type == DEV.type for t in got)
            assert got[1].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
            cpu = [t.cpu() for t in xs]
            want = raw_outputs(torch.ops.robustmm_C, cpu, None if kk is None else kk.cpu(), *args,
                               grad_out.cpu())
            what = f"causal={causal} keep={kk is not None}"
            compare_raw(got, want, tol, f"vs cpp ({what})")
            compare_raw(got, raw_outputs(_ReferenceKernel, xs, kk, *args, grad_out), tol,
                        f"vs reference ({what})")


# ---------------------------------------------------------------- gradcheck, opcheck, compile

@pytest.mark.parametrize("is_causal", (False, True), ids=("full", "causal"))
def test_gradcheck(is_causal):
    q, k, v, present, lengths = inputs("d16", "random", seed=16)
    xs = [t.clone().requires_grad_() for t in (q, k, v)]
    with run_on("triton", OP):
        assert torch.autograd.gradcheck(
            lambda a, b, c: masked_cross_attention(a, b, c, present=present, key_lengths=lengths,
                                                   is_causal=is_causal), xs)


def _opcheck_sample(idx):
    """(q, k, v leaves on the GPU, key_keep or None, is_causal)."""
    shape, dtype, causal, masked = [("awkward", torch.float32, False, True),
                                    ("tiles", torch.float32, True, False),
                                    ("mult_d32", torch.float16, False, True),
                                    ("d80", torch.bfloat16, True, True)][idx]
    q, k, v, present, lengths = inputs(shape, "random", seed=17 + idx)
    keep = ref.key_keep_mask(q.shape[0], k.shape[2], present, lengths, None, DEV) if masked else None
    return [t.to(dtype).requires_grad_() for t in (q, k, v)], keep, causal


@pytest.mark.parametrize("dropout_p", (0.0, 0.25))
@pytest.mark.parametrize("sample_idx", range(4))
def test_opcheck(sample_idx, dropout_p):
    xs, keep, causal = _opcheck_sample(sample_idx)
    seed = torch.tensor(1234, dtype=torch.int64)
    args = (keep, causal, dropout_p, 0.2, seed)
    with run_on("triton", OP):
        opcheck_kernel_op(torch.ops.robustmm.masked_attention_forward, ("triton", *xs, *args))
        out, lse = torch.ops.robustmm.masked_attention_forward("triton", *xs, *args)
        assert out.device.type == DEV.type and lse.dtype == torch.float32
        opcheck_kernel_op(torch.ops.robustmm.masked_attention_backward,
                              ("triton", torch.randn_like(out), *[x.detach() for x in xs],
                               out.detach(), lse, *args))


@pytest.mark.parametrize("compiler", ("aot_eager", "inductor"))
def test_compile_fullgraph(compiler):
    tma.check_compile_fullgraph(*inputs("awkward", "random", seed=21), "triton", compiler)


def test_matches_sdpa():
    """torch's F.scaled_dot_product_attention on CUDA with the equivalent boolean mask (samples
    with at least one key; the op's rows with none are 0)."""
    q, k, v, present, lengths = inputs("mult_d32", "random", seed=22)
    q, k, v = q.float(), k.float(), v.float()
    keep = ref.key_keep_mask(q.shape[0], k.shape[2], present, lengths, None, DEV)
    with run_on("triton", OP):
        out = masked_cross_attention(q, k, v, present=present, key_lengths=lengths)
    some = keep.any(1)
    assert not some.all() and (out[~some] == 0).all()
    expected = F.scaled_dot_product_attention(q[some], k[some], v[some],
                                              attn_mask=keep[some][:, None, None, :])
    torch.testing.assert_close(out[some], expected, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("shape_q,shape_k", [((2, 1, 0, 16), (2, 1, 5, 16)),
                                             ((2, 1, 3, 16), (2, 1, 0, 16)),
                                             ((0, 2, 3, 16), (0, 2, 5, 16))])
def test_empty(shape_q, shape_k):
    q = torch.randn(shape_q, device=DEV, requires_grad=True)
    k, v = (torch.randn(shape_k, device=DEV, requires_grad=True) for _ in range(2))
    with run_on("triton", OP):
        out = masked_cross_attention(q, k, v)
        grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    assert out.shape == q.shape and not out.any()
    assert [g.shape for g in grads] == [q.shape, k.shape, v.shape]
    assert not any(g.any() for g in grads)


# ---------------------------------------------------------------- the layer

def _layer_pair(**kw):
    return tuple(m.to(DEV) for m in _pair(**kw))


def _layer_inputs(kdim=E, vdim=E, batch_first=True):
    return [x.detach().to(DEV).requires_grad_() for x in _qkv(kdim, vdim, batch_first)]


@pytest.mark.parametrize("kw", [dict(), dict(kdim=6, vdim=10), dict(batch_first=False, bias=False)],
                         ids=str)
def test_layer_matches_mha(kw):
    """MaskedCrossModalAttention (fused path) on CUDA = nn.MultiheadAttention with copied weights
    and the equivalent key_padding_mask: values and every gradient."""
    ours, mha = _layer_pair(**kw)
    q, k, v = _layer_inputs(kw.get("kdim", E), kw.get("vdim", E), kw.get("batch_first", True))
    present = _present()
    present[1, 2] = True  # every sample keeps a key (MHA gives NaN for a row with none)
    pad = torch.zeros(present.shape[0], sum(LENGTHS), dtype=torch.bool)
    pad[3, -1] = True
    present, pad, kpm = present.to(DEV), pad.to(DEV), (_expand(present) | pad).to(DEV)
    with run_on("triton", OP):
        out, w = ours(q, k, v, key_padding_mask=pad, need_weights=False, present=present,
                      key_lengths=LENGTHS)
        assert w is None
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(6)).to(DEV)
        got = _grads(ours, [q, k, v], out, g)
    want_out = mha(q, k, v, key_padding_mask=kpm, need_weights=False)[0]
    want = _grads(mha, [q, k, v], want_out, g)
    _assert_same(out, want_out, "out", tol=2e-5)
    assert got.keys() == want.keys()
    for name in got:
        assert got[name] is not None and torch.isfinite(got[name]).all(), name
        _assert_same(got[name], want[name], name, tol=5e-5)


def test_layer_fully_masked_rows_and_nan():
    """A sample with no modality outputs exactly 0; NaN in absent modalities' inputs reaches
    neither the output nor any gradient (they get 0)."""
    ours, mha = _layer_pair()
    present = _present()  # sample 1: nothing present
    drop = _expand(present).to(DEV)
    present = present.to(DEV)
    results = []
    for fill in (0.0, float("nan")):
        q, k, v = _layer_inputs()
        with torch.no_grad():
            k[drop], v[drop] = fill, fill
        with run_on("triton", OP):
            out = ours(q, k, v, need_weights=False, present=present, key_lengths=LENGTHS)[0]
            g = torch.randn(out.shape, generator=torch.Generator().manual_seed(6)).to(DEV)
            results.append((out, _grads(ours, [q, k, v], out, g)))
    (a, ga), (b, gb) = results
    assert (b[1] == 0).all() and torch.isfinite(b).all()
    _assert_same(b, a, "out", tol=0)
    for name in ga:
        assert torch.isfinite(gb[name]).all(), name
        _assert_same(gb[name], ga[name], name, tol=0)
    assert (gb["in0"][1] == 0).all() and (gb["in1"][drop] == 0).all() and (gb["in2"][drop] == 0).all()
    rows = [0, 2, 3]
    want = mha(*(x.detach()[rows] for x in _layer_inputs()), need_weights=False,
               key_padding_mask=drop[rows])[0]
    _assert_same(a[rows], want, "other rows vs MHA", tol=2e-5)


def test_compile_layer_fullgraph():
    ours, _ = _layer_pair(kdim=6, vdim=10)
    present, pad = _present().to(DEV), padding_for(_present().shape[0], sum(LENGTHS), 11, 0.2)

    def f(q, k, v, present, pad):
        return ours(q, k, v, key_padding_mask=pad, need_weights=False, present=present,
                    key_lengths=LENGTHS)[0]

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)
    outs = []
    for fn in (compiled, f):
        q, k, v = _layer_inputs(6, 10)
        with run_on("triton", OP):
            out = fn(q, k, v, present, pad)
            g = torch.randn(out.shape, generator=torch.Generator().manual_seed(6)).to(DEV)
            outs.append((out, _grads(ours, [q, k, v], out, g)))
    (a, ga), (b, gb) = outs
    _assert_same(a, b, "out", tol=1e-5)
    for name in ga:
        _assert_same(ga[name], gb[name], name, tol=1e-5)


# ---------------------------------------------------------------- long sequences, streams

def _peak_extra_bytes(shape):
    """Peak memory allocated above the inputs during the op's forward + backward (fp16)."""
    q, k, v, present, lengths = inputs(shape, "random", seed=30)
    xs = [t.half().requires_grad_() for t in (q, k, v)]
    g = torch.randn_like(xs[0])
    del q, k, v
    torch.cuda.synchronize()
    torch.cuda.empty_cache()  # fresh segments: blocks of exactly the requested sizes
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with run_on("triton", OP):
        out = masked_cross_attention(*xs, present=present, key_lengths=lengths)
        grads = torch.autograd.grad(out, xs, g)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    assert all(torch.isfinite(t).all() for t in (out, *grads))
    return peak


def test_long_sequence_memory_is_linear():
    """B=2, H=4, Lq=1000, keys 3x1000, d=64, fp16: no (Lq, Lk) score matrix is ever stored
    (fp32 it would be 96 MB), and doubling every length about doubles the peak (not 4x)."""
    B, H, Lq, lengths, d = LONG
    scores = B * H * Lq * sum(lengths) * 4
    big = _peak_extra_bytes(LONG)
    half = _peak_extra_bytes(LONG_HALF)
    assert big < scores / 4, f"peak extra {big / 2**20:.1f} MiB vs a score matrix {scores / 2**20:.1f} MiB"
    assert big < 3 * half, f"peak extra grew {big / half:.2f}x when every length doubled"
    q, k, v, present, lengths = inputs(LONG, "random", seed=31)
    check(q, k, v, torch.float16, present=present, key_lengths=lengths)


def test_non_default_stream():
    """The kernels launch on the current stream: the inputs are written on a side stream held
    busy by a sleep, so a kernel on any other stream would read the NaN placeholders."""
    q, k, v, present, lengths = inputs("mult_d32", "random", seed=40)
    src = [t.float() for t in (q, k, v)]
    upstream = upstream_for(q)
    kw = dict(present=present, key_lengths=lengths)
    want = run(ref.masked_cross_attention, *src, torch.float32, upstream, **kw)
    with late_copies_on_side_stream(src) as leaves:
        with run_on("triton", OP):
            got = run(masked_cross_attention, *leaves, torch.float32, upstream, **kw)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    for a, b in zip(got[1], want[1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
