"""robustmm_fast.nn.MaskedCrossModalAttention and CrossModalTransformer.

The layer is checked against nn.MultiheadAttention with copied weights (values and every
gradient, with a random upstream gradient); the transformer against a plain-PyTorch MulT
restatement built on F.multi_head_attention_forward with the same parameters. Fused-path
forwards run on a named backend (`run_on(backend, "masked_attention")`); the materialized path
(need_weights=True, attn_mask, float masks) must not call the op at all.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robustmm_fast import _backend
from robustmm_fast.nn import CrossModalTransformer, MaskedCrossModalAttention

from conftest import require_cpp, run_on

OP = "masked_attention"
E, H = 12, 3           # head_dim 4
B, LQ, LK = 4, 5, 7    # awkward, non-power-of-two
LENGTHS = [3, 1, 3]    # three modality segments of the keys


@pytest.fixture(autouse=True)
def _cpp_kernel_built(request):
    """A stale extension without the masked_attention kernel skips the cpp backend (fails in CI)."""
    if "backend" in request.fixturenames and request.getfixturevalue("backend") == "cpp":
        require_cpp(OP)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _pair(seed=0, **kw):
    """(ours, MHA) with the same random weights and nonzero biases, MHA -> ours."""
    torch.manual_seed(seed)
    mha = nn.MultiheadAttention(E, H, batch_first=kw.get("batch_first", True),
                                **{k: v for k, v in kw.items() if k != "batch_first"})
    with torch.no_grad():
        for name, p in mha.named_parameters():
            if "bias" in name:
                p.normal_(0, 0.5, generator=_gen(seed + 1))
    ours = MaskedCrossModalAttention(E, H, batch_first=kw.get("batch_first", True),
                                     **{k: v for k, v in kw.items() if k != "batch_first"})
    ours.load_state_dict(mha.state_dict())
    return ours, mha


def _qkv(kdim=E, vdim=E, batch_first=True, lq=LQ, lk=LK, seed=3):
    g = _gen(seed)
    shapes = [(B, lq, E), (B, lk, kdim), (B, lk, vdim)]
    xs = [torch.randn(*s, generator=g) for s in shapes]
    if not batch_first:
        xs = [x.transpose(0, 1).contiguous() for x in xs]
    return [x.requires_grad_() for x in xs]


def _present():
    """Rows: all present, none, only segment 0, random."""
    p = torch.rand(B, len(LENGTHS), generator=_gen(5)) < 0.5
    p[0], p[1], p[2] = True, False, False
    p[2, 0], p[3, 1] = True, True
    return p


def _expand(present, lengths=LENGTHS):
    """present (B, M) -> key_padding_mask (B, Lk) by hand."""
    return torch.cat([(~present[:, m:m + 1]).expand(-1, n) for m, n in enumerate(lengths)], 1)


def _grads(module, inputs, out, g):
    params = [p for _, p in module.named_parameters()]
    got = torch.autograd.grad(out, params + inputs, g, allow_unused=True)
    names = [n for n, _ in module.named_parameters()] + [f"in{i}" for i in range(len(inputs))]
    return dict(zip(names, got))


def _assert_same(a, b, name="", tol=1e-5):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=lambda m: f"{name}: {m}")


def _op_calls():
    return sum(n for (op, _), n in _backend.backend_calls.items() if op == OP)


# ---------------------------------------------------------------- the layer vs MHA

@pytest.mark.parametrize("kw", [dict(), dict(kdim=6, vdim=10), dict(bias=False),
                                dict(kdim=6, vdim=10, bias=False)], ids=str)
def test_state_dict_loads_both_ways(kw):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, H, batch_first=True, **kw)
    ours = MaskedCrossModalAttention(E, H, batch_first=True, **kw)
    assert {k: v.shape for k, v in ours.state_dict().items()} == \
        {k: v.shape for k, v in mha.state_dict().items()}
    assert list(ours._parameters) == list(mha._parameters)  # None entries too, in MHA's order
    torch.manual_seed(1)  # MHA's initialization, draw for draw
    fresh = MaskedCrossModalAttention(E, H, **kw)
    torch.manual_seed(1)
    fresh_mha = nn.MultiheadAttention(E, H, **kw)
    for (name, a), b in zip(fresh.state_dict().items(), fresh_mha.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=lambda m: f"init of {name}: {m}")
    separate = "kdim" in kw
    assert (ours.in_proj_weight is None) == separate and (ours.k_proj_weight is None) != separate
    ours.load_state_dict(mha.state_dict(), strict=True)
    with torch.no_grad():  # ours -> MHA as well: new weights, same outputs
        for p in ours.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=_gen(9)))
    mha.load_state_dict(ours.state_dict(), strict=True)
    q, k, v = _qkv(kw.get("kdim", E), kw.get("vdim", E))
    with run_on("reference", OP):
        got = ours(q, k, v, need_weights=False)[0]
    _assert_same(got, mha(q, k, v, need_weights=False)[0], "ours -> MHA")


@pytest.mark.parametrize("kw", [dict(), dict(batch_first=False), dict(kdim=6, vdim=10),
                                dict(bias=False),
                                dict(kdim=6, vdim=10, bias=False, batch_first=False)],
                         ids=str)
def test_matches_mha_fused(backend, kw):
    """need_weights=False + bool key_padding_mask: the fused op; values and all gradients."""
    ours, mha = _pair(**kw)
    bf = kw.get("batch_first", True)
    q, k, v = _qkv(kw.get("kdim", E), kw.get("vdim", E), bf)
    kpm = torch.rand(B, LK, generator=_gen(4)) < 0.4
    kpm[:, 2] = False  # no fully masked row here (MHA's NaN is tested below)
    with run_on(backend, OP):
        out, w = ours(q, k, v, key_padding_mask=kpm, need_weights=False)
        assert w is None
        ref = mha(q, k, v, key_padding_mask=kpm, need_weights=False)[0]
        _assert_same(out, ref, "out")
        g = torch.randn(out.shape, generator=_gen(6))
        got, want = _grads(ours, [q, k, v], out, g), _grads(mha, [q, k, v], ref, g)
    assert got.keys() == want.keys()
    for name in got:
        assert got[name] is not None and torch.isfinite(got[name]).all(), name
        _assert_same(got[name], want[name], name, tol=2e-5)


@pytest.mark.parametrize("average", [True, False])
@pytest.mark.parametrize("batch_first", [True, False])
def test_need_weights_matches_mha(average, batch_first):
    """need_weights=True (MHA's default): the materialized path returns MHA's weights; the
    fused op is not called."""
    ours, mha = _pair(batch_first=batch_first)
    q, k, v = _qkv(batch_first=batch_first)
    kpm = torch.zeros(B, LK, dtype=torch.bool)
    kpm[1, 3:] = True
    before = _op_calls()
    out, w = ours(q, k, v, key_padding_mask=kpm, average_attn_weights=average)
    assert _op_calls() == before, "need_weights=True must not run the fused op"
    ref, ref_w = mha(q, k, v, key_padding_mask=kpm, average_attn_weights=average)
    _assert_same(out, ref, "out")
    _assert_same(w, ref_w, "weights")
    assert w.shape == ((B, LQ, LK) if average else (B, H, LQ, LK))
    g = torch.randn(out.shape, generator=_gen(6))
    got, want = _grads(ours, [q, k, v], out, g), _grads(mha, [q, k, v], ref, g)
    for name in got:
        _assert_same(got[name], want[name], name, tol=2e-5)


def test_unbatched_matches_mha():
    ours, mha = _pair()
    q, k, v = (x[0].detach() for x in _qkv())
    kpm = torch.zeros(LK, dtype=torch.bool)
    kpm[:2] = True
    with run_on("reference", OP):
        out = ours(q, k, v, key_padding_mask=kpm, need_weights=False)[0]
    _assert_same(out, mha(q, k, v, key_padding_mask=kpm, need_weights=False)[0], "fused")
    out, w = ours(q, k, v, key_padding_mask=kpm)
    ref, ref_w = mha(q, k, v, key_padding_mask=kpm)
    assert out.shape == (LQ, E) and w.shape == (LQ, LK)
    _assert_same(out, ref, "out")
    _assert_same(w, ref_w, "weights")


def test_float_key_padding_mask_is_additive():
    """MHA adds a float key_padding_mask to the scores: so do we (materialized path)."""
    ours, mha = _pair()
    q, k, v = _qkv()
    kpm = torch.randn(B, LK, generator=_gen(7))
    kpm[:, 0] = float("-inf")
    before = _op_calls()
    out = ours(q, k, v, key_padding_mask=kpm, need_weights=False)[0]
    assert _op_calls() == before
    _assert_same(out, mha(q, k, v, key_padding_mask=kpm, need_weights=False)[0], "out")


@pytest.mark.parametrize("dtype", [torch.bool, torch.float32])
@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("need_weights", [False, True])
def test_attn_mask_matches_mha(dtype, per_head, need_weights):
    """attn_mask (Lq, Lk) or (B*H, Lq, Lk), bool or float: the materialized fallback."""
    ours, mha = _pair()
    q, k, v = _qkv()
    shape = (B * H, LQ, LK) if per_head else (LQ, LK)
    if dtype == torch.bool:
        mask = torch.rand(shape, generator=_gen(8)) < 0.4
        mask[..., 0] = False  # every row keeps a key (a fully masked row is NaN in MHA)
    else:
        mask = torch.randn(shape, generator=_gen(8))
    before = _op_calls()
    out, w = ours(q, k, v, attn_mask=mask, need_weights=need_weights)
    assert _op_calls() == before
    ref, ref_w = mha(q, k, v, attn_mask=mask, need_weights=need_weights)
    _assert_same(out, ref, "out")
    if need_weights:
        _assert_same(w, ref_w, "weights")
    g = torch.randn(out.shape, generator=_gen(6))
    got, want = _grads(ours, [q, k, v], out, g), _grads(mha, [q, k, v], ref, g)
    for name in got:
        _assert_same(got[name], want[name], name, tol=2e-5)


def test_is_causal(backend):
    """is_causal=True (alone, or with the causal attn_mask as its hint) is MHA with the causal
    mask; fused and materialized agree, including rows left with no key (0)."""
    ours, mha = _pair()
    q, k, v = _qkv(lk=LQ)
    causal = torch.ones(LQ, LQ, dtype=torch.bool).triu(1)
    with run_on(backend, OP):
        out = ours(q, k, v, need_weights=False, is_causal=True)[0]
        hinted = ours(q, k, v, need_weights=False, attn_mask=causal, is_causal=True)[0]
    ref = mha(q, k, v, attn_mask=causal, need_weights=False)[0]
    _assert_same(out, ref, "is_causal")
    _assert_same(hinted, ref, "is_causal + attn_mask hint")
    kpm = torch.zeros(B, LQ, dtype=torch.bool)
    kpm[0, :2] = True  # sample 0: rows 0 and 1 have no key left
    kpm[1] = True
    with run_on(backend, OP):
        fused = ours(q, k, v, key_padding_mask=kpm, need_weights=False, is_causal=True)[0]
    mat = ours(q, k, v, key_padding_mask=kpm, is_causal=True)[0]
    _assert_same(fused, mat, "fused vs materialized")
    assert (fused[0, :2] == 0).all() and (fused[1] == 0).all() and (fused[0, 2:] != 0).any()


@pytest.mark.parametrize("need_weights", [False, True])
def test_fully_masked_rows_are_zero(backend, need_weights):
    """A row with no key left: MHA gives NaN (need_weights=True) or out_proj.bias; we give
    exactly 0, with finite gradients; the other rows match MHA."""
    ours, mha = _pair()
    q, k, v = _qkv()
    present = _present()  # row 1: nothing present
    kpm = _expand(present)
    with run_on(backend, OP) if not need_weights else torch.enable_grad():
        out = ours(q, k, v, need_weights=need_weights, present=present, key_lengths=LENGTHS)[0]
        out.backward(torch.randn(out.shape, generator=_gen(6)))
    ref = mha(q, k, v, key_padding_mask=kpm)[0]
    assert torch.isnan(ref[1]).all(), "MHA was expected to give NaN for a fully masked row"
    assert (out[1] == 0).all()
    keep = [0, 2, 3]
    _assert_same(out[keep], ref[keep], "other rows")
    for name, p in ours.named_parameters():
        assert torch.isfinite(p.grad).all(), name
    assert (q.grad[1] == 0).all() and torch.isfinite(k.grad).all() and torch.isfinite(v.grad).all()


def test_present_equals_key_padding_mask(backend):
    """present/key_lengths (with an extra padding mask) = the key_padding_mask built by hand."""
    ours, _ = _pair()
    q, k, v = _qkv()
    present = _present()
    pad = torch.rand(B, LK, generator=_gen(11)) < 0.2
    g = torch.randn(B, LQ, E, generator=_gen(6))
    with run_on(backend, OP):
        a = ours(q, k, v, need_weights=False, present=present, key_lengths=LENGTHS,
                 key_padding_mask=pad)[0]
        ga = _grads(ours, [q, k, v], a, g)
        b = ours(q, k, v, need_weights=False, key_padding_mask=_expand(present) | pad)[0]
        gb = _grads(ours, [q, k, v], b, g)
    _assert_same(a, b, "out", tol=1e-6)
    for name in ga:
        _assert_same(ga[name], gb[name], name, tol=1e-6)


@pytest.mark.parametrize("need_weights", [False, True])
def test_nan_in_absent_inputs_does_not_leak(backend, need_weights):
    """NaN in absent modalities' and padded keys/values: output and every gradient equal the
    run with zeros there; those inputs get gradient 0."""
    ours, _ = _pair(kdim=6, vdim=10)
    present = _present()
    pad = torch.zeros(B, LK, dtype=torch.bool)
    pad[3, -1] = True
    drop = _expand(present) | pad
    results = []
    for fill in (0.0, float("nan")):
        q, k, v = _qkv(6, 10)
        with torch.no_grad():
            k[drop], v[drop] = fill, fill
        ctx = run_on(backend, OP) if not need_weights else torch.enable_grad()
        with ctx:
            out = ours(q, k, v, key_padding_mask=pad, need_weights=need_weights, present=present,
                       key_lengths=LENGTHS)[0]
            g = torch.randn(out.shape, generator=_gen(6))
            results.append((out, _grads(ours, [q, k, v], out, g)))
    (a, ga), (b, gb) = results
    assert torch.isfinite(b).all()
    _assert_same(b, a, "out", tol=0)
    for name in ga:
        assert torch.isfinite(gb[name]).all(), name
        _assert_same(gb[name], ga[name], name, tol=0)
    assert (gb["in1"][drop] == 0).all() and (gb["in2"][drop] == 0).all()


def test_dropout_train_vs_eval(backend):
    """eval: no dropout (= the same weights with dropout 0, = MHA in eval); train: dropped."""
    ours, mha = _pair(dropout=0.5)
    q, k, v = _qkv()
    ours.eval(), mha.eval()
    with run_on(backend, OP):
        ev = ours(q, k, v, need_weights=False)[0]
    _assert_same(ev, mha(q, k, v, need_weights=False)[0], "eval")
    ours.train()
    with run_on(backend, OP):
        torch.manual_seed(1)
        tr = ours(q, k, v, need_weights=False)[0]
        torch.manual_seed(1)
        tr2 = ours(q, k, v, need_weights=False)[0]
        tr.sum().backward()
    assert not torch.allclose(tr, ev, atol=1e-3), "train mode did not drop anything"
    _assert_same(tr, tr2, "seeded train runs", tol=0)
    assert all(torch.isfinite(p.grad).all() for p in ours.parameters())
    torch.manual_seed(1)
    out, w = ours(q, k, v)  # materialized: weights after dropout, as MHA returns them
    assert not torch.allclose(out, ev, atol=1e-3) and (w == 0).any()


def test_rejects_unsupported():
    with pytest.raises(ValueError, match="multiple of num_heads"):
        MaskedCrossModalAttention(10, 3)
    m = MaskedCrossModalAttention(E, H, batch_first=True)
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="present needs key_lengths"):
        m(q, k, v, present=_present(), need_weights=False)
    with pytest.raises(ValueError, match="summing to Lk"):
        m(q, k, v, present=_present(), key_lengths=[1, 1, 1], need_weights=False)
    with pytest.raises(TypeError, match="key_padding_mask must be bool"):
        m(q, k, v, key_padding_mask=torch.zeros(B, LK, dtype=torch.int64))
    with pytest.raises(ValueError, match="attn_mask must have shape"):
        m(q, k, v, attn_mask=torch.zeros(LQ, LK + 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="expected query"):
        m(q, k[..., :5], v)


@pytest.fixture(scope="module")
def compiled_layer():
    """One module and its forward, shared by the backends; each test compiles it (fullgraph)
    afresh inside its backend's block: the backend in effect at tracing is compiled in."""
    ours, _ = _pair(kdim=6, vdim=10)

    def f(q, k, v, present, pad):
        return ours(q, k, v, key_padding_mask=pad, need_weights=False, present=present,
                    key_lengths=LENGTHS)[0]
    return ours, f, lambda: torch.compile(f, fullgraph=True)


def test_compile_layer_matches_eager(backend, compiled_layer):
    ours, eager, compile_ = compiled_layer
    torch._dynamo.reset()  # the backend is fixed when the graph is traced
    compiled = compile_()
    q, k, v = _qkv(6, 10)
    present, pad = _present(), torch.rand(B, LK, generator=_gen(11)) < 0.2
    g = torch.randn(B, LQ, E, generator=_gen(6))
    with run_on(backend, OP):
        a = compiled(q, k, v, present, pad)
        ga = _grads(ours, [q, k, v], a, g)
    with run_on(backend, OP):
        b = eager(q, k, v, present, pad)
        gb = _grads(ours, [q, k, v], b, g)
    _assert_same(a, b, "out", tol=1e-6)
    for name in ga:
        _assert_same(ga[name], gb[name], name, tol=1e-5)


# ---------------------------------------------------------------- CrossModalTransformer

SRC_LENS = [4, 2, 3]


def _sources(seed=12, lens=SRC_LENS):
    g = _gen(seed)
    return [torch.randn(B, n, E, generator=g, dtype=torch.float64) for n in lens]


def _target(seed=13, lt=LQ):
    return torch.randn(B, lt, E, generator=_gen(seed), dtype=torch.float64)


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    m = CrossModalTransformer(E, H, **{"layers": 2, **kw}).double()
    with torch.no_grad():  # LayerNorms away from identity, so their gradients are checked
        for name, p in m.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=_gen(seed + 1), dtype=p.dtype))
    return m


def _positions(n, dim):
    """MulT's sinusoid table (fairseq's): rows 1..n, [sin | cos] halves."""
    half = dim // 2
    freq = torch.exp(torch.arange(half, dtype=torch.float64) * -(math.log(10000.0) / (half - 1)))
    ang = torch.arange(1, n + 1, dtype=torch.float64)[:, None] * freq[None]
    return torch.cat([ang.sin(), ang.cos()], 1)


def _restated_layer(blk, x, s, kpm, causal):
    """MulT's TransformerEncoderLayer with F.multi_head_attention_forward on blk's parameters."""
    a = blk.attn
    h = blk.attn_norm(x)
    s = h if s is None else blk.attn_norm(s)
    mask = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).triu(1) if causal else None
    if kpm is not None and mask is not None:
        mask = mask.unsqueeze(0) | kpm.unsqueeze(1)             # (B, Lq, Lk)
        mask = mask.repeat_interleave(H, 0)
        kpm = None
    att, _ = F.multi_head_attention_forward(
        h.transpose(0, 1), s.transpose(0, 1), s.transpose(0, 1), E, H, a.in_proj_weight,
        a.in_proj_bias, None, None, False, 0.0, a.out_proj.weight, a.out_proj.bias,
        training=False, key_padding_mask=kpm, need_weights=False, attn_mask=mask)
    if kpm is not None:  # MHA's SDPA path gives out_proj.bias for a row with no key; we give 0
        att = att.masked_fill(kpm.all(1).view(1, -1, 1), 0.0)
    x = x + att.transpose(0, 1)
    return x + blk.fc2(F.relu(blk.fc1(blk.ffn_norm(x))))


def _restated(model, target, sources, present, pad):
    """MulT in plain PyTorch: scale + per-source positions, MHA layers, final LayerNorms."""
    emb = lambda t: math.sqrt(E) * t + _positions(t.shape[1], E)
    x = emb(target)
    s = torch.cat([emb(t) for t in sources], 1)
    kpm = _expand(present, [t.shape[1] for t in sources]) | pad
    for blk in model.cross.layers:
        x = _restated_layer(blk, x, s, kpm, False)
    x = model.cross.norm(x)
    if model.memory is not None:
        x = emb(x)
        for blk in model.memory.layers:
            x = _restated_layer(blk, x, None, None, True)
        x = model.memory.norm(x)
    return x


def test_transformer_matches_mult_restatement(backend):
    """Values and every parameter's gradient, cross stack + causal memory stack; rows with no
    source present get no cross-modal update."""
    model = _model(memory_layers=2)
    target, sources = _target().requires_grad_(), _sources()
    present = _present()
    pad = torch.zeros(B, sum(SRC_LENS), dtype=torch.bool)
    pad[3, 1], pad[2, 7] = True, True
    pads = [pad[:, :4], None, pad[:, 6:]]  # None: no padding in source 1
    g = torch.randn(B, LQ, E, generator=_gen(6), dtype=torch.float64)
    with run_on(backend, OP):
        out = model(target, sources, present=present, key_padding_mask=pads)
        got = _grads(model, [target], out, g)
    ref = _restated(model, target, sources, present, pad)
    want = _grads(model, [target], ref, g)
    assert out.shape == (B, LQ, E)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)
    for name in got:
        assert got[name] is not None and got[name].abs().sum() > 0, f"no gradient reaches {name}"
        torch.testing.assert_close(got[name], want[name], rtol=1e-8, atol=1e-9,
                                   msg=lambda m: f"{name}: {m}")


def test_transformer_sources_list_tensor_and_order(backend):
    """A list of sources = their concatenation with key_lengths; positions restart per
    segment, so reordering the sources (with present and masks) changes nothing."""
    model = _model()
    target, sources = _target(), _sources()
    present = _present()
    pads = [torch.rand(B, n, generator=_gen(20 + i)) < 0.3 for i, n in enumerate(SRC_LENS)]
    with run_on(backend, OP):
        a = model(target, sources, present=present, key_padding_mask=pads)
        b = model(target, torch.cat(sources, 1), present=present, key_lengths=SRC_LENS,
                  key_padding_mask=torch.cat(pads, 1))
        order = [2, 0, 1]
        c = model(target, [sources[i] for i in order], present=present[:, order],
                  key_padding_mask=[pads[i] for i in order])
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="disagree"):
        model(target, sources, key_lengths=[1, 1, 1])


def test_transformer_nan_in_absent_inputs(backend):
    """NaN in absent sources, padded source tokens and padded target tokens: outputs at real
    target tokens and every gradient equal the zero-filled run."""
    model = _model(memory_layers=1)
    present = _present()
    spad = torch.zeros(B, sum(SRC_LENS), dtype=torch.bool)
    spad[0, 1] = True
    tpad = torch.zeros(B, LQ, dtype=torch.bool)
    tpad[0, -2:] = True
    drop = _expand(present, SRC_LENS) | spad
    runs = []
    for fill in (0.0, float("nan")):
        target, src = _target(), torch.cat(_sources(), 1)
        target[tpad], src[drop] = fill, fill
        target.requires_grad_(), src.requires_grad_()
        with run_on(backend, OP):
            out = model(target, src, present=present, key_lengths=SRC_LENS, key_padding_mask=spad,
                        target_padding_mask=tpad)
            out = out.masked_fill(tpad.unsqueeze(-1), 0.0)  # a loss ignores padded targets
            runs.append((out, _grads(model, [target, src], out, torch.ones_like(out))))
    (a, ga), (b, gb) = runs
    torch.testing.assert_close(b, a, rtol=0, atol=0)
    for name in ga:
        assert torch.isfinite(gb[name]).all(), name
        torch.testing.assert_close(gb[name], ga[name], rtol=0, atol=0, msg=lambda m: f"{name}: {m}")


def test_transformer_memory_stack_is_causal(backend):
    """Cross attention and the FFN act per target token and the memory stack is causal, so
    output t depends on target tokens <= t only; memory_causal=False breaks that."""
    target, sources = _target(), _sources()
    later = target.clone()
    later[:, 3:] += torch.randn(B, LQ - 3, E, generator=_gen(14), dtype=torch.float64)
    for causal in (True, False):
        model = _model(memory_layers=2, memory_causal=causal)
        with run_on(backend, OP):
            a, b = model(target, sources), model(later, sources)
        same = torch.allclose(a[:, :3], b[:, :3], rtol=0, atol=1e-12)
        assert same == causal, f"memory_causal={causal}"


def test_transformer_dropout_train_vs_eval(backend):
    kw = dict(attn_dropout=0.2, relu_dropout=0.2, res_dropout=0.2, embed_dropout=0.2,
              memory_layers=1)
    model, plain = _model(**kw), _model(memory_layers=1)
    target, sources = _target(), _sources()
    model.eval()
    with run_on(backend, OP):
        ev = model(target, sources)
        torch.testing.assert_close(ev, plain(target, sources), rtol=0, atol=0)
        model.train()
        tr = model(target, sources)
    assert not torch.allclose(tr, ev, atol=1e-3)


@pytest.fixture(scope="module")
def compiled_transformer():
    """fullgraph capture of the whole stack, forward and backward (AOT autograd); aot_eager
    skips inductor's code generation, which the layer's compile test already covers and which
    would take most of this file's time here."""
    model = _model(layers=1, memory_layers=1).float()

    def f(target, sources, present):
        return model(target, sources, present=present)
    return model, f, lambda: torch.compile(f, fullgraph=True, backend="aot_eager")


def test_transformer_compile_matches_eager(backend, compiled_transformer):
    model, eager, compile_ = compiled_transformer
    torch._dynamo.reset()  # the backend is fixed when the graph is traced
    compiled = compile_()
    target = _target().float().requires_grad_()
    sources = [s.float() for s in _sources()]
    present = _present()
    g = torch.randn(B, LQ, E, generator=_gen(6))
    with run_on(backend, OP):
        a = compiled(target, sources, present)
        ga = _grads(model, [target], a, g)
    with run_on(backend, OP):
        b = eager(target, sources, present)
        gb = _grads(model, [target], b, g)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], rtol=1e-4, atol=1e-5,
                                   msg=lambda m: f"{name}: {m}")
