"""robustmm_fast.nn.MulTFusion / JointFusion (nn/multimodal_fusion.py).

MulTFusion is checked against MulT's TransformerEncoder written here as the official code
(yaohungt/Multimodal-Transformer modules/transformer.py) does it, on torch.nn.MultiheadAttention
with our layers' weights: pre-norm layers, embed_scale * x + sinusoidal positions for the query
and the keys, buffered_future_mask when attn_mask is set, a final LayerNorm; six cross-modal
encoders, their outputs concatenated per target, a memory encoder of width 2 E, time means.
Then: absent sources are zero, not NaN; NaN in absent/padded tokens reaches nothing.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from robustmm_fast.nn.cross_modal_transformer import sinusoid_positions
from robustmm_fast.nn.multimodal_fusion import JointFusion, MulTFusion

from conftest import run_on

pytestmark = pytest.mark.usefixtures("one_thread")

E, HEADS, B = 8, 2, 4


def _mult_encoder(stack, x, x_k=None, causal=True):
    """MulT's TransformerEncoder.forward (dropout 0), batch first, on `stack`'s weights."""
    def embed(t):
        return math.sqrt(t.shape[-1]) * t + sinusoid_positions([t.shape[1]], t.shape[-1],
                                                               dtype=t.dtype)
    x = embed(x)
    x_k = None if x_k is None else embed(x_k)
    for layer in stack.layers:
        residual = x
        q = layer.attn_norm(x)
        k = q if x_k is None else layer.attn_norm(x_k)
        mask = None
        if causal:  # buffered_future_mask(x, x_k): triu(-inf, 1 + |dim2 - dim1|)
            d1, d2 = q.shape[1], k.shape[1]
            mask = torch.triu(torch.full((d1, d2), float("-inf"), dtype=x.dtype),
                              1 + abs(d2 - d1))
        a = layer.attn
        mha = torch.nn.MultiheadAttention(a.embed_dim, a.num_heads, batch_first=True,
                                          dtype=x.dtype)
        mha.load_state_dict({"in_proj_weight": a.in_proj_weight, "in_proj_bias": a.in_proj_bias,
                             "out_proj.weight": a.out_proj.weight,
                             "out_proj.bias": a.out_proj.bias})
        x = residual + mha(q, k, k, attn_mask=mask, need_weights=False)[0]
        residual = x
        x = residual + layer.fc2(F.relu(layer.fc1(layer.ffn_norm(x))))
    return stack.norm(x)


def _official_mult(fusion: MulTFusion, feats, causal=True):
    """CyIN's / MulT's fusion for complete inputs, by hand."""
    M = len(feats)
    pooled = []
    for n in range(M):
        others = [m for m in range(M) if m != n]
        h = torch.cat([_mult_encoder(fusion.cross[n][j].cross, feats[n], feats[m], causal)
                       for j, m in enumerate(others)], -1)
        pooled.append(_mult_encoder(fusion.memory[n], h, None, causal).mean(1))
    return torch.cat(pooled, -1)


def _feats(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, L, E, generator=g, dtype=torch.float64) for L in lengths]


@pytest.mark.parametrize("causal", (True, False))
@pytest.mark.parametrize("lengths", ((5, 5, 5), (5, 3, 4)), ids=("aligned", "unaligned"))
def test_mult_fusion_is_mult(backend, lengths, causal):
    torch.manual_seed(0)
    fusion = MulTFusion(3, E, HEADS, 2, memory_layers=3, causal=causal).double().eval()
    feats = _feats(lengths)
    pads = [torch.zeros(B, L, dtype=torch.bool) for L in lengths]
    with run_on(backend, "masked_attention") if causal and len(set(lengths)) == 1 \
            else torch.no_grad():
        got = fusion(feats, pads, torch.ones(B, 3, dtype=torch.bool))
    assert got.shape == (B, 3 * 2 * E) and fusion.out_dim == 6 * E
    torch.testing.assert_close(got, _official_mult(fusion, feats, causal))


def test_per_source_attention_dropout():
    fusion = MulTFusion(3, E, HEADS, 1, attn_dropout=[0.1, 0.3, 0.0], memory_attn_dropout=0.4)
    # target n's transformers, in source order: 'la' -> a's 0.3, 'lv' -> v's 0.0, ...
    got = [[c.cross.layers[0].attn.dropout for c in row] for row in fusion.cross]
    assert got == [[0.3, 0.0], [0.1, 0.0], [0.1, 0.3]]
    assert fusion.memory[0].layers[0].attn.dropout == 0.4
    with pytest.raises(ValueError, match="attn_dropout"):
        MulTFusion(3, E, HEADS, 1, attn_dropout=[0.1, 0.3])


@pytest.mark.parametrize("cls", (MulTFusion, JointFusion))
def test_absent_and_padded_tokens_are_inert(backend, cls):
    """An absent source is no key (its cross-modal term is 0, never NaN); an absent target
    pools to 0; NaN in absent or padded tokens reaches no output or gradient."""
    torch.manual_seed(0)
    fusion = cls(3, E, HEADS, 1, memory_layers=1).double().train(False)
    avail = torch.tensor([[1, 1, 1], [1, 0, 1], [0, 0, 1], [0, 0, 0]], dtype=torch.bool)
    pads = [torch.zeros(B, 5, dtype=torch.bool) for _ in range(3)]
    pads[0][0, 3:] = True
    results = []
    for fill in (7.0, float("nan")):
        feats = [f.clone().requires_grad_() for f in _feats((5, 5, 5))]
        with torch.no_grad():
            for i, f in enumerate(feats):
                f[~avail[:, i]] = fill
                f[pads[i]] = fill
        with run_on(backend, "masked_attention"):
            out = fusion(feats, pads, avail)
            out.square().sum().backward()
        results.append((out, [f.grad for f in feats]))
    (a, ga), (b, gb) = results
    assert torch.isfinite(b).all() and torch.equal(a, b)
    for x, y in zip(ga, gb):
        assert torch.isfinite(y).all() and torch.equal(x, y)
    width = fusion.out_dim // 3
    assert not b[3].any() and not b[2, :2 * width].any()  # absent targets pool to 0


def test_cross_attention_is_causal():
    """causal=True: target token t of a cross-modal stack does not see source tokens > t."""
    torch.manual_seed(0)
    fusion = MulTFusion(2, E, HEADS, 1, memory_layers=1, causal=True).double()
    cmt = fusion.cross[0][0]
    x, s = _feats((6, 6))
    s2 = s.clone()
    s2[:, 4:] = torch.randn_like(s2[:, 4:])
    a, b = cmt(x, [s]), cmt(x, [s2])
    torch.testing.assert_close(a[:, :4], b[:, :4])
    assert not torch.allclose(a[:, 4:], b[:, 4:])


def test_mult_fusion_attention_init_is_mults():
    """MulT's (CyIN's multihead_attention.py:44-49): out_proj xavier-uniform U(+-sqrt(6/(2E)))
    with a zero bias, not nn.Linear's U(+-1/sqrt(E)) (sqrt(3) times narrower)."""
    import math
    from robustmm_fast.nn import MaskedCrossModalAttention, MulTFusion
    torch.manual_seed(0)
    fusion = MulTFusion(3, 64, 4, 2)
    attns = [m for m in fusion.modules() if isinstance(m, MaskedCrossModalAttention)]
    assert len(attns) == 3 * 2 * 2 + 3 * 3  # 6 cross stacks x 2 layers, 3 memories x 3 layers
    for attn in attns:
        w = attn.out_proj.weight
        bound = math.sqrt(6.0 / (w.shape[0] + w.shape[1]))
        assert w.abs().max() <= bound
        assert w.abs().max() > 1.2 / math.sqrt(w.shape[1])  # beyond nn.Linear's bound
        assert torch.equal(attn.out_proj.bias, torch.zeros_like(attn.out_proj.bias))
