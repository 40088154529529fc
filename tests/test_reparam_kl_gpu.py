"""gpu tier of reparameterize_kl: the `cuda` (csrc/cuda) and `triton` (kernels/) backends on CUDA
tensors against the autograd oracle robustmm_fast.reference.reparameterize_kl run on the same
CUDA tensors (DESIGN §4, §7).

    pytest -m gpu tests/test_reparam_kl_gpu.py

A backend that cannot run here is skipped, or fails under ROBUSTMM_REQUIRE_EXT=1. Low precision:
the error against an fp64 ground truth is at most 2x the reference's own (conftest). In-kernel eps
is the Philox stream of robustmm_fast.reference.philox within 1e-4: the GPU's exp/sin/cos
(fast-math in the CUDA build) differ from torch's by about 1e-6.
"""
from __future__ import annotations

import copy
import math
import os

import pytest
import torch

from robustmm_fast import _backend
from robustmm_fast import reference as ref
from robustmm_fast.nn import GaussianBottleneck
from robustmm_fast.ops import reparameterize_kl
from robustmm_fast.reference.philox import philox_randn

from conftest import assert_close_dtype, cpp_reason, late_copies_on_side_stream, run_on
from test_reparam_kl import DTYPE_IDS, _fn_given_eps, _fn_in_kernel, _replay_seed, make_inputs, make_mask

pytestmark = pytest.mark.gpu

DEV = torch.device("cuda")
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
REDUCTIONS = ("none", "sum", "mean", "batchmean")
AWKWARD = (3, 7, 13)
NAMES = ("mu", "logvar", "eps", "prior_mu", "prior_logvar")
EPS_ATOL = 1e-4  # in-kernel eps vs the torch Philox oracle


@pytest.fixture(params=("cuda", "triton"))
def gpu_backend(request):
    name = request.param
    why = _backend._unavailable_reason(name, DEV)
    if why is not None:
        msg = f"backend {name!r} cannot run CUDA tensors: {why}"
        if os.environ.get("ROBUSTMM_REQUIRE_EXT", "0") == "1":
            pytest.fail(msg + " (ROBUSTMM_REQUIRE_EXT=1 requires it)", pytrace=False)
        pytest.skip(msg)
    return name


# ---------------------------------------------------------------- helpers

def on_gpu(t, dtype=None, *, grad=False, offset=0):
    """`t` on the GPU (in `dtype`) as a leaf; offset=1 places it one element into its buffer:
    contiguous but not 16-byte aligned, so the CUDA kernel takes its generic path."""
    if t is None:
        return None
    t = t.to(DEV, dtype or t.dtype)
    if offset:
        buf = torch.empty(t.numel() + offset, device=DEV, dtype=t.dtype)
        buf[offset:].copy_(t.reshape(-1))
        t = buf[offset:].view(t.shape)
    return t.detach().requires_grad_(grad)


def run(fn, leaves, mask, gz, gk, **kw):
    """z, kl and the gradients of sum(z * gz) + sum(kl * gk) w.r.t. every leaf that requires
    grad, as a dict (eps is left out when sample=False, or drawn inside when None)."""
    x = dict(zip(NAMES, leaves))
    if not kw.get("sample", True):
        x["eps"] = None
    z, kl = fn(x["mu"], x["logvar"], eps=x["eps"], prior_mu=x["prior_mu"],
               prior_logvar=x["prior_logvar"], mask=mask, **kw)
    wants = [n for n in NAMES if x[n] is not None and x[n].requires_grad]
    outs = [(o, g.to(o.dtype)) for o, g in ((z, gz), (kl, gk)) if o.requires_grad]
    grads = torch.autograd.grad([o for o, _ in outs], [x[n] for n in wants], [g for _, g in outs],
                                allow_unused=True)
    return z.detach(), kl.detach(), dict(zip(wants, grads))


def upstream(shape, reduction, dtype, seed, offset=0):
    gen = torch.Generator().manual_seed(seed)
    gz = torch.randn(shape, generator=gen, dtype=torch.float64)
    gk = torch.randn(tuple(shape[:-1]) if reduction == "none" else (), generator=gen, dtype=torch.float64)
    return on_gpu(gz, dtype, offset=offset), on_gpu(gk, dtype)


def check(backend, dtype, shape, *, prior="full", mask="some", reduction="none", sample=True,
          offset=0, seed=0):
    """Values and every gradient of the op on `backend` vs the oracle in the same dtype and in
    fp64 (the ground truth), all on the GPU."""
    mu, lv, eps, pm, plv, m = make_inputs(shape, prior=prior, mask=mask, seed=seed)
    leaves = [on_gpu(t, dtype, grad=True, offset=offset) for t in (mu, lv, eps, pm, plv)]
    m = on_gpu(m)
    gz, gk = upstream(shape, reduction, dtype, seed + 1, offset)
    kw = dict(sample=sample, reduction=reduction)
    with run_on(backend):
        z, kl, grads = run(reparameterize_kl, leaves, m, gz, gk, **kw)
    z_lp, kl_lp, grads_lp = run(ref.reparameterize_kl, leaves, m, gz, gk, **kw)
    hi = [None if t is None else t.detach().double().requires_grad_() for t in leaves]
    z64, kl64, grads64 = run(ref.reparameterize_kl, hi, m, gz.double(), gk.double(), **kw)
    assert z.dtype == dtype and kl.dtype == dtype
    assert z.shape == tuple(shape) and kl.shape == (tuple(shape[:-1]) if reduction == "none" else ())
    assert_close_dtype(z, z64, "z", z_lp)
    assert_close_dtype(kl, kl64, "kl", kl_lp)
    assert grads.keys() == grads64.keys()
    for name, g64 in grads64.items():
        assert grads[name] is not None and grads[name].dtype == dtype, f"grad {name}"
        assert_close_dtype(grads[name], g64, f"grad {name}", grads_lp[name])
    return z, kl, grads


# ---------------------------------------------------------------- values and gradients, given eps

SHAPES = {  # shape: (prior, mask); the long row keeps the standard prior so fp16's kl stays finite
    (64, 50, 128): ("full", "some"), AWKWARD: ("full", "some"), (5, 1): ("full", "some"),
    (2, 3, 4, 33): ("full", "some"), (1, 100003): ("none", "none"),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_values_and_gradients(gpu_backend, shape, dtype):
    prior, mask = SHAPES[shape]
    check(gpu_backend, dtype, shape, prior=prior, mask=mask)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=DTYPE_IDS.get)
def test_large(gpu_backend, dtype):
    check(gpu_backend, dtype, (256, 50, 1024), prior="full", mask="some")


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.float64), ids=DTYPE_IDS.get)
@pytest.mark.parametrize("prior", ("none", "full"))
def test_misaligned_contiguous_inputs(gpu_backend, prior, dtype):
    """Every input one element into its buffer (D % 8 == 0): the CUDA kernel's generic path."""
    check(gpu_backend, dtype, (6, 7, 64), prior=prior, offset=1)


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64, torch.bfloat16), ids=DTYPE_IDS.get)
@pytest.mark.parametrize("mask", ("none", "some", "all_excluded"))
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_reductions_and_masks(gpu_backend, reduction, mask, dtype):
    _, kl, grads = check(gpu_backend, dtype, AWKWARD, mask=mask, reduction=reduction)
    if mask == "all_excluded":
        assert not kl.any() and not any(g.any() for g in grads.values())


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=DTYPE_IDS.get)
@pytest.mark.parametrize("prior", ("none", "broadcast", "scalar", "mu_only", "logvar_only"))
def test_priors(gpu_backend, prior, dtype):
    check(gpu_backend, dtype, AWKWARD, prior=prior)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("mask", ("none", "some"))
def test_sample_false(gpu_backend, mask, dtype):
    z, _, grads = check(gpu_backend, dtype, (64, 50, 128), prior="none", mask=mask, sample=False,
                        reduction="mean")
    mu, _, _, _, _, m = make_inputs((64, 50, 128), mask=mask)
    mu = on_gpu(mu, dtype)
    assert torch.equal(z, mu if m is None else torch.where(on_gpu(m).unsqueeze(-1), mu, 0))
    assert "eps" not in grads


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=DTYPE_IDS.get)
@pytest.mark.parametrize("reduction", ("none", "mean"))
@pytest.mark.parametrize("noise", ("given", "in_kernel", "none"))
@pytest.mark.parametrize("shape", ((4, 3, 40), (4, 3, 9)), ids=str)
def test_nan_in_excluded_rows_does_not_leak(gpu_backend, shape, noise, reduction, dtype):
    mu, lv, eps, pm, plv, m = make_inputs(shape, prior="full", mask="some")
    gz, gk = upstream(shape, reduction, torch.float64, 5)
    gz, gk = gz.cpu(), gk.cpu()
    kw = dict(reduction=reduction, sample=noise != "none")

    def go(poison):
        ts = [mu, lv, None if noise == "in_kernel" else eps, pm, plv, gz]
        if poison:
            ts = [None if t is None else t.masked_fill(~m.unsqueeze(-1), poison) for t in ts]
        g_kl = gk.masked_fill(~m, poison) if poison and reduction == "none" else gk
        leaves = [on_gpu(t, dtype, grad=True) for t in ts[:5]]
        torch.manual_seed(7)
        with run_on(gpu_backend):
            z, kl, grads = run(reparameterize_kl, leaves, on_gpu(m), on_gpu(ts[5], dtype),
                               on_gpu(g_kl, dtype), **kw)
        return [z, kl] + [grads[n] for n in sorted(grads)]

    clean = go(None)
    excl = ~on_gpu(m)
    assert not clean[0][excl].any() and (reduction != "none" or not clean[1][excl].any())
    assert all(not g[excl].any() for g in clean[2:] if g.shape == tuple(shape))
    for poison in (float("nan"), float("inf"), float("-inf")):
        for a, b in zip(go(poison), clean):
            assert torch.equal(a, b), f"a {poison} in excluded rows changed the result"


@pytest.mark.parametrize("shape,reduction", [((0, 8), "none"), ((0, 5, 8), "mean"), ((3, 0), "none"),
                                             ((0, 8), "batchmean")])
def test_empty(gpu_backend, shape, reduction):
    mu = torch.randn(shape, device=DEV, requires_grad=True)
    lv = torch.randn(shape, device=DEV, requires_grad=True)
    with run_on(gpu_backend):
        z, kl = reparameterize_kl(mu, lv, reduction=reduction)
        dmu, dlv = torch.autograd.grad(z.sum() + kl.sum(), (mu, lv))
    assert z.shape == shape and kl.shape == (shape[:-1] if reduction == "none" else ())
    assert not kl.any() and dmu.shape == shape and dlv.shape == shape


# ---------------------------------------------------------------- in-kernel eps (Philox)

@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=DTYPE_IDS.get)
@pytest.mark.parametrize("shape", ((64, 50, 128), AWKWARD, (2, 3, 4, 33), (1, 100003)), ids=str)
def test_in_kernel_eps_is_the_philox_stream(gpu_backend, shape, dtype):
    mu, lv = (on_gpu(t, dtype) for t in make_inputs(shape)[:2])
    torch.manual_seed(2024)
    with run_on(gpu_backend):
        z, _ = reparameterize_kl(mu, lv)
    sigma = torch.exp(0.5 * lv.double())
    eps = (z.double() - mu.double()) / sigma
    want = philox_randn(_replay_seed(2024), shape, device=DEV).double()
    torch.testing.assert_close(eps, want, rtol=0, atol=EPS_ATOL)


def test_in_kernel_eps_misaligned_same_as_aligned(gpu_backend):
    """The stream depends on (seed, flat index) only, not on which path the kernel takes."""
    mu, lv = make_inputs((6, 7, 64))[:2]
    out = []
    for offset in (0, 1):
        torch.manual_seed(3)
        with run_on(gpu_backend):
            out.append(reparameterize_kl(on_gpu(mu, torch.float32, offset=offset),
                                         on_gpu(lv, torch.float32, offset=offset)))
    torch.testing.assert_close(out[1], out[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_in_kernel_eps_same_on_cpu(gpu_backend, dtype):
    """One torch.manual_seed gives the same z on this backend and on the CPU (cpp, else the
    reference), so the cuda, triton and cpp backends agree with each other."""
    mu, lv, _, pm, plv, m = make_inputs((6, 5, 37), prior="full", mask="some")
    cpu_backend = "cpp" if cpp_reason() is None else "reference"
    out = {}
    for name, dev in ((gpu_backend, DEV), (cpu_backend, torch.device("cpu"))):
        args = [t.to(dev, dtype) for t in (mu, lv, pm, plv)]
        torch.manual_seed(77)
        with run_on(name):
            z, kl = reparameterize_kl(args[0], args[1], prior_mu=args[2], prior_logvar=args[3],
                                      mask=m.to(dev))
        out[name] = (z.cpu(), kl.cpu())
    rtol = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}.get(dtype, 1e-5)
    torch.testing.assert_close(out[gpu_backend][0], out[cpu_backend][0], rtol=rtol, atol=2 * EPS_ATOL)
    torch.testing.assert_close(out[gpu_backend][1], out[cpu_backend][1], rtol=rtol, atol=1e-5)


@pytest.mark.parametrize("shape", ((4096, 1024), (2999, 1399)), ids=str)  # 4M: aligned, generic
def test_in_kernel_eps_statistics(gpu_backend, shape):
    zeros = torch.zeros(shape, device=DEV)
    torch.manual_seed(31337)
    with run_on(gpu_backend):
        z, kl = reparameterize_kl(zeros, zeros)  # sigma = 1: z is eps
    e = z.double().flatten()
    n, se = e.numel(), 1 / math.sqrt(e.numel())
    assert torch.isfinite(e).all() and kl.abs().max() < 1e-5
    assert e.mean().abs() < 6 * se, f"mean {e.mean().item():.2e}"
    assert (e.std() - 1).abs() < 6 * se / math.sqrt(2), f"std {e.std().item():.5f}"
    corr = torch.corrcoef(torch.stack([e[:-1], e[1:]]))[0, 1].abs()
    assert corr < 6 * se, f"lag-1 correlation {corr.item():.2e}"
    want = philox_randn(_replay_seed(31337), (n,), device=DEV).double()
    torch.testing.assert_close(e, want, rtol=0, atol=EPS_ATOL)


@pytest.mark.parametrize("prior", ("none", "full"))
@pytest.mark.parametrize("shape", (AWKWARD, (16, 64)), ids=str)
def test_in_kernel_eps_backward_matches_eps_used(gpu_backend, shape, prior):
    """fp64: recover eps = (z - mu) / sigma and give it to the oracle: the backward's
    regenerated eps must be the forward's, to fp64 precision."""
    mu, lv, _, pm, plv, m = make_inputs(shape, prior=prior, mask="some")
    leaves = [on_gpu(t, grad=True) for t in (mu, lv, None, pm, plv)]
    m = on_gpu(m)
    gz, gk = upstream(shape, "mean", torch.float64, 3)
    torch.manual_seed(99)
    with run_on(gpu_backend):
        z, kl, grads = run(reparameterize_kl, leaves, m, gz, gk, reduction="mean")
    keep = m.unsqueeze(-1)
    eps = ((z - leaves[0].detach()) / torch.exp(0.5 * leaves[1].detach())).where(keep, 0.0)
    want = philox_randn(_replay_seed(99), shape, device=DEV).double().where(keep, 0.0)
    torch.testing.assert_close(eps, want, rtol=0, atol=EPS_ATOL)
    leaves[2] = eps
    z_r, kl_r, grads_r = run(ref.reparameterize_kl, leaves, m, gz, gk, reduction="mean")
    torch.testing.assert_close(z, z_r, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(kl, kl_r, rtol=1e-10, atol=1e-12)
    assert grads.keys() == grads_r.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], grads_r[name], rtol=1e-9, atol=1e-10)


# ---------------------------------------------------------------- gradcheck, torch.compile

@pytest.mark.parametrize("reduction", ("none", "mean"))
@pytest.mark.parametrize("prior", ("none", "full", "broadcast"))
def test_gradcheck(gpu_backend, prior, reduction):
    mu, lv, eps, pm, plv, m = make_inputs((3, 5), prior=prior, mask="some")
    inputs = [on_gpu(t, grad=True) for t in (mu, lv, eps, pm, plv) if t is not None]
    m = on_gpu(m)

    def fn(mu, lv, eps, *p):
        return reparameterize_kl(mu, lv, eps=eps, prior_mu=p[0] if p else None,
                                 prior_logvar=p[1] if p else None, mask=m, reduction=reduction)

    with run_on(gpu_backend):
        assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("gen_device", ("cpu", "cuda"))
def test_gradcheck_in_kernel_eps(gpu_backend, gen_device):
    mu, lv, _, _, _, m = make_inputs((3, 5), mask="some")
    mu, lv, m = on_gpu(mu, grad=True), on_gpu(lv, grad=True), on_gpu(m)

    def fn(mu, lv):  # a fresh generator per call: the same eps at every evaluation
        gen = torch.Generator(device=gen_device).manual_seed(4)
        return reparameterize_kl(mu, lv, mask=m, reduction="sum", generator=gen)

    with run_on(gpu_backend):
        assert torch.autograd.gradcheck(fn, (mu, lv))
        assert torch.equal(fn(mu, lv)[0], fn(mu, lv)[0])


def test_compile_inductor_given_eps(gpu_backend):
    torch._dynamo.reset()
    mu, lv, eps, pm, plv, m = make_inputs((4, 3, 16), prior="broadcast", mask="some")
    xs, m = [on_gpu(t, torch.float32) for t in (mu, lv, eps, pm, plv)], on_gpu(m)
    compiled = torch.compile(_fn_given_eps, fullgraph=True)
    outs = []
    for f in (_fn_given_eps, compiled):
        ys = [x.clone().requires_grad_() for x in xs]
        with run_on(gpu_backend):
            a, b = f(*ys, m)
            ga = torch.linspace(-1, 1, a.numel(), device=DEV).view(a.shape)
            outs.append((a, b) + torch.autograd.grad([a, b], ys, [ga, torch.ones_like(b)]))
    for x, y in zip(*outs):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


def test_compile_inductor_in_kernel_eps(gpu_backend):
    """Inductor may draw the seed with its own RNG, so the check is that the compiled forward
    and backward use one eps (fp64, eps recovered from z) and that manual_seed repeats it."""
    torch._dynamo.reset()
    mu, lv, _, _, _, m = make_inputs((4, 3, 16), mask="some")
    mu, lv, m = on_gpu(mu, grad=True), on_gpu(lv, grad=True), on_gpu(m)
    compiled = torch.compile(_fn_in_kernel, fullgraph=True)
    with run_on(gpu_backend):
        torch.manual_seed(5)
        a, b = compiled(mu, lv, m)
        grads = torch.autograd.grad([a, b], [mu, lv], [torch.ones_like(a), torch.ones_like(b)])
        torch.manual_seed(5)
        a2, _ = compiled(mu, lv, m)
    assert torch.equal(a, a2)
    eps = ((a.detach() / 3 - mu.detach()) / torch.exp(0.5 * lv.detach())).where(m.unsqueeze(-1), 0.0)
    assert torch.isfinite(eps).all() and 0.5 < eps[m].std() < 2
    z_r, kl_r = ref.reparameterize_kl(mu, lv, eps=eps, mask=m)
    grads_r = torch.autograd.grad([z_r * 3, kl_r.sum()], [mu, lv], [torch.ones_like(a), torch.ones_like(b)])
    for x, y in zip(grads, grads_r):
        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-10)


# ---------------------------------------------------------------- layer, streams

@pytest.mark.parametrize("reduction", ("none", "mean"))
def test_gaussian_bottleneck(gpu_backend, reduction):
    torch.manual_seed(0)
    layer = GaussianBottleneck(32, 16, hidden_dim=24, reduction=reduction).to(DEV).train()
    twin = copy.deepcopy(layer)
    gen = torch.Generator().manual_seed(1)
    mask = make_mask("some", (8, 10), gen).to(DEV)
    x = torch.randn(8, 10, 32, generator=gen).to(DEV).masked_fill(~mask.unsqueeze(-1), float("nan"))
    eps = torch.randn(8, 10, 16, generator=gen).to(DEV)
    outs = []
    for mod, name in ((layer, gpu_backend), (twin, "reference")):
        xi = x.clone().requires_grad_()
        with run_on(name):
            z, kl = mod(xi, mask, eps=eps)
            grads = torch.autograd.grad(z.square().sum() + kl.sum(), [xi, *mod.parameters()])
        outs.append((z, kl) + grads)
    for a, b in zip(*outs):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    with run_on(gpu_backend):  # in-kernel eps: a training step; eval: z = mu
        z, kl = layer(x, mask)
        (z.square().sum() + kl.sum()).backward()
        assert all(torch.isfinite(p.grad).all() for p in layer.parameters())
        z, _, mu, _ = layer.eval()(x, mask, return_moments=True)
    assert torch.equal(z[mask], mu[mask])


def test_non_default_stream(gpu_backend):
    """The kernels launch on the current stream: the inputs are written on a side stream held
    busy by a sleep, so a kernel on any other stream would read the NaN placeholders."""
    shape = (64, 50, 128)
    mu, lv, eps, pm, plv, m = make_inputs(shape, prior="full", mask="some")
    src, m = [on_gpu(t, torch.float32) for t in (mu, lv, eps, pm, plv)], on_gpu(m)
    gz, gk = upstream(shape, "none", torch.float32, 2)
    want = run(ref.reparameterize_kl, [t.clone().requires_grad_() for t in src], m, gz, gk)
    with late_copies_on_side_stream(src) as leaves:
        with run_on(gpu_backend):
            got = run(reparameterize_kl, [x.requires_grad_() for x in leaves], m, gz, gk)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)
    for name in want[2]:
        torch.testing.assert_close(got[2][name], want[2][name], rtol=1e-5, atol=1e-5)
