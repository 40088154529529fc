"""masked_cross_attention on the CPU backends (reference, cpp and cpp's baseline ISA copy)
against the materialized oracle robustmm_fast.reference.masked_cross_attention and against
torch's own F.scaled_dot_product_attention (DESIGN §4, §7)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from robustmm_fast.ops.masked_attention import masked_cross_attention
from robustmm_fast.reference import masked_attention as ref

from conftest import assert_close_dtype, LOW_PRECISION, opcheck_kernel_op, run_on

OP = "masked_attention"
DTYPE_IDS = {torch.float32: "fp32", torch.float64: "fp64", torch.float16: "fp16", torch.bfloat16: "bf16"}
# (B, H, Lq, key_lengths, d): realistic MulT-like, awkward (not tile multiples, Lq != Lk)
SHAPES = {
    "mult": (4, 2, 50, (50, 50, 50), 32),
    "awkward": (3, 2, 7, (13, 1, 29, 6), 20),
    "one_segment": (2, 3, 33, (65,), 64),
    "d80": (2, 1, 9, (17, 40), 80),
    "d128": (1, 2, 70, (70, 31), 128),
    "d16": (2, 2, 5, (3, 4), 16),
}
PRESENCE = ("all", "none", "random", "single")


def make_inputs(shape_key, presence="random", seed=0, dtype=torch.float64):
    B, H, Lq, lengths, d = SHAPES[shape_key]
    gen = torch.Generator().manual_seed(seed)
    Lk = sum(lengths)
    q = torch.randn(B, H, Lq, d, generator=gen, dtype=torch.float64)
    k = torch.randn(B, H, Lk, d, generator=gen, dtype=torch.float64)
    v = torch.randn(B, H, Lk, d, generator=gen, dtype=torch.float64)
    M = len(lengths)
    if presence == "all":
        present = torch.ones(B, M, dtype=torch.bool)
    elif presence == "none":
        present = torch.zeros(B, M, dtype=torch.bool)
    elif presence == "single":
        present = torch.zeros(B, M, dtype=torch.bool)
        present[torch.arange(B), torch.randint(0, M, (B,), generator=gen)] = True
    else:
        present = torch.rand(B, M, generator=gen) < 0.6
        present[0] = True
        if B > 1:
            present[-1] = False
    return q, k, v, present, lengths


def poison(k, v, keep):
    """NaN in every key and value no query may attend to."""
    k, v = k.clone(), v.clone()
    k[~keep[:, None, :, None].expand_as(k)] = float("nan")
    v[~keep[:, None, :, None].expand_as(v)] = float("inf")
    return k, v


def run(fn, q, k, v, dtype, upstream, **kwargs):
    xs = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    out = fn(*xs, **kwargs)
    grads = torch.autograd.grad(out, xs, upstream.to(out.dtype))
    return out.detach(), grads


def check(backend, q, k, v, dtype, *, poison_absent=True, **kwargs):
    keep = ref.key_keep_mask(q.shape[0], k.shape[2], kwargs.get("present"),
                             kwargs.get("key_lengths"), kwargs.get("key_padding_mask"), q.device)
    gen = torch.Generator().manual_seed(7)
    upstream = torch.randn(q.shape, generator=gen, dtype=torch.float64)
    kp, vp = poison(k, v, keep) if (poison_absent and keep is not None) else (k, v)
    with run_on(backend, OP):
        out, grads = run(masked_cross_attention, q, kp, vp, dtype, upstream, **kwargs)
    truth, truth_grads = run(ref.masked_cross_attention, q, k, v, torch.float64, upstream, **kwargs)
    lowp, lowp_grads = (None, [None] * 3)
    if dtype in LOW_PRECISION:
        lowp, lowp_grads = run(ref.masked_cross_attention, q, k, v, dtype, upstream, **kwargs)
    assert torch.isfinite(out).all(), "non-finite output"
    assert_close_dtype(out, truth, "out", lowp)
    for name, g, t, lg in zip(("dq", "dk", "dv"), grads, truth_grads, lowp_grads):
        assert torch.isfinite(g).all(), f"{name}: non-finite"
        assert_close_dtype(g, t, name, lg)
    if keep is not None:  # keys nobody may attend to get exactly zero gradient
        dead = ~keep[:, None, :].expand(k.shape[:3])
        assert (grads[1][dead] == 0).all() and (grads[2][dead] == 0).all()
    return out


# ---------------------------------------------------------------- values and gradients

@pytest.mark.parametrize("presence", PRESENCE)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference(backend, shape, presence):
    q, k, v, present, lengths = make_inputs(shape, presence)
    out = check(backend, q, k, v, torch.float32, present=present, key_lengths=lengths)
    if presence == "none":
        assert (out == 0).all()


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64, torch.float16, torch.bfloat16),
                         ids=DTYPE_IDS.get)
@pytest.mark.parametrize("shape", ("mult", "awkward"))
def test_dtypes(backend, shape, dtype):
    q, k, v, present, lengths = make_inputs(shape, "random", seed=1)
    check(backend, q, k, v, dtype, present=present, key_lengths=lengths)


@pytest.mark.parametrize("shape", ("mult", "awkward", "d128"))
def test_key_padding_mask(backend, shape):
    q, k, v, present, lengths = make_inputs(shape, "random", seed=2)
    gen = torch.Generator().manual_seed(3)
    padding = torch.rand(k.shape[0], k.shape[2], generator=gen) < 0.3
    check(backend, q, k, v, torch.float32, present=present, key_lengths=lengths,
          key_padding_mask=padding)
    check(backend, q, k, v, torch.float32, key_padding_mask=padding)


@pytest.mark.parametrize("shape", ("mult", "awkward", "one_segment"))
def test_causal(backend, shape):
    q, k, v, present, lengths = make_inputs(shape, "random", seed=4)
    check(backend, q, k, v, torch.float32, is_causal=True)
    check(backend, q, k, v, torch.float32, is_causal=True, present=present, key_lengths=lengths)
    Lk = k.shape[2]  # self-attention shape
    qs = torch.randn(q.shape[0], q.shape[1], Lk, q.shape[3], dtype=torch.float64)
    check(backend, qs, k, v, torch.float32, is_causal=True)


@pytest.mark.parametrize("shape", ("mult", "awkward"))
def test_dropout_matches_reference_stream(backend, shape):
    """Same seed -> the reference's mask (the Philox stream), forward and backward."""
    q, k, v, present, lengths = make_inputs(shape, "random", seed=5)
    torch.manual_seed(11)
    seed = int(torch.randint(0, 2**62, ()))
    gen = torch.Generator().manual_seed(7)
    upstream = torch.randn(q.shape, generator=gen, dtype=torch.float64)
    torch.manual_seed(11)
    with run_on(backend, OP):
        out, grads = run(masked_cross_attention, q, k, v, torch.float64, upstream, present=present,
                         key_lengths=lengths, dropout_p=0.3)
    truth, truth_grads = run(ref.masked_cross_attention, q, k, v, torch.float64, upstream,
                             present=present, key_lengths=lengths, dropout_p=0.3, seed=seed)
    torch.testing.assert_close(out, truth)
    for g, t in zip(grads, truth_grads):
        torch.testing.assert_close(g, t)


def test_dropout_same_seed_same_result_and_rows_all_masked(backend):
    q, k, v, present, lengths = make_inputs("awkward", "random", seed=6)
    results = []
    for _ in range(2):
        torch.manual_seed(3)
        with run_on(backend, OP):
            results.append(masked_cross_attention(q.float(), k.float(), v.float(), present=present,
                                                  key_lengths=lengths, dropout_p=0.5))
    torch.testing.assert_close(results[0], results[1])
    absent_rows = ~present.any(1)
    assert (results[0][absent_rows] == 0).all()


def test_matches_sdpa(backend):
    """torch's own SDPA with the equivalent boolean mask (it also gives 0 for empty rows)."""
    q, k, v, present, lengths = make_inputs("mult", "random", seed=8, dtype=torch.float32)
    q, k, v = q.float(), k.float(), v.float()
    keep = ref.key_keep_mask(q.shape[0], k.shape[2], present, lengths, None, q.device)
    with run_on(backend, OP):
        out = masked_cross_attention(q, k, v, present=present, key_lengths=lengths)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_custom_scale(backend):
    q, k, v, present, lengths = make_inputs("awkward", "random", seed=9)
    check(backend, q, k, v, torch.float32, present=present, key_lengths=lengths, scale=0.37)


# ---------------------------------------------------------------- gradcheck, opcheck, compile

@pytest.mark.parametrize("causal", (False, True))
def test_gradcheck(backend, causal):
    q, k, v, present, lengths = make_inputs("d16", "random", seed=10)
    xs = [t.clone().requires_grad_() for t in (q, k, v)]
    with run_on(backend, OP):
        assert torch.autograd.gradcheck(
            lambda a, b, c: masked_cross_attention(a, b, c, present=present, key_lengths=lengths,
                                                   is_causal=causal), xs)


@pytest.mark.parametrize("dropout_p", (0.0, 0.25))
def test_opcheck(backend, dropout_p):
    q, k, v, present, lengths = make_inputs("awkward", "random", seed=12)
    xs = [t.float().requires_grad_() for t in (q, k, v)]
    keep = ref.key_keep_mask(q.shape[0], k.shape[2], present, lengths, None, q.device)
    seed = torch.tensor(1234, dtype=torch.int64)
    with run_on(backend, OP):
        opcheck_kernel_op(torch.ops.robustmm.masked_attention_forward,
                              (backend, *xs, keep, False, dropout_p, 0.2, seed))
        out, lse = torch.ops.robustmm.masked_attention_forward(backend, *xs, keep, False,
                                                               dropout_p, 0.2, seed)
        opcheck_kernel_op(torch.ops.robustmm.masked_attention_backward,
                              (backend, torch.randn_like(out), *[x.detach() for x in xs],
                               out.detach(), lse, keep, False, dropout_p, 0.2, seed))


@pytest.mark.parametrize("compiler", ("aot_eager", "inductor"))
def test_compile_fullgraph(backend, compiler):
    check_compile_fullgraph(*make_inputs("awkward", "random", seed=13), backend, compiler)


def check_compile_fullgraph(q, k, v, present, lengths, backend, compiler):
    """torch.compile(fullgraph=True) of a function of the op gives eager's output and
    gradients, both on `backend`."""
    def fn(a, b, c, p):
        return masked_cross_attention(a * 1.0, b, c, present=p, key_lengths=lengths).sum(-1)

    torch._dynamo.reset()
    compiled = torch.compile(fn, backend=compiler, fullgraph=True)
    results = []
    for f in (fn, compiled):
        xs = [t.float().requires_grad_() for t in (q, k, v)]
        with run_on(backend, OP):
            out = f(*xs, present)
            out.sum().backward()
        results.append((out.detach(), [x.grad for x in xs]))
    torch.testing.assert_close(results[0][0], results[1][0])
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b)


def test_double_backward_raises(backend):
    q, k, v, present, lengths = make_inputs("d16", "random", seed=14)
    xs = [t.float().requires_grad_() for t in (q, k, v)]
    with run_on(backend, OP):
        out = masked_cross_attention(*xs, present=present, key_lengths=lengths)
        grads = torch.autograd.grad(out.sum(), xs, create_graph=True)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(sum(g.sum() for g in grads), xs)


# ---------------------------------------------------------------- bad input

def _good():
    q, k, v, present, lengths = make_inputs("awkward", "random")
    return q.float(), k.float(), v.float(), present, lengths


@pytest.mark.parametrize("case, error, match", [
    ("q_rank", ValueError, "q must have shape"),
    ("k_batch", ValueError, "k must have shape"),
    ("k_heads", ValueError, "k must have shape"),
    ("k_dim", ValueError, "k must have shape"),
    ("v_shape", ValueError, "v must have the shape"),
    ("dtype", TypeError, "k and q"),
    ("int", TypeError, "q must be a floating"),
    ("lengths_sum", ValueError, "key_lengths must sum"),
    ("lengths_m", ValueError, "segments but present"),
    ("present_no_lengths", ValueError, "present needs key_lengths"),
    ("present_dtype", TypeError, "present must be a bool"),
    ("present_shape", ValueError, "present must have shape"),
    ("padding_shape", ValueError, "key_padding_mask must have shape"),
    ("padding_dtype", TypeError, "key_padding_mask must be a bool"),
    ("dropout_high", ValueError, "dropout_p"),
    ("dropout_neg", ValueError, "dropout_p"),
    ("scale_nan", ValueError, "scale"),
    ("causal_type", TypeError, "is_causal"),
])
def test_bad_input(case, error, match):
    q, k, v, present, lengths = _good()
    kw = dict(present=present, key_lengths=lengths)
    if case == "q_rank":
        q = q[0]
    elif case == "k_batch":
        k, v = k[:-1], v[:-1]
    elif case == "k_heads":
        k, v = k[:, :1], v[:, :1]
    elif case == "k_dim":
        k = k[..., :-1]
    elif case == "v_shape":
        v = v[:, :, :-1]
    elif case == "dtype":
        k = k.double()
    elif case == "int":
        q = q.long()
    elif case == "lengths_sum":
        kw["key_lengths"] = (13, 1, 29, 5)
    elif case == "lengths_m":
        kw["key_lengths"] = (14, 29, 6)
    elif case == "present_no_lengths":
        kw.pop("key_lengths")
    elif case == "present_dtype":
        kw["present"] = present.float()
    elif case == "present_shape":
        kw["present"] = present[:-1]
    elif case == "padding_shape":
        kw["key_padding_mask"] = torch.zeros(q.shape[0], 3, dtype=torch.bool)
    elif case == "padding_dtype":
        kw["key_padding_mask"] = torch.zeros(q.shape[0], k.shape[2])
    elif case == "dropout_high":
        kw["dropout_p"] = 1.0
    elif case == "dropout_neg":
        kw["dropout_p"] = -0.1
    elif case == "scale_nan":
        kw["scale"] = float("nan")
    elif case == "causal_type":
        kw["is_causal"] = 1
    with pytest.raises(error, match=match):
        masked_cross_attention(q, k, v, **kw)
