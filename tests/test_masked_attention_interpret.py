import os
os.environ["TRITON_INTERPRET"] = "1"  # before triton / robustmm_fast are imported  # noqa: E402

"""Interpret tier of masked_cross_attention's Triton backend (kernels/masked_attention.py) on CPU
tensors.

Run in its own process:
    TRITON_INTERPRET=1 python -m pytest -m interpret tests/test_masked_attention_interpret.py -p no:cacheprovider

Every test names the triton backend and fails if it did not run. The block constants are shrunk
to 16 so that the tiny shapes span several query and key tiles, with segment boundaries inside
tiles and partial last tiles. The oracle is the reference (robustmm_fast.reference.
masked_attention, fp64, autograd for the gradients); the raw kernel outputs (out, lse, dq, dk,
dv) are also compared with the reference backend's kernel and, when built, the C++ kernel.
Absent and padded keys hold NaN (k) and Inf (v) wherever the triton backend runs.
"""
import zlib

import pytest
import torch

triton = pytest.importorskip("triton")

import robustmm_fast  # noqa: E402,F401
from robustmm_fast.kernels import masked_attention as K  # noqa: E402
from robustmm_fast.ops.masked_attention import _ReferenceKernel, masked_cross_attention  # noqa: E402
from robustmm_fast.reference import masked_attention as ref  # noqa: E402
from attention_oracles import eager_lowp  # noqa: E402
from conftest import assert_close_dtype, require_cpp, run_on  # noqa: E402

pytestmark = pytest.mark.interpret

OP = "masked_attention"
BLOCKS = ("_FWD_BLOCK_M", "_FWD_BLOCK_N", "_DKDV_BLOCK_M", "_DKDV_BLOCK_N", "_DQ_BLOCK_M",
          "_DQ_BLOCK_N")
# (B, H, Lq, key_lengths, d): M = 1..4 segments, Lq != Lk, nothing a multiple of 16
SHAPES = {
    "m1": (2, 1, 19, (40,), 16),
    "m2": (2, 2, 33, (24, 17), 32),
    "m3": (3, 1, 21, (9, 30, 12), 64),
    "m4": (3, 2, 37, (13, 1, 29, 7), 20),
}
PRESENCE = ("all", "none", "random", "single")


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    """Blocks of 16 (tl.dot's minimum on GPUs): several tiles per length at tiny shapes."""
    for name in BLOCKS:
        monkeypatch.setattr(K, name, 16)


# ---- helpers ----

def seeded(*key):
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def make_inputs(shape_key, presence, gen, d=None):
    """fp64 q, k, v, present (B, M), key_lengths."""
    B, H, Lq, lengths, d0 = SHAPES[shape_key]
    d = d0 if d is None else d
    Lk = sum(lengths)
    q, k, v = (torch.randn(B, H, L, d, generator=gen, dtype=torch.float64) for L in (Lq, Lk, Lk))
    M = len(lengths)
    if presence == "all":
        present = torch.ones(B, M, dtype=torch.bool)
    elif presence == "none":
        present = torch.zeros(B, M, dtype=torch.bool)
    elif presence == "single":
        present = torch.zeros(B, M, dtype=torch.bool)
        present[torch.arange(B), torch.randint(0, M, (B,), generator=gen)] = True
    else:  # random: sample 0 has everything, the last sample nothing
        present = torch.rand(B, M, generator=gen) < 0.5
        present[0] = True
        present[-1] = False
    return q, k, v, present, list(lengths)


def padding_mask(B, Lk, gen):
    return torch.rand(B, Lk, generator=gen) < 0.3


def poison(k, v, keep):
    """NaN in every key and Inf in every value that no query may attend to."""
    if keep is None:
        return k, v
    k, v = k.clone(), v.clone()
    dead = ~keep[:, None, :, None].expand_as(k)
    k[dead] = float("nan")
    v[dead] = float("inf")
    return k, v


def grads_of(fn, xs, upstream, **kw):
    leaves = [t.detach().clone().requires_grad_() for t in xs]
    out = fn(*leaves, **kw)
    return out.detach(), list(torch.autograd.grad(out, leaves, upstream.to(out.dtype)))


def check_against_reference(q, k, v, dtype, gen, **kw):
    """The public op on triton (absent keys poisoned) vs the fp64 reference: the output and
    every gradient with a random upstream gradient. fp16: error <= 2x eager fp16's own."""
    B, Lk = q.shape[0], k.shape[2]
    keep = ref.key_keep_mask(B, Lk, kw.get("present"), kw.get("key_lengths"),
                             kw.get("key_padding_mask"), q.device)
    upstream = torch.randn(q.shape, generator=gen, dtype=torch.float64)
    kp, vp = poison(k, v, keep)
    xs = [t.to(dtype) for t in (q, kp, vp)]
    with run_on("triton", OP):
        out, grads = grads_of(masked_cross_attention, xs, upstream, **kw)
    hi = [t.to(dtype).double() for t in (q, k, v)]   # the same (rounded) inputs in fp64
    truth, truth_grads = grads_of(ref.masked_cross_attention, hi, upstream, **kw)
    lowp, lowp_grads = None, [None] * 3
    if dtype == torch.float16:
        lowp, lowp_grads = grads_of(eager_lowp, [t.to(dtype) for t in (q, k, v)], upstream, **kw)
    assert out.dtype == dtype and torch.isfinite(out).all(), "non-finite output"
    assert_close_dtype(out, truth, "out", lowp)
    for name, g, t, lg in zip(("dq", "dk", "dv"), grads, truth_grads, lowp_grads):
        assert g.dtype == dtype and torch.isfinite(g).all(), f"{name}: non-finite"
        assert_close_dtype(g, t, name, lg)
    if keep is not None:  # keys nobody may attend to: exactly zero gradient
        dead = ~keep[:, None, :].expand(k.shape[:3])
        assert (grads[1][dead] == 0).all() and (grads[2][dead] == 0).all()
        no_key = ~keep.any(1)  # samples with no key at all: output and dq exactly 0
        assert (out[no_key] == 0).all() and (grads[0][no_key] == 0).all()
    return out, grads


def op_seed(s):
    """The dropout seed the op draws after torch.manual_seed(s)."""
    torch.manual_seed(s)
    return int(torch.randint(0, 2**62, (), dtype=torch.int64))


# ---- values and every gradient vs the reference ----

@pytest.mark.parametrize("presence", PRESENCE)
@pytest.mark.parametrize("is_causal", [False, True])
def test_presence_patterns(presence, is_causal):
    gen = seeded("presence", presence, is_causal)
    q, k, v, present, lengths = make_inputs("m4", presence, gen)
    out, _ = check_against_reference(q, k, v, torch.float32, gen, present=present,
                                     key_lengths=lengths, is_causal=is_causal)
    if presence == "none":
        assert (out == 0).all()


@pytest.mark.parametrize("shape", ["m1", "m2", "m3"])
@pytest.mark.parametrize("is_causal", [False, True])
def test_segments_and_causal(shape, is_causal):
    gen = seeded("segments", shape, is_causal)
    q, k, v, present, lengths = make_inputs(shape, "random", gen)
    check_against_reference(q, k, v, torch.float32, gen, present=present, key_lengths=lengths,
                            is_causal=is_causal)


@pytest.mark.parametrize("with_present", [False, True])
@pytest.mark.parametrize("is_causal", [False, True])
def test_key_padding(with_present, is_causal):
    gen = seeded("padding", with_present, is_causal)
    q, k, v, present, lengths = make_inputs("m2", "random", gen)
    padding = padding_mask(k.shape[0], k.shape[2], gen)
    padding[0, :] = True  # a sample whose every key is padding
    kw = dict(present=present, key_lengths=lengths) if with_present else {}
    check_against_reference(q, k, v, torch.float32, gen, key_padding_mask=padding,
                            is_causal=is_causal, scale=0.3, **kw)


def test_no_mask_and_self_attention_causal():
    """key_keep None (HAS_KEEP off): plain and causal, Lq == Lk and Lq > Lk."""
    gen = seeded("nomask")
    q, k, v, _, _ = make_inputs("m2", "all", gen)
    check_against_reference(q, k, v, torch.float32, gen)
    qs = torch.randn(2, 2, k.shape[2], 32, generator=gen, dtype=torch.float64)
    check_against_reference(qs, k, v, torch.float32, gen, is_causal=True)
    ql = torch.randn(2, 2, 50, 32, generator=gen, dtype=torch.float64)
    check_against_reference(ql, k, v, torch.float32, gen, is_causal=True)


@pytest.mark.parametrize("d", [16, 20, 32, 64, 80])
def test_head_dims(d):
    gen = seeded("headdim", d)
    q, k, v, present, lengths = make_inputs("m2", "random", gen, d=d)
    check_against_reference(q, k, v, torch.float32, gen, present=present, key_lengths=lengths)


# ---- dropout: the reference's Philox stream, forward and backward ----

@pytest.mark.parametrize("shape", ["m2", "m4"])   # Lk = 41 (per-element Philox), 50 -> Lk 52 below
@pytest.mark.parametrize("is_causal", [False, True])
def test_dropout_matches_reference_stream(shape, is_causal):
    gen = seeded("dropout", shape, is_causal)
    q, k, v, present, lengths = make_inputs(shape, "random", gen)
    if shape == "m4":  # Lk % 4 == 0: the grouped (interleaved) Philox path
        lengths[-1] += 2
        k = torch.cat([k, torch.randn(*k.shape[:2], 2, k.shape[3], generator=gen,
                                      dtype=torch.float64)], dim=2)
        v = torch.cat([v, torch.randn(*v.shape[:2], 2, v.shape[3], generator=gen,
                                      dtype=torch.float64)], dim=2)
        assert k.shape[2] % 4 == 0
    upstream = torch.randn(q.shape, generator=gen, dtype=torch.float64)
    kw = dict(present=present, key_lengths=lengths, is_causal=is_causal, dropout_p=0.3)
    keep = ref.key_keep_mask(q.shape[0], k.shape[2], present, lengths, None, q.device)
    kp, vp = poison(k, v, keep)
    seed = op_seed(1234)
    torch.manual_seed(1234)  # the op draws its seed from the default generator
    with run_on("triton", OP):
        out, grads = grads_of(masked_cross_attention, [t.float() for t in (q, kp, vp)], upstream,
                              **kw)
    truth, truth_grads = grads_of(ref.masked_cross_attention, [q, k, v], upstream, seed=seed, **kw)
    assert_close_dtype(out, truth, "out")
    for name, g, t in zip(("dq", "dk", "dv"), grads, truth_grads):
        assert_close_dtype(g, t, name)
    # it did drop: the undropped output differs
    plain = ref.masked_cross_attention(q, k, v, present=present, key_lengths=lengths,
                                       is_causal=is_causal)
    assert not torch.allclose(truth, plain)


def test_dropout_index64_same_stream(monkeypatch):
    """int64 offsets and Philox counters give the same numbers as the int32 path."""
    gen = seeded("index64")
    q, k, v, present, lengths = make_inputs("m4", "random", gen)
    keep = ref.key_keep_mask(q.shape[0], k.shape[2], present, lengths, None, q.device)
    xs = [t.float() for t in (q, k, v)]
    g = torch.randn(q.shape, generator=gen)
    args = (keep, True, 0.25, 0.4, 2**61 + 12345)  # a seed with both 32-bit halves nonzero
    out32, lse32 = K.masked_attention_forward(*xs, *args)
    grads32 = K.masked_attention_backward(g, *xs, out32, lse32, *args)
    monkeypatch.setattr(K, "_INDEX64_LIMIT", 0)
    out64, lse64 = K.masked_attention_forward(*xs, *args)
    grads64 = K.masked_attention_backward(g, *xs, out64, lse64, *args)
    for a, b in zip((out32, lse32, *grads32), (out64, lse64, *grads64)):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    want = _ReferenceKernel.masked_attention_forward(*xs, *args)[0]
    torch.testing.assert_close(out64, want, atol=1e-5, rtol=1e-5)


# ---- low precision: error at most 2x PyTorch's own fp16 error ----

@pytest.mark.parametrize("case", ["causal", "dropout", "padding"])
def test_float16_within_twice_eager_error(case):
    gen = seeded("fp16", case)
    q, k, v, present, lengths = make_inputs("m4", "random", gen, d=32)
    kw = dict(present=present, key_lengths=lengths)
    if case == "causal":
        kw["is_causal"] = True
    elif case == "padding":
        kw["key_padding_mask"] = padding_mask(k.shape[0], k.shape[2], gen)
    if case != "dropout":
        check_against_reference(q, k, v, torch.float16, gen, **kw)
        return
    seed = op_seed(99)
    upstream = torch.randn(q.shape, generator=gen, dtype=torch.float64)
    keep = ref.key_keep_mask(q.shape[0], k.shape[2], present, lengths, None, q.device)
    kp, vp = poison(k, v, keep)
    torch.manual_seed(99)
    with run_on("triton", OP):
        out, grads = grads_of(masked_cross_attention, [t.half() for t in (q, kp, vp)], upstream,
                              dropout_p=0.2, **kw)
    halves = [t.half() for t in (q, k, v)]
    truth, truth_grads = grads_of(ref.masked_cross_attention, [t.double() for t in halves],
                                  upstream, dropout_p=0.2, seed=seed, **kw)
    lowp, lowp_grads = grads_of(eager_lowp, halves, upstream, dropout_p=0.2, seed=seed, **kw)
    assert_close_dtype(out, truth, "out", lowp)
    for name, g, t, lg in zip(("dq", "dk", "dv"), grads, truth_grads, lowp_grads):
        assert_close_dtype(g, t, name, lg)


# ---- the kernel interface itself ----

def raw_outputs(kernel, xs, keep, is_causal, dropout_p, scale, seed, grad_out):
    out, lse = kernel.masked_attention_forward(*xs, keep, is_causal, dropout_p, scale, seed)
    grads = kernel.masked_attention_backward(grad_out, *xs, out, lse, keep, is_causal, dropout_p,
                                             scale, seed)
    return [out, lse, *grads]


def compare_raw(got, want, tol):
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        assert a.shape == b.shape and a.dtype == b.dtype, f"{name}: {a.shape} {a.dtype} vs {b.shape} {b.dtype}"
        if name == "lse":  # -inf exactly where the reference has it
            assert torch.equal(a == float("-inf"), b == float("-inf")), "lse: -inf rows differ"
            a, b = a.nan_to_num(neginf=0.0), b.nan_to_num(neginf=0.0)
        torch.testing.assert_close(a, b, atol=tol, rtol=tol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("dropout_p", [0.0, 0.4])
def test_kernel_interface_matches_reference_kernel(dtype, is_causal, dropout_p):
    """Raw (out, lse, dq, dk, dv) = the reference backend's kernel; lse float32/float64."""
    gen = seeded("raw", dtype, is_causal, dropout_p)
    q, k, v, present, lengths = make_inputs("m4", "random", gen)
    keep = ref.key_keep_mask(q.shape[0], k.shape[2], present, lengths, None, q.device)
    xs = [t.to(dtype) for t in (q, k, v)]
    grad_out = torch.randn(q.shape, generator=gen, dtype=dtype)
    args = (keep, is_causal, dropout_p, 0.3, 987654321987)
    want = raw_outputs(_ReferenceKernel, xs, *args, grad_out)
    got = raw_outputs(K, [xs[0], *poison(xs[1], xs[2], keep)], *args, grad_out)
    assert got[1].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    compare_raw(got, want, 1e-5 if dtype == torch.float32 else 1e-10)
    none = raw_outputs(K, xs, None, is_causal, dropout_p, 0.3, 5, grad_out)
    compare_raw(none, raw_outputs(_ReferenceKernel, xs, None, is_causal, dropout_p, 0.3, 5, grad_out),
                1e-5 if dtype == torch.float32 else 1e-10)


def test_tile_lists_and_skipping(monkeypatch):
    """_key_tiles lists exactly the key blocks holding a kept key (ascending, first), and the
    kernels visit only the listed blocks: with an empty list every row is empty."""
    keep = torch.zeros(3, 50, dtype=torch.bool)
    keep[0, 13:14] = True          # block 0
    keep[0, 40:50] = True          # blocks 2, 3
    keep[2] = True                 # every block
    tiles, cum = K._key_tiles(keep, 50, 16)
    assert tiles.dtype == cum.dtype == torch.int32
    assert tiles.shape == (3, 4) and cum.shape == (3, 5)
    assert cum.tolist() == [[0, 1, 1, 2, 3], [0, 0, 0, 0, 0], [0, 1, 2, 3, 4]]
    assert tiles[0, :3].tolist() == [0, 2, 3] and tiles[2].tolist() == [0, 1, 2, 3]

    gen = seeded("skip")
    xs = [torch.randn(3, 1, L, 16, generator=gen) for L in (20, 50, 50)]
    real = K._key_tiles
    monkeypatch.setattr(K, "_key_tiles", lambda kk, Lk, bn: tuple(torch.zeros_like(t) for t in real(kk, Lk, bn)))
    out, lse = K.masked_attention_forward(*xs, keep, False, 0.0, 0.25, 0)
    assert (out == 0).all() and (lse == float("-inf")).all()
    g = torch.randn(out.shape, generator=gen)
    dq, dk, dv = K.masked_attention_backward(g, *xs, *_ReferenceKernel.masked_attention_forward(
        *xs, keep, False, 0.0, 0.25, 0), keep, False, 0.0, 0.25, 0)
    assert (dq == 0).all() and (dk == 0).all() and (dv == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_kernel_matches_cpp(dtype, dropout_p):
    """Triton against the C++ kernel on the raw outputs (the same Philox stream)."""
    require_cpp("masked_attention")  # skips, or fails under ROBUSTMM_REQUIRE_EXT=1 (CI)
    gen = seeded("cpp", dtype, dropout_p)
    q, k, v, present, lengths = make_inputs("m4", "random", gen)
    keep = ref.key_keep_mask(q.shape[0], k.shape[2], present, lengths, None, q.device)
    xs = [t.to(dtype) for t in (q, k, v)]
    grad_out = torch.randn(q.shape, generator=gen, dtype=dtype)
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    for causal in (False, True):
        args = (keep, causal, dropout_p, 0.3, 2**40 + 77)
        compare_raw(raw_outputs(K, xs, *args, grad_out),
                    raw_outputs(torch.ops.robustmm_C, xs, *args, grad_out), tol)


# ---- arguments and edges ----

def test_kernel_argument_errors():
    q = torch.zeros(2, 1, 3, 16)
    k = torch.zeros(2, 1, 5, 16)
    keep = torch.ones(2, 5, dtype=torch.bool)
    fwd = K.masked_attention_forward
    with pytest.raises(TypeError, match="k and q"):
        fwd(q, k.double(), k, keep, False, 0.0, 1.0, 0)
    with pytest.raises(TypeError, match="q"):
        fwd(q.long(), k.long(), k.long(), keep, False, 0.0, 1.0, 0)
    with pytest.raises(ValueError, match="k must have shape"):
        fwd(q, torch.zeros(2, 1, 5, 8), k, keep, False, 0.0, 1.0, 0)
    with pytest.raises(ValueError, match="v must have the shape"):
        fwd(q, k, torch.zeros(2, 1, 6, 16), keep, False, 0.0, 1.0, 0)
    with pytest.raises(TypeError, match="key_keep"):
        fwd(q, k, k, keep.float(), False, 0.0, 1.0, 0)
    with pytest.raises(ValueError, match="key_keep"):
        fwd(q, k, k, torch.ones(2, 4, dtype=torch.bool), False, 0.0, 1.0, 0)
    with pytest.raises(ValueError, match="dropout_p"):
        fwd(q, k, k, keep, False, 1.0, 1.0, 0)
    with pytest.raises(ValueError, match="scale"):
        fwd(q, k, k, keep, False, 0.0, float("nan"), 0)
    with pytest.raises(ValueError, match="seed"):
        fwd(q, k, k, keep, False, 0.0, 1.0, -1)
    with pytest.raises(TypeError, match="is_causal"):
        fwd(q, k, k, keep, 1, 0.0, 1.0, 0)
    out, lse = fwd(q, k, k, keep, False, 0.0, 1.0, 0)
    bwd = K.masked_attention_backward
    with pytest.raises(ValueError, match="grad_out"):
        bwd(torch.zeros(2, 1, 4, 16), q, k, k, out, lse, keep, False, 0.0, 1.0, 0)
    with pytest.raises(TypeError, match="lse"):
        bwd(out, q, k, k, out, lse.double(), keep, False, 0.0, 1.0, 0)
    with pytest.raises(ValueError, match="lse"):
        bwd(out, q, k, k, out, lse[:, :, :2], keep, False, 0.0, 1.0, 0)
    with pytest.raises(TypeError, match="out and q"):
        bwd(out, q, k, k, out.double(), lse, keep, False, 0.0, 1.0, 0)


@pytest.mark.parametrize("shape_q,shape_k", [((2, 1, 0, 16), (2, 1, 5, 16)),
                                             ((2, 1, 3, 16), (2, 1, 0, 16)),
                                             ((0, 2, 3, 16), (0, 2, 5, 16))])
def test_empty(shape_q, shape_k):
    q = torch.randn(shape_q)
    k, v = torch.randn(shape_k), torch.randn(shape_k)
    out, lse = K.masked_attention_forward(q, k, v, None, False, 0.0, 0.25, 0)
    assert out.shape == q.shape and lse.shape == q.shape[:3]
    assert (out == 0).all() and (lse == float("-inf")).all()
    dq, dk, dv = K.masked_attention_backward(torch.ones_like(q), q, k, v, out, lse, None, False,
                                             0.0, 0.25, 0)
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    assert (dq == 0).all() and (dk == 0).all() and (dv == 0).all()
