"""TraceableLSTM against torch.nn.LSTM (the oracle): parameters and init, eager outputs, the
unrolled recurrence torch.compile traces (values, final states, every gradient), state_dicts
both ways, and one graph under torch.compile(fullgraph=True)."""
import pytest
import torch

from robustmm_fast.nn.traceable_lstm import TraceableLSTM

CONFIGS = [
    dict(bidirectional=True, batch_first=True),                    # MIM's UPN
    dict(num_layers=2, batch_first=False),
    dict(num_layers=3, bias=False, bidirectional=True, batch_first=True),
    dict(num_layers=2, bidirectional=True, dropout=0.0),
]


def _pair(kw, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    ref = torch.nn.LSTM(5, 7, **kw).to(dtype)
    torch.manual_seed(seed)
    ours = TraceableLSTM(5, 7, **kw).to(dtype)
    return ref, ours


def _input(kw, dtype=torch.float64, batch=3, length=6):
    torch.manual_seed(1)
    shape = (batch, length, 5) if kw.get("batch_first") else (length, batch, 5)
    return torch.randn(shape, dtype=dtype, requires_grad=True)


@pytest.mark.parametrize("kw", CONFIGS)
def test_same_parameters_names_and_init_as_nn_lstm(kw):
    ref, ours = _pair(kw, torch.float32)
    assert list(ref.state_dict()) == list(ours.state_dict())
    for (name, a), b in zip(ref.state_dict().items(), ours.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("kw", CONFIGS)
def test_eager_is_nn_lstm_bitwise(kw):
    ref, ours = _pair(kw, torch.float32)
    x = _input(kw, torch.float32)
    out_r, (h_r, c_r) = ref(x)
    out_o, (h_o, c_o) = ours(x)
    assert torch.equal(out_r, out_o) and torch.equal(h_r, h_o) and torch.equal(c_r, c_o)


@pytest.mark.parametrize("kw", CONFIGS)
def test_unrolled_matches_nn_lstm_values_and_gradients(kw):
    ref, ours = _pair(kw)
    x = _input(kw)
    out_r, (h_r, c_r) = ref(x)
    out_o, (h_o, c_o) = ours.unrolled(x)
    for a, b in ((out_r, out_o), (h_r, h_o), (c_r, c_o)):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
    torch.manual_seed(2)
    g_out, g_h, g_c = torch.randn_like(out_r), torch.randn_like(h_r), torch.randn_like(c_r)

    def grads(module, out, h, c):
        loss = (out * g_out).sum() + (h * g_h).sum() + (c * g_c).sum()
        return torch.autograd.grad(loss, [x, *module.parameters()])

    for name, a, b in zip(["x", *dict(ref.named_parameters())], grads(ref, out_r, h_r, c_r),
                          grads(ours, out_o, h_o, c_o)):
        torch.testing.assert_close(b, a, rtol=1e-11, atol=1e-12, msg=name)


def test_state_dict_loads_both_ways():
    ref, ours = _pair(CONFIGS[0], torch.float32, seed=0)
    torch.manual_seed(5)
    other = TraceableLSTM(5, 7, **CONFIGS[0])
    other.load_state_dict(ref.state_dict())
    x = _input(CONFIGS[0], torch.float32)
    assert torch.equal(other(x)[0], ref(x)[0])
    ref.load_state_dict(TraceableLSTM(5, 7, **CONFIGS[0]).state_dict())


@pytest.mark.parametrize("kw", CONFIGS[:2])
def test_compiled_one_graph_matches_nn_lstm(kw):
    ref, ours = _pair(kw, torch.float32)
    head = torch.nn.Linear(14 if kw.get("bidirectional") else 7, 1)
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: head(ours(x)[0]).sum(), fullgraph=True, backend="inductor")
    x = _input(kw, torch.float32)
    got = compiled(x)
    want = head(ref(x)[0]).sum()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    g_got = torch.autograd.grad(got, [x, *ours.parameters()])
    g_want = torch.autograd.grad(want, [x, *ref.parameters()])
    for a, b in zip(g_want, g_got):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match="hidden_size"):
        TraceableLSTM(5, 0)
    with pytest.raises(ValueError, match="dropout"):
        TraceableLSTM(5, 7, dropout=1.5)
    with pytest.raises(ValueError, match="last dim 5"):
        TraceableLSTM(5, 7)(torch.randn(2, 3, 4))
