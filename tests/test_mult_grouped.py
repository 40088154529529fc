"""MulTFusion's grouped path (nn/grouped_mult.py) against its per-block loop, the reference.

Same weights, the same inputs: outputs and the gradients of the inputs and of every parameter
agree -- float64 to 1e-10, float32 to a few ulps of the values -- in eval mode and in train mode
with every dropout at p = 0, with modalities missing (per sample, for the whole batch, all but
one), on vectors (L = 1) and sequences (L = 3 with padding), causal or not, M = 2, 3, 6.
Dropout p > 0 is checked by structure: only the stacks
whose source has attention dropout change (the fused attention gets that p for exactly
their rows), and each group draws its own dropout masks.
"""
from __future__ import annotations

import pytest
import torch

from robustmm_fast.nn import grouped_mult
from robustmm_fast.nn.cross_modal_transformer import CrossModalTransformer, _Stack
from robustmm_fast.nn.multimodal_fusion import MulTFusion

pytestmark = pytest.mark.usefixtures("one_thread")

E, HEADS, B = 8, 2, 5
MASKS = ("complete", "some_samples", "one_absent_everywhere", "all_but_one")


@pytest.fixture
def grouped_calls(monkeypatch):
    """How many times grouped_mult.grouped_stacks ran (2 per grouped forward)."""
    calls = []
    original = grouped_mult.grouped_stacks

    def counting(*args, **kwargs):
        calls.append(len(args[0]))
        return original(*args, **kwargs)

    monkeypatch.setattr(grouped_mult, "grouped_stacks", counting)
    return calls


def _fusion(M, causal=True, dtype=torch.float64, **dropouts):
    torch.manual_seed(0)
    return MulTFusion(M, E, HEADS, 2, memory_layers=2, causal=causal, **dropouts).to(dtype)


def _available(M, case):
    g = torch.Generator().manual_seed(1)
    avail = torch.ones(B, M, dtype=torch.bool)
    if case == "some_samples":
        avail = torch.rand(B, M, generator=g) < 0.6
        avail[0] = False            # a sample with nothing
        avail[1] = True             # and one complete
        avail[2, 1:] = False        # one with only modality 0
    elif case == "one_absent_everywhere":
        avail[:, M - 1] = False
    elif case == "all_but_one":
        avail[:, 1:] = False
    return avail


def _inputs(M, L, case, dtype=torch.float64):
    g = torch.Generator().manual_seed(2)
    feats = [torch.randn(B, L, E, generator=g, dtype=dtype).requires_grad_() for _ in range(M)]
    pads = [torch.zeros(B, L, dtype=torch.bool) for _ in range(M)]
    if L > 1:
        for m, pad in enumerate(pads):
            pad |= torch.rand(B, L, generator=g) < 0.25
            pad[1, 0] = True         # a leading pad: causal queries before the first key
            pad[3, 1:] = m % 2 == 0  # trailing pads on half the modalities
            pad[4] = m == 0          # one fully padded sequence
    return feats, pads, _available(M, case)


def _run(fusion, grouped, feats, pads, avail):
    """(output, input gradients, {parameter name: gradient}) of a fixed linear loss."""
    fusion.grouped = grouped
    fusion.zero_grad(set_to_none=True)
    for f in feats:
        f.grad = None
    out = fusion(feats, pads, avail)
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    (out * weights).sum().backward()
    grads = {n: p.grad for n, p in fusion.named_parameters()}
    return out.detach(), [f.grad for f in feats], grads


def _assert_paths_agree(fusion, feats, pads, avail, grouped_calls, **tol):
    ref_out, ref_inputs, ref_params = _run(fusion, False, feats, pads, avail)
    assert not grouped_calls
    out, inputs, params = _run(fusion, True, feats, pads, avail)
    assert grouped_calls == [len(fusion.cross) * (len(fusion.cross) - 1), len(fusion.cross)]
    torch.testing.assert_close(out, ref_out, **tol)
    for i, (a, b) in enumerate(zip(inputs, ref_inputs)):
        torch.testing.assert_close(a, b, **tol, msg=lambda m, i=i: f"feats[{i}] grad: {m}")
    assert params.keys() == ref_params.keys()
    for name, g in params.items():
        ref = ref_params[name]
        if ref is None:  # a parameter the loss does not reach: the same in both paths
            assert g is None or not g.any(), name
            continue
        torch.testing.assert_close(g, ref, **tol, msg=lambda m, n=name: f"{n} grad: {m}")


@pytest.mark.parametrize("train", (False, True), ids=("eval", "train_p0"))
@pytest.mark.parametrize("case", MASKS)
@pytest.mark.parametrize("causal", (True, False), ids=("causal", "full"))
@pytest.mark.parametrize("L", (1, 3), ids=("vectors", "sequences"))
@pytest.mark.parametrize("M", (2, 3, 6))
def test_grouped_equals_per_block_float64(grouped_calls, M, L, causal, case, train):
    fusion = _fusion(M, causal).train(train)
    feats, pads, avail = _inputs(M, L, case)
    _assert_paths_agree(fusion, feats, pads, avail, grouped_calls, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("case", ("complete", "some_samples"))
@pytest.mark.parametrize("L", (1, 3), ids=("vectors", "sequences"))
@pytest.mark.parametrize("M", (3, 6))
def test_grouped_equals_per_block_float32(grouped_calls, M, L, case):
    fusion = _fusion(M, True, torch.float32).train()
    feats, pads, avail = _inputs(M, L, case, torch.float32)
    _assert_paths_agree(fusion, feats, pads, avail, grouped_calls, rtol=1e-5, atol=2e-6)


def test_grouped_under_bf16_autocast(grouped_calls):
    """Under bf16 autocast the grouped path runs and stays within bf16 rounding of the loop."""
    fusion = _fusion(3, True, torch.float32).eval()
    feats, pads, avail = _inputs(3, 3, "some_samples", torch.float32)
    outs = []
    for grouped in (False, True):
        fusion.grouped = grouped
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
            outs.append(fusion(feats, pads, avail).float())
    assert grouped_calls == [6, 3]
    scale = outs[0].abs().max()
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0.05 * scale)


@pytest.mark.parametrize("L", (1, 3), ids=("vectors", "sequences"))
def test_attention_dropout_reaches_only_its_sources_stacks(grouped_calls, monkeypatch, L):
    """attn_dropout 0.5 for source 2 only: target 2's stacks (sources 0 and 1) and thus its
    pooled output are those of eval mode; targets 0 and 1 (which have source 2) change. The
    fused attention gets p = 0.5 for exactly the M - 1 stacks of source 2."""
    M = 3
    fusion = _fusion(M, True, attn_dropout=[0.0, 0.0, 0.5])
    feats, pads, avail = _inputs(M, L, "complete")
    seen = []
    original = grouped_mult.masked_cross_attention

    def recording(q, k, v, **kw):
        seen.append((q.shape[0], kw["dropout_p"]))
        return original(q, k, v, **kw)

    monkeypatch.setattr(grouped_mult, "masked_cross_attention", recording)
    width = (M - 1) * E
    with torch.no_grad():
        expected = fusion.eval()(feats, pads, avail)
        fusion.train()
        torch.manual_seed(3)
        grouped = fusion(feats, pads, avail)
        fusion.grouped = False
        per_block = fusion(feats, pads, avail)
    for got in (grouped, per_block):
        torch.testing.assert_close(got[:, 2 * width:], expected[:, 2 * width:], rtol=1e-10,
                                   atol=1e-10)
        for n in (0, 1):
            assert not torch.allclose(got[:, n * width:(n + 1) * width],
                                      expected[:, n * width:(n + 1) * width])
    # per layer (2 each): eval one cross call, train one per distinct p; then the memory's
    cross_eval, cross_train, memory = [(6 * B, 0.0)], [(4 * B, 0.0), (2 * B, 0.5)], [(M * B, 0.0)]
    assert seen == (cross_eval * 2 + memory * 2) + (cross_train * 2 + memory * 2)


@pytest.mark.parametrize("L", (1, 3), ids=("vectors", "sequences"))
def test_each_group_draws_its_own_dropout(L):
    """G identical stacks on identical inputs: equal outputs in eval; with embed, residual,
    relu and attention dropout in training, every group's output differs (fresh masks)."""
    fusion = _fusion(3, True, attn_dropout=0.2, embed_dropout=0.2, res_dropout=0.2,
                     relu_dropout=0.2)
    stacks = [cmt.cross for row in fusion.cross for cmt in row]
    for s in stacks[1:]:
        s.load_state_dict(stacks[0].state_dict())
    G = len(stacks)
    x = torch.randn(1, B, L, E, dtype=torch.float64).expand(G, -1, -1, -1)
    src = torch.randn(1, B, L, E, dtype=torch.float64).expand(G, -1, -1, -1)
    pad = torch.zeros(G, B, L, dtype=torch.bool)
    with torch.no_grad():
        fusion.eval()
        same = grouped_mult.grouped_stacks(stacks, x, src, pad, True)
        fusion.train()
        drawn = grouped_mult.grouped_stacks(stacks, x, src, pad, True)
    for g in range(1, G):
        torch.testing.assert_close(same[g], same[0])
        assert not torch.allclose(drawn[g], drawn[0])


def test_unequal_lengths_and_flag_take_the_loop(grouped_calls):
    fusion = _fusion(3).eval()
    feats = [torch.randn(B, L, E, dtype=torch.float64) for L in (3, 2, 3)]
    pads = [torch.zeros(B, f.shape[1], dtype=torch.bool) for f in feats]
    fusion(feats, pads, torch.ones(B, 3, dtype=torch.bool))
    assert not grouped_calls
    feats, pads, avail = _inputs(3, 3, "complete")
    fusion.grouped = False
    fusion(feats, pads, avail)
    assert not grouped_calls
    assert MulTFusion(3, E, HEADS, 1, grouped=False).grouped is False


def test_state_dict_and_init_unchanged_by_the_flag():
    """The flag is a plain attribute: the same parameters, names, order and (same seed) values
    as the per-block structure -- cross.{n}.{j} a CrossModalTransformer, memory.{n} a _Stack."""
    M, layers, memory_layers = 3, 2, 2
    sds = []
    for grouped in (True, False):
        torch.manual_seed(0)
        sds.append(MulTFusion(M, E, HEADS, layers, memory_layers=memory_layers,
                              grouped=grouped).state_dict())
    assert list(sds[0]) == list(sds[1])
    assert all(torch.equal(sds[0][k], sds[1][k]) for k in sds[0])
    cmt = CrossModalTransformer(E, HEADS, layers).state_dict()
    memory = _Stack((M - 1) * E, HEADS, memory_layers, 4 * (M - 1) * E, 0.0, 0.0, 0.0, 0.0,
                    True).state_dict()
    expected = ([f"cross.{n}.{j}.{k}" for n in range(M) for j in range(M - 1) for k in cmt]
                + [f"memory.{n}.{k}" for n in range(M) for k in memory])
    assert list(sds[0]) == expected
    assert "grouped" not in "".join(sds[0])
