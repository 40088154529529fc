"""MaskedCrossModalAttention as a drop-in for nn.MultiheadAttention (issue 18).

The oracle is nn.MultiheadAttention itself: ours loads MHA's state_dict (random, nonzero
biases) and both run on the same inputs; outputs, returned weights and the gradients of the
inputs and of every parameter (random upstream gradient) must agree. Which path ran is read from
the op's call counter: the fused op must run exactly when the class docstring says
(need_weights=False, no or bool key_padding_mask, no attn_mask unless with is_causal, not
is_causal with appended bias/zero keys) and never otherwise.

The deliberate differences are tested as such: a row with no key left is 0 where MHA gives
NaN, and bad shapes raise AttentionShapeError (a ValueError and an AssertionError) with MHA's
own message where MHA raises AssertionError.
"""
from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn

from robustmm_fast import _backend
from robustmm_fast.nn import MaskedCrossModalAttention
from robustmm_fast.nn.masked_attention import AttentionShapeError

from conftest import require_cpp, run_on

OP = "masked_attention"
E, H = 12, 3           # head_dim 4
B, LQ, LK = 4, 5, 7    # no two equal: a (L, B) / (B, L) mix-up cannot pass
LENGTHS = [3, 1, 3]    # key segments for `present`
TOL = {torch.float64: 1e-10, torch.float32: 2e-5}
EXTRAS = [dict(add_bias_kv=True), dict(add_zero_attn=True),
          dict(add_bias_kv=True, add_zero_attn=True)]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _cpp_kernel_built(request):
    if "backend" in request.fixturenames and request.getfixturevalue("backend") == "cpp":
        require_cpp(OP)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _pair(seed=0, dtype=torch.float64, **kw):
    """(ours, MHA) built with the same arguments (MHA's defaults otherwise); MHA's biases
    (bias_k/bias_v too) made nonzero, then ours loads MHA's state_dict."""
    torch.manual_seed(seed)
    mha = nn.MultiheadAttention(E, H, dtype=dtype, **kw)
    with torch.no_grad():
        for name, p in mha.named_parameters():
            if "bias" in name:
                p.normal_(0, 0.5, generator=_gen(seed + 1))
    ours = MaskedCrossModalAttention(E, H, dtype=dtype, **kw)
    ours.load_state_dict(mha.state_dict(), strict=True)
    return ours, mha


def _inputs(kdim=E, vdim=E, layout="seq", dtype=torch.float64, lq=LQ, lk=LK, seed=3):
    """query, key, value in `layout`: "seq" (L, B, E), "batch" (B, L, E) or "unbatched" (L, E)."""
    g = _gen(seed)
    xs = [torch.randn(B, n, d, generator=g, dtype=dtype) for n, d in ((lq, E), (lk, kdim),
                                                                        (lk, vdim))]
    if layout == "seq":
        xs = [x.transpose(0, 1).contiguous() for x in xs]
    elif layout == "unbatched":
        xs = [x[0].contiguous() for x in xs]
    return [x.requires_grad_() for x in xs]


def _op_calls():
    return sum(n for (op, _), n in _backend.backend_calls.items() if op == OP)


def _run(module, inputs, **call):
    """(out, weights, {parameter name / query / key / value: gradient})."""
    out, w = module(*inputs, **call)
    g = torch.randn(out.shape, generator=_gen(6), dtype=out.dtype)
    named = list(module.named_parameters())
    grads = torch.autograd.grad(out, [p for _, p in named] + list(inputs), g, allow_unused=True)
    return out, w, dict(zip([n for n, _ in named] + ["query", "key", "value"], grads))


def _close(a, b, name, tol):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=lambda m: f"{name}: {m}")


def _matches(ours, mha, inputs, fused, ours_only=None, mha_only=None, weights=True, **call):
    """ours(*inputs, **call | ours_only) == mha(*inputs, **call | mha_only): output, weights
    (None for both, or equal; unless not `weights`) and every gradient; the fused op ran iff
    `fused`."""
    tol = TOL[inputs[0].dtype]
    before = _op_calls()
    out, w, grads = _run(ours, inputs, **{**call, **(ours_only or {})})
    assert (_op_calls() > before) == fused, "the fused op " + ("did not run" if fused else "ran")
    want_out, want_w, want_grads = _run(mha, inputs, **{**call, **(mha_only or {})})
    assert torch.isfinite(want_out).all(), "the oracle has NaN rows: not a comparable case"
    assert out.shape == want_out.shape and out.dtype == want_out.dtype
    _close(out, want_out, "output", tol)
    assert not weights or (w is None) == (want_w is None), f"weights: {type(w)}, {type(want_w)}"
    if weights and w is not None:
        _close(w, want_w, "weights", tol)
    assert grads.keys() == want_grads.keys()
    for name, got in grads.items():
        assert (got is None) == (want_grads[name] is None), name
        if got is not None:
            _close(got, want_grads[name], f"grad {name}", tol)
    return out, w


def _kpm(seed=7):
    """(B, Lk) bool padding that never hides key 0 (MHA's NaN rows stay out of the comparison)."""
    pad = torch.rand(B, LK, generator=_gen(seed)) < 0.4
    pad[:, 0] = False
    return pad


def _present():
    """(B, 3): all present, only segment 0, only segment 1 (a 1-key segment), segments 0 and 2."""
    return torch.tensor([[True, True, True], [True, False, False], [False, True, False],
                         [True, False, True]])


def _expand(present):
    """present (B, M) -> the equivalent key_padding_mask (B, Lk), by hand."""
    return torch.cat([(~present[:, m:m + 1]).expand(-1, n) for m, n in enumerate(LENGTHS)], 1)


# ---------------------------------------------------------------- the interface itself

def test_signature_and_defaults_are_mhas():
    for name in ("__init__", "forward"):
        theirs = inspect.signature(getattr(nn.MultiheadAttention, name)).parameters
        ours = inspect.signature(getattr(MaskedCrossModalAttention, name)).parameters
        assert list(ours)[:len(theirs)] == list(theirs), name  # same order: positional calls work
        for arg, p in theirs.items():
            assert ours[arg].default == p.default, f"{name}({arg}=...)"
        assert all(p.kind == p.KEYWORD_ONLY for p in list(ours.values())[len(theirs):])
    ours, mha = MaskedCrossModalAttention(E, H), nn.MultiheadAttention(E, H)
    for attr in ("embed_dim", "num_heads", "dropout", "batch_first", "head_dim", "kdim", "vdim",
                 "_qkv_same_embed_dim", "bias_k", "bias_v", "add_zero_attn", "training"):
        assert getattr(ours, attr) == getattr(mha, attr), attr


@pytest.mark.parametrize("kw", [dict(), dict(kdim=6, vdim=10), dict(bias=False), *EXTRAS,
                                dict(kdim=6, vdim=10, bias=False, add_bias_kv=True,
                                     add_zero_attn=True)], ids=str)
def test_state_dict_both_ways_and_init(kw):
    torch.manual_seed(1)  # MHA's initialization, draw for draw
    fresh = MaskedCrossModalAttention(E, H, **kw)
    torch.manual_seed(1)
    fresh_mha = nn.MultiheadAttention(E, H, **kw)
    assert list(fresh.state_dict()) == list(fresh_mha.state_dict())
    assert list(fresh._parameters) == list(fresh_mha._parameters)  # None entries too
    for (name, a), b in zip(fresh.state_dict().items(), fresh_mha.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=lambda m: f"init of {name}: {m}")
    ours, mha = _pair(**kw)  # MHA -> ours
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=_gen(9), dtype=p.dtype))
    mha.load_state_dict(ours.state_dict(), strict=True)  # ours -> MHA
    _matches(ours, mha, _inputs(kw.get("kdim", E), kw.get("vdim", E)), fused=True,
             need_weights=False)


# ---------------------------------------------------------------- layouts, dtypes, paths

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("kw", [dict(), dict(kdim=6, vdim=10), dict(bias=False),
                                dict(batch_first=True)], ids=str)
def test_default_layout_and_paths(kw, dtype):
    """MHA's defaults (sequence first unless batch_first=True), both paths, both dtypes."""
    ours, mha = _pair(dtype=dtype, **kw)
    inputs = _inputs(kw.get("kdim", E), kw.get("vdim", E),
                     "batch" if kw.get("batch_first") else "seq", dtype)
    _matches(ours, mha, inputs, fused=False)  # need_weights=True by default
    _matches(ours, mha, inputs, fused=True, need_weights=False)
    _matches(ours, mha, inputs, fused=False, average_attn_weights=False)
    _matches(ours, mha, inputs, fused=True, key_padding_mask=_kpm(), need_weights=False)


def test_fused_on_every_backend(backend):
    ours, mha = _pair(kdim=6, vdim=10, add_bias_kv=True, add_zero_attn=True)
    with run_on(backend, OP, backward=True):
        _matches(ours, mha, _inputs(6, 10), fused=True, key_padding_mask=_kpm(),
                 need_weights=False)
        _matches(ours, mha, _inputs(6, 10), fused=True, need_weights=False,
                 ours_only=dict(present=_present(), key_lengths=LENGTHS),
                 mha_only=dict(key_padding_mask=_expand(_present())))


@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("layout", ["seq", "batch"])
@pytest.mark.parametrize("kw", EXTRAS, ids=str)
def test_bias_kv_and_zero_attn(kw, layout, need_weights):
    """The appended keys stay visible whatever is masked: with present hiding every segment of
    sample 1 MHA's row is finite (it attends to the bias/zero key), and so is ours."""
    ours, mha = _pair(batch_first=layout == "batch", **kw)
    inputs = _inputs(layout=layout)
    fused = not need_weights
    present = _present()
    present[1] = False
    call = dict(need_weights=need_weights, average_attn_weights=False)
    _matches(ours, mha, inputs, fused, **call)
    _matches(ours, mha, inputs, fused, key_padding_mask=_kpm(), **call)
    _matches(ours, mha, inputs, fused, ours_only=dict(present=present, key_lengths=LENGTHS),
             mha_only=dict(key_padding_mask=_expand(present)), **call)
    float_kpm = torch.randn(B, LK, generator=_gen(8), dtype=torch.float64)
    _matches(ours, mha, inputs, False, key_padding_mask=float_kpm, **call)
    mask2 = torch.rand(LQ, LK, generator=_gen(9)) < 0.5  # rows fully masked: the extra keys
    _matches(ours, mha, inputs, False, attn_mask=mask2, **call)
    mask3 = torch.randn(B * H, LQ, LK, generator=_gen(10), dtype=torch.float64)
    _matches(ours, mha, inputs, False, attn_mask=mask3, **call)


@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("dtype", [torch.bool, torch.float64], ids=str)
@pytest.mark.parametrize("per_head", [False, True], ids=["2d", "3d"])
def test_attn_mask(per_head, dtype, need_weights):
    ours, mha = _pair()
    shape = (B * H, LQ, LK) if per_head else (LQ, LK)
    if dtype == torch.bool:
        mask = torch.rand(shape, generator=_gen(11)) < 0.5
        mask[..., 0] = False  # no row fully masked (MHA: NaN)
    else:
        mask = torch.randn(shape, generator=_gen(11), dtype=dtype)
        mask[..., 1] = float("-inf")
    _matches(ours, mha, _inputs(), False, attn_mask=mask, need_weights=need_weights)
    kpm = _kpm() if dtype == torch.bool else torch.randn(B, LK, generator=_gen(12),
                                                         dtype=torch.float64)
    _matches(ours, mha, _inputs(), False, attn_mask=mask, key_padding_mask=kpm,
             need_weights=need_weights)


@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("kw", [dict(), *EXTRAS], ids=str)
def test_is_causal(kw, need_weights):
    """MHA takes is_causal as a hint that attn_mask is causal; ours applies the causal mask
    (the fused op's) with or without the mask. With appended keys ours follows MHA's mask
    semantics (the attn_mask padded: appended keys visible to every query), as MHA's
    need_weights=True path computes them (its SDPA path, without a key_padding_mask, hides
    them from early queries instead), on the materialized path."""
    ours, mha = _pair(**kw)
    inputs = _inputs(lq=LK)  # self-attention sized: Lq = Lk
    causal = nn.Transformer.generate_square_subsequent_mask(LK, dtype=torch.float64)
    bool_causal = torch.ones(LK, LK, dtype=torch.bool).triu(1)
    fused = not need_weights and not kw
    oracle = dict(need_weights=True) if kw else {}  # MHA's mask semantics
    for kpm in (None, _kpm()):
        for mask in (causal, bool_causal):
            _matches(ours, mha, inputs, fused, attn_mask=mask, is_causal=True,
                     key_padding_mask=kpm, need_weights=need_weights, mha_only=oracle,
                     weights=need_weights or not kw)
        _matches(ours, mha, inputs, fused, ours_only=dict(is_causal=True),  # no mask needed
                 mha_only=dict(attn_mask=causal, is_causal=True, **oracle),
                 key_padding_mask=kpm, need_weights=need_weights, weights=need_weights or not kw)


@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("kw", [dict(), dict(kdim=6, vdim=10, add_bias_kv=True,
                                             add_zero_attn=True)], ids=str)
def test_unbatched(kw, need_weights):
    ours, mha = _pair(**kw)
    inputs = _inputs(kw.get("kdim", E), kw.get("vdim", E), "unbatched")
    call = dict(need_weights=need_weights, average_attn_weights=False)
    _matches(ours, mha, inputs, not need_weights, **call)
    _matches(ours, mha, inputs, not need_weights, key_padding_mask=_kpm()[0], **call)
    mask = torch.randn(H, LQ, LK, generator=_gen(13), dtype=torch.float64)  # (H, Lq, Lk)
    _matches(ours, mha, inputs, False, attn_mask=mask, **call)


def test_need_weights_false_returns_none_on_the_materialized_path():
    ours, mha = _pair()
    float_kpm = torch.randn(B, LK, generator=_gen(8), dtype=torch.float64)
    mask = torch.randn(LQ, LK, generator=_gen(9), dtype=torch.float64)
    for call in (dict(key_padding_mask=float_kpm), dict(attn_mask=mask)):
        out, w = _matches(ours, mha, _inputs(), False, need_weights=False, **call)
        assert w is None


# ---------------------------------------------------------------- train / eval, dtypes

def test_train_without_dropout_and_eval():
    ours, mha = _pair()
    for mode in (True, False):
        ours.train(mode), mha.train(mode)
        _matches(ours, mha, _inputs(), True, need_weights=False, key_padding_mask=_kpm())
        _matches(ours, mha, _inputs(), False, key_padding_mask=_kpm())


def test_dropout_materialized_draws_as_mha():
    """need_weights=True: the weights' dropout draws from torch's RNG on a tensor of MHA's
    size and order, so with the same seed it drops what MHA drops."""
    ours, mha = _pair(dropout=0.3, add_bias_kv=True)
    inputs = _inputs()
    torch.manual_seed(5)
    out, w, grads = _run(ours, inputs, key_padding_mask=_kpm(), average_attn_weights=False)
    torch.manual_seed(5)
    want_out, want_w, want_grads = _run(mha, inputs, key_padding_mask=_kpm(),
                                        average_attn_weights=False)
    assert (want_w == 0).float().mean() > 0.2  # dropout did act
    _close(w, want_w, "weights", 1e-10)
    _close(out, want_out, "output", 1e-10)
    for name in grads:
        _close(grads[name], want_grads[name], name, 1e-10)


def test_dropout_fused_is_unbiased():
    """The fused op's dropout (its own Philox stream) cannot draw MHA's mask; its mean over
    draws is MHA's eval output, and one draw is not."""
    ours, mha = _pair(dropout=0.5)
    q, k, v = (x.detach() for x in _inputs())
    mha.eval()
    want = mha(q, k, v, need_weights=False)[0]
    torch.manual_seed(0)
    with torch.no_grad():
        draws = torch.stack([ours(q, k, v, need_weights=False)[0] for _ in range(2000)])
    assert (draws[0] - want).abs().max() > 0.05
    z = (draws.mean(0) - want).abs() / (draws.std(0) / len(draws) ** 0.5).clamp_min(1e-12)
    assert z.max() < 5, f"mean of the draws off by {z.max():.2f} standard errors"


def test_mixed_dtype_bias_as_mha():
    """A half in_proj_bias with double weights and query: MHA promotes it where its layout
    sends the projection through matmul + add (batch-first input: transposed, non-contiguous);
    ours gives that double result on every layout. Oracle: MHA with the bias's values in
    double, which equals MHA with the half bias wherever that one runs."""
    for batch_first in (True, False):
        ours, mha = _pair(batch_first=batch_first)
        half = mha.in_proj_bias.detach().half()
        ours.in_proj_bias = nn.Parameter(half.clone())
        q, k, v = _inputs(layout="batch" if batch_first else "seq")
        for args in ((q, q, q), (q, k, v)):
            with torch.no_grad():
                for need_weights in (True, False):
                    mha.in_proj_bias = nn.Parameter(half.double())
                    want = mha(*args, need_weights=need_weights)[0]
                    got = ours(*args, need_weights=need_weights)[0]
                    assert got.dtype == torch.float64
                    _close(got, want, "output", 1e-10)
                    mha.in_proj_bias = nn.Parameter(half.clone())
                    try:
                        tolerated = mha(*args, need_weights=need_weights)[0]
                    except RuntimeError:  # contiguous (L, B, E) input: addmm wants one dtype
                        assert not batch_first
                        continue
                    _close(tolerated, want, "MHA with the half bias", 1e-10)


# ---------------------------------------------------------------- the deliberate differences

@pytest.mark.parametrize("need_weights", [True, False])
def test_rows_without_keys_are_zero_where_mha_is_nan(need_weights):
    """Sample 1 keeps no key (all padded / no modality present), sample 2 only a 1-key segment:
    MHA's sample 1 is NaN, ours exactly 0 (weights too) with finite gradients, 0 for its query
    and keys; the other samples, and every parameter's gradient (sample 1 adds nothing to it),
    equal MHA's on those samples alone."""
    ours, mha = _pair()
    present = _present()
    present[1] = False
    kpm = _expand(present)
    q, k, v = _inputs()
    with torch.no_grad():
        mha_out, mha_w = mha(q, k, v, key_padding_mask=kpm)
    assert torch.isnan(mha_out[:, 1]).all() and torch.isnan(mha_w[1]).all()  # the oracle's NaN
    rows = [0, 2, 3]
    g = torch.randn(LQ, B, E, generator=_gen(6), dtype=torch.float64)
    sub = [x.detach()[:, rows].requires_grad_() for x in (q, k, v)]
    want_out, want_w = mha(*sub, key_padding_mask=kpm[rows], need_weights=need_weights)
    named = list(mha.named_parameters())
    want = torch.autograd.grad(want_out, [p for _, p in named] + sub, g[:, rows])
    for ours_call in (dict(key_padding_mask=kpm), dict(present=present, key_lengths=LENGTHS)):
        before = _op_calls()
        out, w = ours(q, k, v, need_weights=need_weights, **ours_call)
        assert (_op_calls() > before) == (not need_weights)
        got = torch.autograd.grad(out, [p for _, p in ours.named_parameters()] + [q, k, v], g)
        assert (out[:, 1] == 0).all() and (w is None or (w[1] == 0).all())
        assert all(torch.isfinite(x).all() for x in got)
        assert all((x[:, 1] == 0).all() for x in got[-3:])  # query, key, value of sample 1
        _close(out[:, rows], want_out, "other samples", 1e-10)
        if need_weights:
            _close(w[rows], want_w, "weights of the other samples", 1e-10)
        for (name, _), a, b in zip(named, got, want):
            _close(a, b, f"grad {name}", 1e-10)
        for name, a, b in zip(("query", "key", "value"), got[-3:], want[-3:]):
            _close(a[:, rows], b, f"grad {name}", 1e-10)


def _shape_cases():
    q3, q2 = torch.randn(4, 4, 4), torch.randn(4, 4)
    return [
        (q3, torch.randn(4, 4), q3, {}), (q3, q3, torch.randn(4, 4), {}),
        (q3, q3, q3, dict(key_padding_mask=torch.tensor([False, False, True, True]))),
        (q3, q3, q3, dict(attn_mask=torch.tensor([False, False, True, True]))),
        (q2, torch.randn(4, 4, 4), q2, {}), (q2, q2, torch.randn(4, 4, 4), {}),
        (q2, q2, q2, dict(key_padding_mask=torch.zeros(1, 4, dtype=torch.bool))),
        (q2, q2, q2, dict(attn_mask=torch.zeros(5, 4, 4, dtype=torch.bool))),
        (torch.randn(4), torch.randn(4), torch.randn(4), {}),
        (q3, q3, q3, dict(attn_mask=torch.zeros(3, 4, dtype=torch.bool))),      # MHA: Runtime
        (q3, q3, q3, dict(attn_mask=torch.zeros(3, 4, 4, dtype=torch.bool))),   # MHA: Runtime
        (q3, torch.randn(4, 4, 5), torch.randn(4, 4, 5), {}),                   # kdim
    ]


@pytest.mark.parametrize("case", range(12))
@pytest.mark.parametrize("need_weights", [True, False])
def test_bad_shapes(case, need_weights):
    q, k, v, masks = _shape_cases()[case]
    mha, ours = nn.MultiheadAttention(4, 4), MaskedCrossModalAttention(4, 4)
    with pytest.raises((AssertionError, RuntimeError)) as theirs:
        mha(q, k, v, need_weights=need_weights, **masks)
    with pytest.raises(AttentionShapeError) as got:
        ours(q, k, v, need_weights=need_weights, **masks)
    assert isinstance(got.value, ValueError) and isinstance(got.value, AssertionError)
    if case < 9:  # MHA's rank checks: the same message, word for word
        assert str(got.value) == str(theirs.value)
