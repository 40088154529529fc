"""What every fused op does the same way (ops/_autograd.py, ops/_random.py, _backend.choose):

- the backend is chosen once, at the forward, and the backward runs on it: called after the
  `use_backend` block, under another backend, or on another thread (`backward_calls`);
- under bf16 autocast the floating inputs are cast to bf16 (float32 auxiliaries allowed) and
  the result is within the low-precision rule of the reference run the same way; every layer
  too;
- torch.func.vmap folds the vmapped dim into the kernels' rows (no per-sample fallback) and
  matches a loop over the samples, gradients included;
- seeds from a CUDA generator come from its (seed, offset) without a device round trip;
- the backend limitations (fp64 attention on CUDA) route auto to the reference and make an
  explicit request fail with the reason.

The CPU backends are named in each test (reference, cpp); run_on() fails if the one named did
not run.
"""
from __future__ import annotations

import threading
import warnings

import pytest
import torch

import robustmm_fast
from robustmm_fast import _backend, nn as rnn
from robustmm_fast.ops import cycle_reconstruction_loss, masked_cross_attention, reparameterize_kl
from robustmm_fast.ops._random import draw_seed, seed_from_offset
from robustmm_fast.reference import cycle_loss as ref_cycle
from robustmm_fast.reference import masked_attention as ref_attn
from robustmm_fast.reference import reparam_kl as ref_kl
from conftest import assert_close_dtype, require_cpp, run_on

CPU_BACKENDS = ("reference", "cpp")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _reparam_inputs(dtype=torch.float32, seed=0):
    g = _gen(seed)
    mu, lv = (torch.randn(6, 5, 9, generator=g, dtype=dtype) for _ in range(2))
    pm, plv = (torch.randn(9, generator=g, dtype=dtype) * 0.5 for _ in range(2))
    mask = torch.rand(6, 5, generator=g) > 0.3
    eps = torch.randn(6, 5, 9, generator=g, dtype=dtype)
    return mu, lv, eps, pm, plv, mask


def _cycle_inputs(dtype=torch.float32, seed=1):
    g = _gen(seed)
    xs = [torch.randn(3, 7, 11, generator=g, dtype=dtype) for _ in range(4)]
    return xs, torch.rand(3, 7, generator=g) > 0.25


def _attn_inputs(dtype=torch.float32, seed=2):
    g = _gen(seed)
    q = torch.randn(3, 2, 5, 16, generator=g, dtype=dtype)
    k, v = (torch.randn(3, 2, 13, 16, generator=g, dtype=dtype) for _ in range(2))
    present = torch.tensor([[True, False], [True, True], [False, False]])
    return q, k, v, present, (6, 7)


def _leaves(*ts):
    return [t.clone().requires_grad_() for t in ts]


# one call per op: (name, fn(*leaves) -> scalar, leaves)
def _op_calls(dtype=torch.float32):
    mu, lv, eps, pm, plv, mask = _reparam_inputs(dtype)
    xs, cmask = _cycle_inputs(dtype)
    q, k, v, present, lengths = _attn_inputs(dtype)
    return [
        ("reparam_kl", lambda a, b, c, d, e: reparameterize_kl(
            a, b, prior_mu=c, prior_logvar=d, mask=mask, reduction="mean")[1]
         + reparameterize_kl(a, b, eps=e, mask=mask)[0].sum(), _leaves(mu, lv, pm, plv, eps)),
        ("cycle_loss", lambda a, b, c, d: cycle_reconstruction_loss(a, b, c, d, mask=cmask,
                                                                    distance="cosine"),
         _leaves(*xs)),
        ("masked_attention", lambda a, b, c: masked_cross_attention(
            a, b, c, present=present, key_lengths=lengths, dropout_p=0.2,
            generator=_gen(5)).square().sum(), _leaves(q, k, v)),
    ]


# ---------------------------------------------------------------- the backward's backend

@pytest.mark.parametrize("forward_backend", CPU_BACKENDS)
@pytest.mark.parametrize("op_idx", range(3))
def test_backward_outside_use_backend_runs_the_forwards_backend(forward_backend, op_idx):
    if forward_backend == "cpp":
        require_cpp()
    op, fn, leaves = _op_calls()[op_idx]
    other = "reference" if forward_backend == "cpp" else "cpp"
    with run_on(forward_backend, op):
        loss = fn(*leaves)
    before = dict(_backend.backward_calls)
    with robustmm_fast.use_backend(other):  # a different backend around the backward
        loss.backward()
    ran = {b: _backend.backward_calls[(op, b)] - before.get((op, b), 0) for b in CPU_BACKENDS}
    assert ran[forward_backend] >= 1 and ran[other] == 0, (
        f"{op}: forward on {forward_backend}, backward calls per backend {ran}")
    # and the gradients are the forward backend's own
    again = [t.detach().clone().requires_grad_() for t in leaves]
    with robustmm_fast.use_backend(forward_backend):
        fn(*again).backward()
    for a, b in zip(leaves, again):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)


@pytest.mark.parametrize("op_idx", range(3))
def test_backward_on_another_thread_runs_the_forwards_backend(op_idx):
    op, fn, leaves = _op_calls()[op_idx]
    with run_on("reference", op):
        loss = fn(*leaves)
    before = _backend.backward_calls[(op, "reference")]
    # a new thread starts with the ContextVar's default (auto), as autograd's device threads do
    worker = threading.Thread(target=loss.backward)
    worker.start()
    worker.join()
    assert _backend.backward_calls[(op, "reference")] > before, f"{op}: backward left reference"
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in leaves)


def test_double_backward_raises_instead_of_returning_zeros():
    mu, lv = _leaves(*_reparam_inputs()[:2])
    kl = reparameterize_kl(mu, lv, reduction="sum")[1]
    (g,) = torch.autograd.grad(kl, mu, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad|twice"):
        torch.autograd.grad(g.sum(), mu)


# ---------------------------------------------------------------- autocast

def _bf16_rule(fn, leaves, backend, device_type="cpu"):
    """(outputs, grads) of fn under bf16 autocast of `device_type` on `backend`, the same on the
    reference backend, and the fp64 truth on the bf16-rounded inputs (what autocast hands the
    op)."""
    def run(name, ts, autocast):
        ts = [t.detach().clone().requires_grad_() for t in ts]
        with robustmm_fast.use_backend(name), torch.autocast(device_type, torch.bfloat16,
                                                             enabled=autocast):
            out = fn(*ts)
        out.backward()
        return out, [t.grad for t in ts]

    actual = run(backend, leaves, True)
    lowp = run("reference", leaves, True)
    truth = run("reference", [t.to(torch.bfloat16).double() for t in leaves], False)
    return actual, lowp, truth


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("op_idx", range(3))
def test_ops_under_bf16_autocast_with_fp32_inputs(backend, op_idx):
    if backend == "cpp":
        require_cpp()
    op, fn, leaves = _op_calls(torch.float32)[op_idx]
    results = _bf16_rule(fn, leaves, backend)
    assert _backend.last_backend(op) is not None
    _assert_bf16_results(op, results)


def _assert_bf16_results(op, results):
    """_bf16_rule's three runs: a bf16 output and float32 grads, each within the 2x rule."""
    (out, grads), (lowp, lowp_grads), (truth, truth_grads) = results
    assert out.dtype == torch.bfloat16, f"{op}: autocast output {out.dtype}"
    assert_close_dtype(out, truth, f"{op} value", lowp_ref=lowp, factor=2.0)
    for i, (g, gl, gt) in enumerate(zip(grads, lowp_grads, truth_grads)):
        assert g.dtype == torch.float32, f"{op} grad {i}: {g.dtype} (the leaf is float32)"
        # the grads come back through autocast's casts: compare in bf16, the dtype they had
        assert_close_dtype(g.to(torch.bfloat16), gt, f"{op} grad {i}",
                           lowp_ref=gl.to(torch.bfloat16), factor=2.0)


def test_reparam_kl_bf16_activations_with_fp32_prior_under_autocast():
    """The issue's case: bf16 mu/logvar with an fp32 prior raised a dtype TypeError."""
    mu, lv, _, pm, plv, mask = _reparam_inputs()
    mu, lv = mu.bfloat16().requires_grad_(), lv.bfloat16().requires_grad_()
    pm, plv = pm.requires_grad_(), plv.requires_grad_()
    with torch.autocast("cpu", torch.bfloat16):
        z, kl = reparameterize_kl(mu, lv, prior_mu=pm, prior_logvar=plv, mask=mask,
                                  reduction="mean")
    (z.float().sum() + kl.float()).backward()
    assert z.dtype == kl.dtype == torch.bfloat16
    assert pm.grad.dtype == torch.float32 and torch.isfinite(pm.grad).all()
    with pytest.raises(TypeError, match="prior_mu"):  # without autocast it is still an error
        reparameterize_kl(mu, lv, prior_mu=pm.detach(), prior_logvar=plv.detach())


def test_float64_is_not_cast_under_autocast():
    mu, lv = _reparam_inputs(torch.float64)[:2]
    with torch.autocast("cpu", torch.bfloat16):
        z, kl = reparameterize_kl(mu, lv)
    assert z.dtype == kl.dtype == torch.float64


def _layers():
    """(name, module, fn(module) -> scalar loss) for every layer built on the fused ops."""
    g = _gen(7)
    B, L, E = 3, 6, 16
    x = torch.randn(B, L, E, generator=g)
    src = [torch.randn(B, 5, E, generator=g), torch.randn(B, 4, E, generator=g)]
    present = torch.tensor([[True, False], [True, True], [False, True]])
    pad = [torch.zeros(B, L, dtype=torch.bool), torch.zeros(B, 5, dtype=torch.bool),
           torch.zeros(B, 4, dtype=torch.bool)]
    pad[1][0, 3:] = True
    avail = torch.tensor([[True, True, False], [True, True, True], [True, False, True]])
    z = torch.randn(3, B, L, E, generator=g)
    torch.manual_seed(0)
    return [
        ("MaskedCrossModalAttention", rnn.MaskedCrossModalAttention(E, 2, batch_first=True),
         lambda m: m(x, torch.cat(src, 1), torch.cat(src, 1), need_weights=False,
                     present=present, key_lengths=(5, 4))[0].square().sum()),
        ("CrossModalTransformer", rnn.CrossModalTransformer(E, 2, 2, memory_layers=1),
         lambda m: m(x, src, present=present).square().sum()),
        ("GaussianBottleneck", rnn.GaussianBottleneck(E, 8, hidden_dim=12, reduction="mean"),
         lambda m: (lambda zk: zk[0].square().sum() + zk[1])(
             m(x, torch.rand(B, L, generator=_gen(1)) > 0.2, eps=torch.zeros(B, L, 8)))),
        ("CycleConsistency", rnn.CycleConsistency(3, E, widths=(8,), n_blocks=1),
         lambda m: (lambda o: o.loss + o.reconstructed.square().mean())(m(z, avail))),
        ("MulTFusion", rnn.MulTFusion(3, E, 2, 1, memory_layers=1),
         lambda m: m([x, src[0], src[1]], pad, avail).square().sum()),
        ("JointFusion", rnn.JointFusion(3, E, 2, 1, memory_layers=1),
         lambda m: m([x, src[0], src[1]], pad, avail).square().sum()),
    ]


@pytest.mark.parametrize("layer_idx", range(6))
def test_layers_under_bf16_autocast(layer_idx):
    """Each layer trained one step's worth (forward + backward) under bf16 autocast on the
    fused backend: within the low-precision rule of the same under the reference backend,
    against the layer in float64 without autocast; parameter gradients float32 and finite."""
    require_cpp()
    name, module, fn = _layers()[layer_idx]
    module.eval()  # dropout off: the three runs see the same function

    def run(backend, dtype, autocast):
        m = _copy(module, dtype)
        with robustmm_fast.use_backend(backend), torch.autocast("cpu", torch.bfloat16,
                                                                enabled=autocast):
            loss = fn(m) if dtype == torch.float32 else _fn_double(fn, m)
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in m.named_parameters() if p.grad is not None}

    actual, grads = run("cpp", torch.float32, True)
    lowp, lowp_grads = run("reference", torch.float32, True)
    truth, truth_grads = run("reference", torch.float64, False)
    assert grads and grads.keys() == lowp_grads.keys()
    assert_close_dtype(actual.to(torch.bfloat16), truth, f"{name} loss",
                       lowp_ref=lowp.to(torch.bfloat16), factor=2.0)
    for n, g in grads.items():
        assert g.dtype == torch.float32 and torch.isfinite(g).all(), f"{name}.{n}"
        # fp32 gradients rounded to bf16 for the comparison: half an ulp of floor (a MulTFusion
        # layer-norm gradient, 2026-12-03: ours 9.8e-4 = 1 ulp vs the reference's 4.2e-4 at
        # |g| 0.19, the median ratio over its 126 gradients 1.0)
        assert_close_dtype(g.to(torch.bfloat16), truth_grads[n], f"{name}.{n} grad",
                           lowp_ref=lowp_grads[n].to(torch.bfloat16), factor=2.0,
                           half_ulp_floor=True)


def _copy(module, dtype):
    import copy
    return copy.deepcopy(module).to(dtype)


def _fn_double(fn, module):
    """fn on a float64 module: its float32 inputs are made float64 by a forward pre-hook."""
    def to_double(args):
        if isinstance(args, torch.Tensor):
            return args.double() if args.is_floating_point() else args
        if isinstance(args, (list, tuple)):
            return type(args)(to_double(a) for a in args)
        if isinstance(args, dict):
            return {k: to_double(a) for k, a in args.items()}
        return args

    handle = module.register_forward_pre_hook(
        lambda m, args, kwargs: (to_double(args), to_double(kwargs)), with_kwargs=True)
    try:
        return fn(module)
    finally:
        handle.remove()


# ---------------------------------------------------------------- vmap

def _no_vmap_fallback():
    ctx = warnings.catch_warnings()
    ctx.__enter__()
    warnings.filterwarnings("error", message=".*performance drop.*")
    warnings.filterwarnings("error", message=".*fallback.*")
    return ctx


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_vmap_reparam_kl_matches_loop(backend):
    if backend == "cpp":
        require_cpp()
    mu, lv, eps, pm, plv, mask = _reparam_inputs()

    def f(a, b, e, m):
        z, kl = reparameterize_kl(a, b, eps=e, prior_mu=pm, prior_logvar=plv, mask=m)
        return z, kl

    ctx = _no_vmap_fallback()
    try:
        with run_on(backend, "reparam_kl"):
            z, kl = torch.func.vmap(f)(mu, lv, eps, mask)
            grads = torch.func.vmap(torch.func.grad(lambda a, b, e, m: f(a, b, e, m)[1].sum(),
                                                    argnums=(0, 1)))(mu, lv, eps, mask)
    finally:
        ctx.__exit__(None, None, None)
    for i in range(mu.shape[0]):
        zi, kli = f(mu[i], lv[i], eps[i], mask[i])
        torch.testing.assert_close(z[i], zi)
        torch.testing.assert_close(kl[i], kli)
        a, b = mu[i].clone().requires_grad_(), lv[i].clone().requires_grad_()
        f(a, b, eps[i], mask[i])[1].sum().backward()
        torch.testing.assert_close(grads[0][i], a.grad)
        torch.testing.assert_close(grads[1][i], b.grad)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("distance", ("mse", "cosine"))
def test_vmap_cycle_loss_matches_loop(backend, distance):
    if backend == "cpp":
        require_cpp()
    xs, mask = _cycle_inputs()
    f = lambda a, b, c, d, m: cycle_reconstruction_loss(a, b, c, d, mask=m,  # noqa: E731
                                                        distance=distance)
    ctx = _no_vmap_fallback()
    try:
        with run_on(backend, "cycle_loss"):
            loss = torch.func.vmap(f)(*xs, mask)
            grads = torch.func.vmap(torch.func.grad(f, argnums=(0, 1, 2, 3)))(*xs, mask)
    finally:
        ctx.__exit__(None, None, None)
    for i in range(xs[0].shape[0]):
        leaves = [x[i].clone().requires_grad_() for x in xs]
        li = f(*leaves, mask[i])
        li.backward()
        torch.testing.assert_close(loss[i], li.detach())
        for g, leaf in zip(grads, leaves):
            torch.testing.assert_close(g[i], leaf.grad)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_vmap_masked_attention_matches_loop(backend):
    if backend == "cpp":
        require_cpp()
    q, k, v, present, lengths = _attn_inputs()
    V = 4
    qs, ks, vs = (torch.stack([t + 0.1 * i for i in range(V)]) for t in (q, k, v))
    f = lambda a, b, c: masked_cross_attention(a, b, c, present=present,  # noqa: E731
                                               key_lengths=lengths, is_causal=True)
    ctx = _no_vmap_fallback()
    try:
        with run_on(backend, "masked_attention"):
            out = torch.func.vmap(f)(qs, ks, vs)
            grads = torch.func.vmap(torch.func.grad(lambda a, b, c: f(a, b, c).square().sum(),
                                                    argnums=(0, 1, 2)))(qs, ks, vs)
    finally:
        ctx.__exit__(None, None, None)
    for i in range(V):
        leaves = [t[i].clone().requires_grad_() for t in (qs, ks, vs)]
        oi = f(*leaves)
        oi.square().sum().backward()
        torch.testing.assert_close(out[i], oi.detach())
        for g, leaf in zip(grads, leaves):
            torch.testing.assert_close(g[i], leaf.grad)


def test_vmap_randomness_same_with_in_kernel_noise_raises():
    mu, lv = _reparam_inputs()[:2]
    with pytest.raises(NotImplementedError, match="randomness"):
        torch.func.vmap(lambda a, b: reparameterize_kl(a, b)[0], randomness="same")(mu, lv)
    # different: every sample draws its own eps, in one kernel call
    z = torch.func.vmap(lambda a, b: reparameterize_kl(a, b)[0], randomness="different")(mu, lv)
    eps = (z - mu) / torch.exp(lv / 2)
    assert not torch.allclose(eps[0], eps[1])


# ---------------------------------------------------------------- seeds

class _FakeCudaGenerator:
    """The part of a CUDA torch.Generator draw_seed reads: host-side seed and Philox offset."""

    def __init__(self, seed):
        self.device = torch.device("cuda")
        self.seed, self.offset = seed, 0

    def initial_seed(self):
        return self.seed

    def get_offset(self):
        return self.offset

    def set_offset(self, offset):
        self.offset = offset


def test_cuda_generator_seed_from_its_offset_without_a_device_draw(monkeypatch):
    def no_device_draw(*args, **kwargs):
        raise AssertionError("draw_seed drew on the device (a sync per call)")

    monkeypatch.setattr(torch, "randint", no_device_draw)
    gen = _FakeCudaGenerator(1234)
    seeds = [int(draw_seed(gen)) for _ in range(50)]
    assert gen.offset == 200, "each draw advances the offset by 4"
    assert len(set(seeds)) == 50 and all(0 <= s < 2**62 for s in seeds)
    gen2 = _FakeCudaGenerator(1234)  # manual_seed reproduces the stream
    assert [int(draw_seed(gen2)) for _ in range(50)] == seeds
    assert int(draw_seed(_FakeCudaGenerator(1235))) != seeds[0]
    assert seed_from_offset(1, 0) != seed_from_offset(0, 1)


def test_cpu_seed_follows_manual_seed():
    torch.manual_seed(3)
    a = int(draw_seed(None))
    torch.manual_seed(3)
    assert int(draw_seed(None)) == a
    assert int(draw_seed(_gen(9))) == int(draw_seed(_gen(9)))


# ---------------------------------------------------------------- limitations

def test_fp64_attention_on_cuda_routes_to_reference_with_the_reason():
    assert ("masked_attention", "triton", "cuda", torch.float64) in _backend.LIMITATIONS
    choose = _backend.choose.__wrapped__ if hasattr(_backend.choose, "__wrapped__") \
        else _backend.choose
    assert choose("masked_attention", "cuda", torch.float64, ("reference", "cpp", "triton")) \
        == "reference"
    with robustmm_fast.use_backend("triton"), pytest.raises(RuntimeError, match="float64"):
        choose("masked_attention", "cuda", torch.float64, ("reference", "cpp", "triton"))


def test_info_lists_the_limitations(capsys):
    from robustmm_fast import info
    info.main()
    out = capsys.readouterr().out
    assert "masked_attention" in out and "float64" in out and "limitation" in out.lower()


# ---------------------------------------------------------------- torch.compile

def test_compile_fixes_the_backend_at_trace_time():
    """Compiled inside use_backend('reference'): the reference kernels run, forward and
    backward, with no graph break (fullgraph)."""
    mu, lv = _leaves(*_reparam_inputs()[:2])
    f = torch.compile(lambda a, b: reparameterize_kl(a, b, sample=False, reduction="sum")[1],
                      backend="aot_eager", fullgraph=True)
    before = _backend.backward_calls[("reparam_kl", "reference")]
    with run_on("reference", "reparam_kl"):
        f(mu, lv).backward()
    assert _backend.backward_calls[("reparam_kl", "reference")] > before
    torch.testing.assert_close(mu.grad, mu.detach())  # d/dmu of 1/2 sum(mu^2 + ...) = mu
    torch._dynamo.reset()
