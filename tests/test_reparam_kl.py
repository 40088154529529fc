"""reparameterize_kl on the CPU backends (reference, cpp and cpp's baseline ISA copy) against the
autograd oracle robustmm_fast.reference.reparameterize_kl (DESIGN §4, §7)."""
from __future__ import annotations

import math

import pytest
import torch

import robustmm_fast
from robustmm_fast import _backend
from robustmm_fast import reference as ref
from robustmm_fast.ops import reparameterize_kl
from robustmm_fast.reference.philox import philox_randn

from conftest import assert_close_dtype, LOW_PRECISION, opcheck_kernel_op, require_cpp, run_on

REDUCTIONS = ("none", "sum", "mean", "batchmean")
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
DTYPE_IDS = {torch.float32: "fp32", torch.float64: "fp64", torch.float16: "fp16", torch.bfloat16: "bf16"}
REALISTIC, AWKWARD = (8, 50, 128), (3, 7, 13)
SHAPES = (REALISTIC, AWKWARD, (5, 1), (2, 3, 4, 33), (13,), (3, 1037))  # 1037: > one 512-wide block, rows misaligned to 4
MASKS = ("none", "some", "all_excluded", "all_included", "single")
PRIORS = ("none", "full", "broadcast", "scalar", "mu_only", "logvar_only")


# ---------------------------------------------------------------- input builders

def make_mask(kind: str, lead: tuple, gen: torch.Generator) -> torch.Tensor | None:
    if kind == "none":
        return None
    n = math.prod(lead)
    if kind == "all_excluded":
        flat = torch.zeros(n, dtype=torch.bool)
    elif kind == "all_included":
        flat = torch.ones(n, dtype=torch.bool)
    elif kind == "single":
        flat = torch.zeros(n, dtype=torch.bool)
        if n:
            flat[int(torch.randint(0, n, (), generator=gen))] = True
    elif kind == "some":
        flat = torch.rand(n, generator=gen) < 0.6
        if n >= 2:  # at least one row of each kind
            flat[0], flat[-1] = True, False
    else:
        raise ValueError(kind)
    return flat.reshape(lead)


def make_inputs(shape, *, prior="none", mask="none", seed=0):
    """fp64 base tensors: (mu, logvar, eps, prior_mu, prior_logvar, mask)."""
    gen = torch.Generator().manual_seed(seed)
    f64 = dict(dtype=torch.float64, generator=gen)
    mu = torch.randn(shape, **f64)
    logvar = 0.5 * torch.randn(shape, **f64)
    eps = torch.randn(shape, **f64)
    d = shape[-1]
    pshape = {"full": shape, "broadcast": (d,), "scalar": (), "mu_only": shape, "logvar_only": shape}.get(prior)
    both = ("full", "broadcast", "scalar")
    pm = torch.randn(pshape, **f64) * 0.5 if prior in both + ("mu_only",) else None
    plv = torch.randn(pshape, **f64) * 0.3 if prior in both + ("logvar_only",) else None
    return mu, logvar, eps, pm, plv, make_mask(mask, tuple(shape[:-1]), gen)


def _leaf(t, dtype, requires_grad=True):
    return None if t is None else t.detach().to(dtype).requires_grad_(requires_grad)


def _run(fn, leaves, mask, *, sample, reduction, grad_z, grad_kl):
    """Call fn (the op or the oracle) on copies of `leaves`; return z, kl and the gradients of
    sum(z * grad_z) + sum(kl * grad_kl) w.r.t. every leaf that requires grad (None otherwise)."""
    names = ("mu", "logvar", "eps", "prior_mu", "prior_logvar")
    xs = {n: (None if t is None else t.detach().clone().requires_grad_(t.requires_grad))
          for n, t in zip(names, leaves)}
    kwargs = dict(prior_mu=xs["prior_mu"], prior_logvar=xs["prior_logvar"], mask=mask,
                  sample=sample, reduction=reduction)
    if sample:
        kwargs["eps"] = xs["eps"]
    z, kl = fn(xs["mu"], xs["logvar"], **kwargs)
    wants = [n for n in names if xs[n] is not None and xs[n].requires_grad and (n != "eps" or sample)]
    outs, ups = [], []
    if grad_z is not None:
        outs.append(z)
        ups.append(grad_z.to(z.dtype))
    if grad_kl is not None:
        outs.append(kl)
        ups.append(grad_kl.to(kl.dtype))
    keep = [i for i, o in enumerate(outs) if o.requires_grad]  # the oracle's kl ignores eps
    grads = torch.autograd.grad([outs[i] for i in keep], [xs[n] for n in wants],
                                [ups[i] for i in keep], allow_unused=True)
    got = dict(zip(wants, grads))
    return z.detach(), kl.detach(), {n: got.get(n) for n in names}


def check_against_oracle(backend, dtype, shape, *, prior="full", mask="some", reduction="none",
                         sample=True, eps_grad=True, upstream=("z", "kl"), seed=0,
                         requires_grad=("mu", "logvar", "eps", "prior_mu", "prior_logvar")):
    """Values and every gradient of the op on `backend` vs the reference's autograd."""
    mu, lv, eps, pm, plv, m = make_inputs(shape, prior=prior, mask=mask, seed=seed)
    rg = lambda name: name in requires_grad and (name != "eps" or eps_grad)
    leaves = [_leaf(mu, dtype, rg("mu")), _leaf(lv, dtype, rg("logvar")), _leaf(eps, dtype, rg("eps")),
              _leaf(pm, dtype, rg("prior_mu")), _leaf(plv, dtype, rg("prior_logvar"))]
    gen = torch.Generator().manual_seed(seed + 1)
    kl_shape = tuple(shape[:-1]) if reduction == "none" else ()
    grad_z = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype) if "z" in upstream else None
    grad_kl = torch.randn(kl_shape, generator=gen, dtype=torch.float64).to(dtype) if "kl" in upstream else None
    kw = dict(sample=sample, reduction=reduction, grad_z=grad_z, grad_kl=grad_kl)

    with run_on(backend):
        z, kl, grads = _run(reparameterize_kl, leaves, m, **kw)
    # oracle in the same dtype and in fp64 (the ground truth for low precision)
    z_ref, kl_ref, grads_ref = _run(ref.reparameterize_kl, leaves, m, **kw)
    leaves64 = [None if t is None else t.detach().double().requires_grad_(t.requires_grad) for t in leaves]
    kw64 = dict(kw, grad_z=None if grad_z is None else grad_z.double(),
                grad_kl=None if grad_kl is None else grad_kl.double())
    z64, kl64, grads64 = _run(ref.reparameterize_kl, leaves64, m, **kw64)

    assert z.dtype == dtype and kl.dtype == dtype
    assert z.shape == mu.shape and kl.shape == kl_shape
    assert_close_dtype(z, z64, "z", z_ref)
    assert_close_dtype(kl, kl64, "kl", kl_ref)
    if not sample:
        assert torch.equal(z, leaves[0].detach() if m is None else
                           torch.where(m.unsqueeze(-1), leaves[0].detach(), 0).to(dtype))
    for name in grads64:
        g, g_ref, g64 = grads[name], grads_ref[name], grads64[name]
        if g64 is None:
            assert g is None or not g.any(), f"grad of {name}: expected none"
            continue
        assert g is not None, f"grad of {name} is missing"
        assert g.dtype == dtype
        assert_close_dtype(g, g64, f"grad {name}", g_ref)
    return z, kl, grads


# ---------------------------------------------------------------- values and gradients

@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_shapes_and_dtypes(backend, shape, dtype):
    mask = "none" if len(shape) == 1 else "some"
    check_against_oracle(backend, dtype, shape, prior="full", mask=mask)


@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_reductions_and_masks(backend, reduction, mask):
    _, kl, grads = check_against_oracle(backend, torch.float64, AWKWARD, prior="none", mask=mask,
                                        reduction=reduction)
    check_against_oracle(backend, torch.float32, AWKWARD, prior="full", mask=mask, reduction=reduction,
                         seed=3)
    if mask == "all_excluded":
        assert torch.equal(kl, torch.zeros_like(kl)), f"{reduction} with every row excluded must be 0"
        assert all(g is None or not g.any() for g in grads.values())


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("include", (True, False))
def test_one_dim_input_with_mask(backend, reduction, include):
    """A (D,) input is one row: its mask is a 0-dim bool."""
    check_against_oracle(backend, torch.float64, (13,), prior="broadcast", reduction=reduction,
                         mask="all_included" if include else "all_excluded")


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("mask", ("some", "all_excluded"))
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_reductions_low_precision(backend, reduction, mask, dtype):
    check_against_oracle(backend, dtype, AWKWARD, prior="full", mask=mask, reduction=reduction)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("prior", ("broadcast", "scalar"))
def test_broadcast_prior_low_precision(backend, prior, dtype):
    """The gradient of a broadcast prior sums over rows; in fp16/bf16 that sum must be
    accumulated in fp32 (DESIGN §4), so its error stays within 2x the reference's own."""
    for seed in range(4):
        check_against_oracle(backend, dtype, (64, 16), prior=prior, mask="none", seed=seed)


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=DTYPE_IDS.get)
@pytest.mark.parametrize("prior", PRIORS)
def test_priors(backend, prior, dtype):
    _, _, grads = check_against_oracle(backend, dtype, AWKWARD, prior=prior, mask="some")
    if prior == "broadcast":
        assert grads["prior_mu"].shape == (AWKWARD[-1],)
        assert grads["prior_logvar"].shape == (AWKWARD[-1],)
    if prior == "scalar":
        assert grads["prior_mu"].shape == () and grads["prior_logvar"].shape == ()
    if prior == "mu_only":
        assert grads["prior_mu"] is not None and grads["prior_logvar"] is None
    if prior == "logvar_only":
        assert grads["prior_logvar"] is not None and grads["prior_mu"] is None


@pytest.mark.parametrize("prior", ("none", "full"))
def test_prior_one_given_equals_zero_other(backend, prior):
    """A missing prior_mu / prior_logvar is 0: the same as passing zeros."""
    mu, lv, eps, pm, plv, m = make_inputs(AWKWARD, prior="full", mask="some")
    with run_on(backend):
        _, kl_a = reparameterize_kl(mu, lv, eps=eps, prior_mu=pm, mask=m)
        _, kl_b = reparameterize_kl(mu, lv, eps=eps, prior_mu=pm, prior_logvar=torch.zeros_like(pm), mask=m)
        _, kl_c = reparameterize_kl(mu, lv, eps=eps, prior_logvar=plv, mask=m)
        _, kl_d = reparameterize_kl(mu, lv, eps=eps, prior_mu=torch.zeros_like(plv), prior_logvar=plv, mask=m)
        _, kl_e = reparameterize_kl(mu, lv, eps=eps, prior_mu=torch.zeros_like(mu),
                                    prior_logvar=torch.zeros_like(mu), mask=m)
        _, kl_f = reparameterize_kl(mu, lv, eps=eps, mask=m)
    torch.testing.assert_close(kl_a, kl_b)
    torch.testing.assert_close(kl_c, kl_d)
    torch.testing.assert_close(kl_e, kl_f)


@pytest.mark.parametrize("upstream", (("z",), ("kl",)), ids=("z_only", "kl_only"))
@pytest.mark.parametrize("reduction", ("none", "mean"))
def test_gradient_from_one_output(backend, upstream, reduction):
    """Only z or only kl reaches the loss (the other's gradient is None in backward)."""
    check_against_oracle(backend, torch.float64, AWKWARD, prior="full", mask="some",
                         reduction=reduction, upstream=upstream)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("mask", ("none", "some"))
@pytest.mark.parametrize("reduction", ("none", "mean"))
def test_sample_false(backend, dtype, mask, reduction):
    """sample=False: z == mu exactly, no eps, the gradient flows through kl (and z = mu)."""
    z, _, grads = check_against_oracle(backend, dtype, AWKWARD, prior="none", mask=mask,
                                       reduction=reduction, sample=False)
    assert grads["eps"] is None


def test_sample_false_ignores_eps_and_rng(backend):
    mu, lv, eps, _, _, _ = make_inputs(AWKWARD)
    state = torch.get_rng_state()
    with run_on(backend):
        z, kl = reparameterize_kl(mu, lv, sample=False)
    assert torch.equal(torch.get_rng_state(), state), "sample=False must not draw a seed"
    assert torch.equal(z, mu)
    assert z.data_ptr() != mu.data_ptr(), "z must not alias mu"
    with run_on(backend):
        z2, kl2 = reparameterize_kl(mu, lv, eps=eps, sample=False)
    assert torch.equal(z2, mu) and torch.equal(kl2, kl)


def test_eps_without_grad(backend):
    check_against_oracle(backend, torch.float32, AWKWARD, prior="none", mask="some", eps_grad=False)


@pytest.mark.parametrize("requires_grad", (("eps",), ("prior_mu",), ("prior_logvar",), ("logvar",),
                                           ("mu", "prior_logvar")), ids="+".join)
def test_gradient_to_a_subset(backend, requires_grad):
    """Only some inputs require grad (e.g. only the prior): those gradients are still right."""
    check_against_oracle(backend, torch.float64, AWKWARD, prior="broadcast", mask="some",
                         requires_grad=requires_grad)


def test_expanded_and_strided_upstream_gradients(backend):
    """z.sum() gives an expanded (stride 0) grad_z; slicing gives zero-filled ones."""
    mu, lv, eps, pm, plv, m = make_inputs((4, 6, 9), prior="full", mask="some")
    outs = []
    for fn, ctx in ((reparameterize_kl, run_on(backend)), (ref.reparameterize_kl, None)):
        xs = [t.clone().requires_grad_() for t in (mu, lv, eps, pm, plv)]
        with ctx or torch.enable_grad():
            z, kl = fn(xs[0], xs[1], eps=xs[2], prior_mu=xs[3], prior_logvar=xs[4], mask=m)
            loss = z.sum() + kl.sum() + z.transpose(0, 2)[::2].square().sum() + kl[:, ::3].sum()
            outs.append(torch.autograd.grad(loss, xs))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_aliased_inputs(backend):
    """The same tensor passed as several arguments (prior_mu=mu, or mu=logvar=eps)."""
    mu, lv, eps, _, _, m = make_inputs(AWKWARD, mask="some")
    outs = []
    for fn, ctx in ((reparameterize_kl, run_on(backend)), (ref.reparameterize_kl, None)):
        a, b = mu.clone().requires_grad_(), (0.3 * lv).requires_grad_()
        with ctx or torch.enable_grad():
            z1, kl1 = fn(a, b, eps=eps, prior_mu=a, prior_logvar=0.5 * b, mask=m)
            z2, kl2 = fn(a, a, eps=a, reduction="sum")
            g = torch.autograd.grad(z1.sum() + kl1.sum() + z2.sum() + kl2, (a, b))
        outs.append((z1, kl1, z2, kl2) + g)
    for x, y in zip(*outs):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64, torch.float16), ids=DTYPE_IDS.get)
def test_extreme_values_in_included_rows(backend, dtype):
    """Overflow / underflow / NaN in included rows behave as in the reference (inf and NaN where
    it has them, per row: one row's NaN never reaches another row)."""
    nan, inf = float("nan"), float("inf")
    rows = [(100.0, 0.0), (-100.0, 1.0), (0.0, 1e20), (0.0, nan), (1000.0, 0.0), (-1000.0, 0.0),
            (inf, 3.0), (-inf, -2.0), (0.3, 0.5)]
    lv = torch.tensor([[a, 0.1, -0.2] for a, _ in rows], dtype=torch.float64).to(dtype)
    mu = torch.tensor([[b, 0.5, 1.0] for _, b in rows], dtype=torch.float64).to(dtype)
    eps = torch.randn(mu.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(dtype)
    outs = []
    for fn, ctx in ((reparameterize_kl, run_on(backend)), (ref.reparameterize_kl, None)):
        xs = [t.clone().requires_grad_() for t in (mu, lv, eps)]
        with ctx or torch.enable_grad():
            z, kl = fn(xs[0], xs[1], eps=xs[2])
            g = torch.autograd.grad(z.sum() + kl.sum(), xs)
        outs.append((z, kl) + g)
    for name, a, b in zip(("z", "kl", "dmu", "dlogvar", "deps"), *outs):
        finite = torch.isfinite(b)
        assert torch.equal(torch.isnan(a), torch.isnan(b)), f"{name}: NaN pattern differs"
        assert torch.equal(a[~finite & ~torch.isnan(b)], b[~finite & ~torch.isnan(b)]), f"{name}: inf differs"
        rel = dict(rtol=1e-5, atol=1e-5) if dtype != torch.float16 else dict(rtol=2e-3, atol=2e-3)
        torch.testing.assert_close(a[finite], b[finite], **rel, msg=lambda m: f"{name}: {m}")
    assert torch.isfinite(outs[0][1][-1]), "the last, ordinary row stays finite"


def test_no_grad_and_inference_mode(backend):
    mu, lv, eps, _, _, m = make_inputs(AWKWARD, mask="some")
    mu.requires_grad_()
    z_ref, kl_ref = ref.reparameterize_kl(mu, lv, eps=eps, mask=m, reduction="mean")
    for guard in (torch.no_grad, torch.inference_mode):
        with run_on(backend), guard():
            z, kl = reparameterize_kl(mu, lv, eps=eps, mask=m, reduction="mean")
        assert not z.requires_grad and not kl.requires_grad
        torch.testing.assert_close(z, z_ref.detach())
        torch.testing.assert_close(kl, kl_ref.detach())


def test_thread_count_does_not_change_results(backend):
    """Per-element Philox and a fixed per-row summation order: bitwise the same on 1 or 2 threads."""
    mu, lv, _, pm, plv, m = make_inputs((64, 1037), prior="full", mask="some")
    xs = [t.float().requires_grad_() for t in (mu, lv, pm, plv)]
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            torch.manual_seed(0)
            with run_on(backend):
                z, kl = reparameterize_kl(xs[0], xs[1], prior_mu=xs[2], prior_logvar=xs[3], mask=m)
                g = torch.autograd.grad(z.square().sum() + kl.sum(), xs)
            results.append((z, kl) + g)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_non_contiguous_inputs(backend):
    mu, lv, eps, pm, plv, m = make_inputs((4, 6, 10), prior="full", mask="some")
    t = lambda x: x.transpose(0, 1)  # (6, 4, 10), non-contiguous
    args = [t(x).requires_grad_() for x in (mu, lv, eps, pm, plv)]
    mt = m.t()
    with run_on(backend):
        z, kl = reparameterize_kl(args[0], args[1], eps=args[2], prior_mu=args[3],
                                  prior_logvar=args[4], mask=mt)
        g = torch.autograd.grad(z.sum() + kl.sum(), args)
    zr, klr = ref.reparameterize_kl(*args[:2], eps=args[2], prior_mu=args[3], prior_logvar=args[4], mask=mt)
    gr = torch.autograd.grad(zr.sum() + klr.sum(), args)
    torch.testing.assert_close(z, zr)
    torch.testing.assert_close(kl, klr)
    for a, b in zip(g, gr):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------- NaN / Inf in excluded rows

@pytest.mark.parametrize("dtype", (torch.float32, torch.float16), ids=DTYPE_IDS.get)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("noise", ("given", "in_kernel", "none"))
def test_nan_inf_in_excluded_rows_do_not_leak(backend, reduction, noise, dtype):
    shape = (4, 3, 9)
    mu, lv, eps, pm, plv, _ = make_inputs(shape, prior="full")
    mask = torch.tensor([[True, False, True], [False, False, False], [True, True, True],
                         [False, True, False]])
    excl = ~mask

    def poison(t, value):
        t = t.clone()
        t[excl] = value
        return t

    gen = torch.Generator().manual_seed(9)
    gz = torch.randn(shape, generator=gen, dtype=torch.float64)
    gk = torch.randn(shape[:-1] if reduction == "none" else (), generator=gen, dtype=torch.float64)

    def run(mu, lv, eps, pm, plv, gz, gk):
        xs = [x.to(dtype).requires_grad_() for x in (mu, lv, eps, pm, plv)]
        kw = dict(prior_mu=xs[3], prior_logvar=xs[4], mask=mask, reduction=reduction)
        if noise == "given":
            kw["eps"] = xs[2]
        if noise == "none":
            kw["sample"] = False
        torch.manual_seed(1234)
        with run_on(backend):
            z, kl = reparameterize_kl(xs[0], xs[1], **kw)
            grads = torch.autograd.grad([z, kl], xs, [gz.to(dtype), gk.to(dtype)], allow_unused=True)
        return [z, kl, *[g for g in grads]]

    clean = run(mu, lv, eps, pm, plv, gz, gk)
    variants = [
        (float("nan"), float("nan"), float("nan"), float("nan"), float("nan"), float("nan")),
        (float("inf"), float("inf"), float("-inf"), float("-inf"), float("inf"), float("inf")),
        (float("-inf"), 1e30, float("inf"), float("nan"), float("-inf"), float("-inf")),
    ]
    for vals in variants:
        dirty = [poison(t, v) for t, v in zip((mu, lv, eps, pm, plv, gz), vals)]
        gk_d = poison(gk, vals[-1]) if reduction == "none" else gk
        out = run(*dirty, gk_d)
        for name, a, b in zip(("z", "kl", "dmu", "dlogvar", "deps", "dprior_mu", "dprior_logvar"), out, clean):
            if b is None:
                assert a is None or not a.any(), name
                continue
            assert torch.isfinite(a).all(), f"{name}: NaN/Inf leaked from excluded rows ({vals})"
            assert torch.equal(a, b), f"{name} changed when excluded rows hold {vals}"
    z, kl = clean[0], clean[1]
    assert not z[excl].any()
    if reduction == "none":
        assert not kl[excl].any()
    for g in clean[2:]:
        if g is not None:
            assert not g[excl].any(), "excluded rows must get zero gradients"


# ---------------------------------------------------------------- empty tensors

@pytest.mark.parametrize("use_mask", (False, True), ids=("nomask", "mask"))
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", ((0, 8), (0, 5, 8)), ids=str)
def test_empty_batch(backend, shape, reduction, use_mask):
    mu = torch.randn(shape, requires_grad=True)
    lv = torch.randn(shape, requires_grad=True)
    pm = torch.randn(shape[-1], requires_grad=True)
    mask = torch.ones(shape[:-1], dtype=torch.bool) if use_mask else None
    with run_on(backend):
        z, kl = reparameterize_kl(mu, lv, prior_mu=pm, mask=mask, reduction=reduction)
        assert z.shape == shape
        assert kl.shape == (shape[:-1] if reduction == "none" else ())
        if reduction != "none":
            assert kl.item() == 0.0, f"{reduction} of no rows must be 0, got {kl.item()}"
        dmu, dlv, dpm = torch.autograd.grad(z.sum() + kl.sum(), (mu, lv, pm))
    assert dmu.shape == shape and dlv.shape == shape and dpm.shape == (shape[-1],)
    assert not dpm.any()


# ---------------------------------------------------------------- in-kernel eps (Philox)

def _replay_seed(s: int) -> int:
    """The seed reparameterize_kl draws after torch.manual_seed(s) (ops/_random.draw_seed)."""
    torch.manual_seed(s)
    return int(torch.randint(0, 2**62, (), dtype=torch.int64))


@pytest.mark.parametrize("shape", (AWKWARD, (2, 3, 4, 33), (13,), (3, 1037)), ids=str)
def test_in_kernel_eps_is_the_philox_stream(backend, shape):
    mu, lv, _, _, _, _ = make_inputs(shape)
    mu, lv = mu.float(), lv.float()
    torch.manual_seed(2024)
    with run_on(backend):
        z, _ = reparameterize_kl(mu, lv)
    eps = philox_randn(_replay_seed(2024), shape)
    torch.testing.assert_close(z, mu + torch.exp(0.5 * lv) * eps, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_in_kernel_eps_same_across_backends(dtype):
    """One seed gives the same eps (hence the same z) on the cpp and reference backends."""
    require_cpp()
    mu, lv, _, pm, plv, m = make_inputs((6, 5, 37), prior="full", mask="some")
    args = [t.to(dtype) for t in (mu, lv, pm, plv)]
    out = {}
    for name in ("reference", "cpp"):
        torch.manual_seed(77)
        with run_on(name):
            out[name] = reparameterize_kl(args[0], args[1], prior_mu=args[2], prior_logvar=args[3], mask=m)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype in (torch.float32, torch.float64) else {}
    torch.testing.assert_close(out["cpp"][0], out["reference"][0], **tol)
    torch.testing.assert_close(out["cpp"][1], out["reference"][1], **tol)


def test_in_kernel_eps_reproducible_and_seed_dependent(backend):
    mu, lv, _, _, _, _ = make_inputs(AWKWARD)
    with run_on(backend):
        torch.manual_seed(1)
        z1, kl1 = reparameterize_kl(mu, lv)
        torch.manual_seed(1)
        z2, kl2 = reparameterize_kl(mu, lv)
        torch.manual_seed(2)
        z3, _ = reparameterize_kl(mu, lv)
        z4, _ = reparameterize_kl(mu, lv)  # the RNG advanced: a new draw
    assert torch.equal(z1, z2) and torch.equal(kl1, kl2)
    assert not torch.equal(z1, z3)
    assert not torch.equal(z3, z4)
    assert (z1 != z3).float().mean() > 0.99


def test_in_kernel_eps_independent_of_mask(backend):
    """Element i's eps depends on (seed, i) only: masking rows does not shift the stream."""
    mu, lv, _, _, _, m = make_inputs(AWKWARD, mask="some")
    with run_on(backend):
        torch.manual_seed(5)
        z_all, _ = reparameterize_kl(mu, lv)
        torch.manual_seed(5)
        z_masked, _ = reparameterize_kl(mu, lv, mask=m)
    torch.testing.assert_close(z_masked[m], z_all[m], rtol=0, atol=0)


def test_generator_argument(backend):
    mu, lv, _, _, _, _ = make_inputs(AWKWARD)
    state = torch.get_rng_state()
    with run_on(backend):
        z1, _ = reparameterize_kl(mu, lv, generator=torch.Generator().manual_seed(11))
        z2, _ = reparameterize_kl(mu, lv, generator=torch.Generator().manual_seed(11))
        z3, _ = reparameterize_kl(mu, lv, generator=torch.Generator().manual_seed(12))
    assert torch.equal(torch.get_rng_state(), state), "a generator= draw must not touch the global RNG"
    assert torch.equal(z1, z2)
    assert not torch.equal(z1, z3)
    g = torch.Generator().manual_seed(11)
    seed = int(torch.randint(0, 2**62, (), generator=g, dtype=torch.int64))
    eps = philox_randn(seed, AWKWARD).double()
    torch.testing.assert_close(z1, mu + torch.exp(0.5 * lv) * eps, rtol=1e-6, atol=1e-6)


def test_in_kernel_eps_statistics(backend):
    """(z - mu) / sigma over 2^20 elements (2^18 on the slow reference Philox, whose stream
    test_in_kernel_eps_same_across_backends ties to cpp's) is standard normal: moments, KS
    distance, quantiles, and no correlation between neighbours (Box-Muller pairs, Philox lanes).
    Bounds are about 5 standard errors at n; the seed is fixed, so the test is deterministic."""
    n = 1 << (18 if backend == "reference" else 20)
    gen = torch.Generator().manual_seed(0)
    mu = torch.randn(1024, n // 1024, generator=gen, dtype=torch.float64)
    lv = torch.randn(1024, n // 1024, generator=gen, dtype=torch.float64)
    torch.manual_seed(31337)
    with run_on(backend):
        z, _ = reparameterize_kl(mu, lv)
    e = ((z - mu) / torch.exp(0.5 * lv)).flatten()
    se = 1 / math.sqrt(n)
    assert e.mean().abs() < 0.01
    assert (e.std() - 1).abs() < 0.01
    assert e.pow(3).mean().abs() < 5 * math.sqrt(15) * se  # skewness
    assert (e.pow(4).mean() - 3).abs() < 5 * math.sqrt(96) * se  # excess kurtosis
    # Kolmogorov-Smirnov distance; the 0.1% critical value is 1.95 / sqrt(n)
    x, _ = torch.sort(e)
    cdf = torch.special.ndtr(x)
    i = torch.arange(1, n + 1, dtype=torch.float64)
    ks = torch.maximum(i / n - cdf, cdf - (i - 1) / n).max().item()
    assert ks < 1.95 * se, f"KS distance {ks:.2e}"
    normal = torch.distributions.Normal(0.0, 1.0)
    for p in (0.001, 0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 0.999):
        q = x[min(n - 1, int(p * n))].item()
        want = normal.icdf(torch.tensor(p, dtype=torch.float64)).item()
        density = math.exp(-want * want / 2) / math.sqrt(2 * math.pi)
        tol = 5 * math.sqrt(p * (1 - p)) * se / density
        assert abs(q - want) < tol, f"quantile {p}: {q:.4f} vs {want:.4f} (tol {tol:.4f})"
    for lag in (1, 2, 3, 4, 5):
        corr = torch.corrcoef(torch.stack([e[:-lag], e[lag:]]))[0, 1].item()
        assert abs(corr) < 5 * se, f"lag-{lag} correlation {corr:.4f}"
    # the four lanes of one Philox counter are identically distributed
    lanes = e.reshape(-1, 4)
    assert (lanes.mean(0).abs() < 10 * se).all() and ((lanes.std(0) - 1).abs() < 10 * se).all()


@pytest.mark.parametrize("prior", ("none", "full"))
@pytest.mark.parametrize("reduction", ("none", "mean"))
def test_in_kernel_eps_backward_matches_eps_used(backend, prior, reduction):
    """The backward regenerates the same eps as the forward: recover eps = (z - mu) / sigma and
    feed it to the oracle as a given eps; all gradients agree."""
    shape = AWKWARD
    mu, lv, _, pm, plv, m = make_inputs(shape, prior=prior, mask="some")
    xs = [None if t is None else t.clone().requires_grad_() for t in (mu, lv, pm, plv)]
    gen = torch.Generator().manual_seed(3)
    gz = torch.randn(shape, generator=gen, dtype=torch.float64)
    gk = torch.randn(shape[:-1] if reduction == "none" else (), generator=gen, dtype=torch.float64)
    torch.manual_seed(99)
    with run_on(backend):
        z, kl = reparameterize_kl(xs[0], xs[1], prior_mu=xs[2], prior_logvar=xs[3], mask=m,
                                  reduction=reduction)
        leaves = [x for x in xs if x is not None]
        grads = torch.autograd.grad([z, kl], leaves, [gz, gk])
    eps = ((z.detach() - mu) / torch.exp(0.5 * lv)).where(m.unsqueeze(-1), 0.0)
    eps_philox = philox_randn(_replay_seed(99), shape).double().where(m.unsqueeze(-1), 0.0)
    torch.testing.assert_close(eps, eps_philox, rtol=1e-5, atol=1e-5)
    ys = [None if t is None else t.clone().requires_grad_() for t in (mu, lv, pm, plv)]
    zr, klr = ref.reparameterize_kl(ys[0], ys[1], eps=eps, prior_mu=ys[2], prior_logvar=ys[3], mask=m,
                                    reduction=reduction)
    grads_ref = torch.autograd.grad([zr, klr], [y for y in ys if y is not None], [gz, gk])
    torch.testing.assert_close(z.detach(), zr.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(kl.detach(), klr.detach(), rtol=1e-10, atol=1e-12)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("reduction", ("none", "mean"))
def test_no_eps_sized_tensor_saved(backend, reduction):
    """With in-kernel eps only mu and logvar are saved at full size (eps is regenerated)."""
    mu = torch.randn(8, 50, 16, requires_grad=True)
    lv = torch.randn(8, 50, 16, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with run_on(backend), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        z, kl = reparameterize_kl(mu, lv, reduction=reduction)
    full = [t for t in saved if t.numel() == mu.numel()]
    assert len(full) == 2, f"saved full-size tensors: {[tuple(t.shape) for t in full]}"
    assert {t.data_ptr() for t in full} == {mu.data_ptr(), lv.data_ptr()}
    assert sum(t.numel() for t in saved) <= 2 * mu.numel() + mu.numel() // mu.shape[-1] + 1
    (z.sum() + kl.sum()).backward()
    assert mu.grad is not None and lv.grad is not None


# ---------------------------------------------------------------- gradcheck, opcheck

def _tiny(prior: str, mask: bool, seed=0):
    mu, lv, eps, pm, plv, m = make_inputs((3, 5), prior=prior, mask="some" if mask else "none", seed=seed)
    req = lambda t: None if t is None else t.requires_grad_()
    return req(mu), req(lv), req(eps), req(pm), req(plv), m


@pytest.mark.parametrize("reduction", ("none", "mean", "batchmean"))
@pytest.mark.parametrize("prior", ("none", "full", "broadcast", "scalar", "mu_only"))
@pytest.mark.parametrize("mask", (False, True), ids=("nomask", "mask"))
def test_gradcheck(backend, prior, mask, reduction):
    mu, lv, eps, pm, plv, m = _tiny(prior, mask)
    inputs = [t for t in (mu, lv, eps, pm, plv) if t is not None]
    has = [t is not None for t in (pm, plv)]

    def fn(mu, lv, eps, *prior_args):
        it = iter(prior_args)
        p_mu = next(it) if has[0] else None
        p_lv = next(it) if has[1] else None
        return reparameterize_kl(mu, lv, eps=eps, prior_mu=p_mu, prior_logvar=p_lv, mask=m,
                                 reduction=reduction)

    with run_on(backend):
        assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("sample", (True, False))
def test_gradcheck_in_kernel_eps_and_no_sample(backend, sample):
    mu, lv, _, _, _, m = _tiny("none", True)

    def fn(mu, lv):  # a fresh generator per call: the same eps at every evaluation
        return reparameterize_kl(mu, lv, mask=m, sample=sample, reduction="sum",
                                 generator=torch.Generator().manual_seed(4))

    with run_on(backend):
        assert torch.autograd.gradcheck(fn, (mu, lv))


def _opcheck_samples():
    g = torch.Generator().manual_seed(0)
    r = lambda *s, dtype=torch.float32: torch.randn(*s, generator=g, dtype=dtype).requires_grad_()
    seed = torch.tensor(123456789, dtype=torch.int64)
    mask = torch.tensor([True, False, True, True])
    return [
        (r(4, 6), r(4, 6), None, None, None, None, seed, 2),
        (r(4, 6), r(4, 6), r(4, 6), None, None, mask, seed, 1),
        (r(4, 6), r(4, 6), None, r(4, 6), r(4, 6), None, seed, 0),
        (r(2, 3, 7, dtype=torch.float64), r(2, 3, 7, dtype=torch.float64), None,
         r(2, 3, 7, dtype=torch.float64), r(2, 3, 7, dtype=torch.float64),
         torch.tensor([[True, False, True], [False, True, True]]), seed, 2),
        (r(5, dtype=torch.float64), r(5, dtype=torch.float64), r(5, dtype=torch.float64), None, None,
         None, seed, 1),
    ]


@pytest.mark.parametrize("backend", ("reference", "cpp"), indirect=True)
@pytest.mark.parametrize("sample_idx", range(5))
def test_opcheck_forward(backend, sample_idx):
    args = _opcheck_samples()[sample_idx]
    with run_on(backend):
        opcheck_kernel_op(torch.ops.robustmm.reparam_kl_forward, (backend, *args))


@pytest.mark.parametrize("need_grad_eps,need_grad_prior", ((False, False), (True, True)))
@pytest.mark.parametrize("backend", ("reference", "cpp"), indirect=True)
@pytest.mark.parametrize("sample_idx", range(5))
def test_opcheck_backward(backend, sample_idx, need_grad_eps, need_grad_prior):
    mu, lv, eps, pm, plv, mask, seed, noise = _opcheck_samples()[sample_idx]
    d = lambda t: None if t is None else t.detach()
    acc = torch.float64 if mu.dtype == torch.float64 else torch.float32
    grad_z = torch.randn(mu.shape, dtype=mu.dtype)
    grad_kl = torch.randn(mu.shape[:-1], dtype=acc)
    args = (backend, grad_z, grad_kl, d(mu), d(lv), d(eps), d(pm), d(plv), mask, seed, noise,
            need_grad_eps, need_grad_prior)
    with run_on(backend):
        opcheck_kernel_op(torch.ops.robustmm.reparam_kl_backward, args)


# ---------------------------------------------------------------- torch.compile

def _fn_given_eps(mu, lv, eps, pm, plv, mask):
    z, kl = reparameterize_kl(mu, lv, eps=eps, prior_mu=pm, prior_logvar=plv, mask=mask,
                              reduction="batchmean")
    return torch.tanh(z).sum(-1), kl * 2.0


def _fn_in_kernel(mu, lv, mask):
    z, kl = reparameterize_kl(mu, lv, mask=mask, reduction="none")
    return z * 3.0, kl.sum()


def _compare_compiled(fn, compiled, xs, mask, seed=None):
    outs = []
    for f in (fn, compiled):
        ys = [x.detach().clone().requires_grad_() for x in xs]
        if seed is not None:
            torch.manual_seed(seed)
        a, b = f(*ys, mask)
        ga = torch.randn(a.shape, generator=torch.Generator().manual_seed(1), dtype=a.dtype)
        grads = torch.autograd.grad([a, b], ys, [ga, torch.ones_like(b)])
        outs.append((a, b, grads))
    (a0, b0, g0), (a1, b1, g1) = outs
    torch.testing.assert_close(a1, a0)
    torch.testing.assert_close(b1, b0)
    for x, y in zip(g1, g0):
        torch.testing.assert_close(x, y)


@pytest.mark.parametrize("compiler", ("eager", "aot_eager"))
@pytest.mark.parametrize("backend", ("reference", "cpp"), indirect=True)
def test_compile_fullgraph(backend, compiler):
    torch._dynamo.reset()
    mu, lv, eps, pm, plv, m = make_inputs((4, 3, 10), prior="broadcast", mask="some")
    xs = [t.float() for t in (mu, lv, eps, pm, plv)]
    with run_on(backend):
        _compare_compiled(_fn_given_eps, torch.compile(_fn_given_eps, backend=compiler, fullgraph=True),
                          xs, m)
    with run_on(backend):
        _compare_compiled(_fn_in_kernel, torch.compile(_fn_in_kernel, backend=compiler, fullgraph=True),
                          xs[:2], m, seed=17)


@pytest.mark.parametrize("backend", ("reference", "cpp"), indirect=True)
def test_compile_dynamic_shapes(backend):
    """One dynamic-shape graph serves every batch size, B = 0 included."""
    torch._dynamo.reset()
    compiled = torch.compile(_fn_given_eps, backend="aot_eager", fullgraph=True, dynamic=True)
    for b in (3, 6, 0):
        mu, lv, eps, pm, plv, m = make_inputs((b, 4, 9), prior="broadcast", mask="some", seed=b)
        with run_on(backend):
            _compare_compiled(_fn_given_eps, compiled, [t.float() for t in (mu, lv, eps, pm, plv)], m)


@pytest.mark.parametrize("backend", ("cpp",), indirect=True)
def test_compile_inductor(backend):
    torch._dynamo.reset()
    mu, lv, eps, pm, plv, m = make_inputs((3, 7), prior="broadcast", mask="some")
    xs = [t.float() for t in (mu, lv, eps, pm, plv)]
    with run_on(backend):
        _compare_compiled(_fn_given_eps, torch.compile(_fn_given_eps, fullgraph=True), xs, m)
    with run_on(backend):
        _compare_compiled(_fn_in_kernel, torch.compile(_fn_in_kernel, fullgraph=True), xs[:2], m, seed=5)


# ---------------------------------------------------------------- bad input

def _bad_calls():
    mu, lv = torch.randn(4, 6), torch.randn(4, 6)
    R = reparameterize_kl
    return [
        ("logvar_shape", lambda: R(mu, torch.randn(4, 5)), ValueError, "logvar"),
        ("eps_shape", lambda: R(mu, lv, eps=torch.randn(6)), ValueError, "eps"),
        ("logvar_dtype", lambda: R(mu, lv.double()), TypeError, "logvar.*mu"),
        ("eps_dtype", lambda: R(mu, lv, eps=torch.randn(4, 6, dtype=torch.float16)), TypeError, "eps.*mu"),
        ("prior_mu_dtype", lambda: R(mu, lv, prior_mu=torch.zeros(6, dtype=torch.float64)), TypeError,
         "prior_mu.*mu"),
        ("prior_no_broadcast", lambda: R(mu, lv, prior_mu=torch.zeros(5)), ValueError, "prior_mu"),
        ("prior_logvar_too_big", lambda: R(mu, lv, prior_logvar=torch.zeros(2, 4, 6)), ValueError,
         "prior_logvar"),
        ("mask_shape", lambda: R(mu, lv, mask=torch.ones(4, 6, dtype=torch.bool)), ValueError, "mask"),
        ("mask_shape_short", lambda: R(mu, lv, mask=torch.ones(3, dtype=torch.bool)), ValueError, "mask"),
        ("mask_dtype", lambda: R(mu, lv, mask=torch.ones(4)), TypeError, "mask.*bool"),
        ("mask_not_tensor", lambda: R(mu, lv, mask=[True] * 4), TypeError, "mask"),
        ("reduction", lambda: R(mu, lv, reduction="avg"), ValueError, "reduction"),
        ("reduction_none_obj", lambda: R(mu, lv, reduction=None), ValueError, "reduction"),
        ("int_mu", lambda: R(torch.ones(4, 6, dtype=torch.int64), lv), TypeError, "mu"),
        ("int_logvar", lambda: R(mu, torch.ones(4, 6, dtype=torch.int32)), TypeError, "logvar"),
        ("int_eps", lambda: R(mu, lv, eps=torch.ones(4, 6, dtype=torch.int64)), TypeError, "eps"),
        ("bool_mu", lambda: R(torch.ones(4, 6, dtype=torch.bool), lv), TypeError, "mu"),
        ("mu_0dim", lambda: R(torch.tensor(1.0), torch.tensor(1.0)), ValueError, "mu"),
        ("mu_not_tensor", lambda: R(mu.numpy(), lv), TypeError, "mu"),
        ("sample_int", lambda: R(mu, lv, sample=1), TypeError, "sample"),
        ("sample_tensor", lambda: R(mu, lv, sample=torch.tensor(True)), TypeError, "sample"),
        ("generator", lambda: R(mu, lv, generator=3), TypeError, "generator"),
    ]


@pytest.mark.parametrize("case", _bad_calls(), ids=lambda c: c[0])
def test_bad_input(case):
    _, call, exc, match = case
    with pytest.raises(exc, match=match):
        call()


def _bad_cpp_calls():
    mu, lv = torch.randn(4, 6), torch.randn(4, 6)
    F = lambda *a: torch.ops.robustmm_C.reparam_kl_forward(*a)
    B = lambda *a: torch.ops.robustmm_C.reparam_kl_backward(*a)
    gk = torch.randn(4)
    return [
        ("int_mu", lambda: F(mu.long(), lv, None, None, None, None, 0, 2), TypeError, "mu"),
        ("0dim", lambda: F(torch.tensor(1.0), torch.tensor(1.0), None, None, None, None, 0, 2), ValueError, "mu"),
        ("logvar_shape", lambda: F(mu, lv[:, :5], None, None, None, None, 0, 2), ValueError, "logvar"),
        ("logvar_dtype", lambda: F(mu, lv.double(), None, None, None, None, 0, 2), TypeError, "logvar"),
        ("eps_missing", lambda: F(mu, lv, None, None, None, None, 0, 1), ValueError, "eps"),
        ("eps_unexpected", lambda: F(mu, lv, mu, None, None, None, 0, 2), ValueError, "eps"),
        ("eps_shape", lambda: F(mu, lv, mu[:, :3].clone(), None, None, None, 0, 1), ValueError, "eps"),
        ("noise", lambda: F(mu, lv, None, None, None, None, 0, 7), ValueError, "noise"),
        ("prior_alone", lambda: F(mu, lv, None, mu, None, None, 0, 2), ValueError, "prior"),
        ("prior_shape", lambda: F(mu, lv, None, mu[:1].clone(), lv[:1].clone(), None, 0, 2), ValueError,
         "prior_mu"),
        ("prior_dtype", lambda: F(mu, lv, None, mu.double(), lv.double(), None, 0, 2), TypeError, "prior_mu"),
        ("mask_dtype", lambda: F(mu, lv, None, None, None, torch.ones(4), 0, 2), TypeError, "mask"),
        ("mask_shape", lambda: F(mu, lv, None, None, None, torch.ones(3, dtype=torch.bool), 0, 2), ValueError,
         "mask"),
        ("grad_kl_dtype", lambda: B(mu, gk.double(), mu, lv, None, None, None, None, 0, 2, False, False),
         TypeError, "grad_kl"),
        ("grad_kl_shape", lambda: B(mu, gk[:3], mu, lv, None, None, None, None, 0, 2, False, False),
         ValueError, "grad_kl"),
        ("grad_z_shape", lambda: B(mu[:, :2], gk, mu, lv, None, None, None, None, 0, 2, False, False),
         ValueError, "grad_z"),
        ("grad_z_dtype", lambda: B(mu.half(), gk, mu, lv, None, None, None, None, 0, 2, False, False),
         TypeError, "grad_z"),
        ("bwd_eps_missing", lambda: B(mu, gk, mu, lv, None, None, None, None, 0, 1, True, False),
         ValueError, "eps"),
    ]


@pytest.mark.parametrize("case", _bad_cpp_calls(), ids=lambda c: c[0])
def test_bad_input_cpp_checks(case):
    """The C++ entry points check their arguments (TORCH_CHECK) instead of crashing."""
    require_cpp()
    _, call, exc, match = case
    with pytest.raises(exc, match=match):
        call()


def test_cpp_kernel_direct_call_matches_reference():
    """The kernel-level op, called directly, agrees with the reference math (and accepts
    non-contiguous and zero-width inputs)."""
    require_cpp()
    mu, lv, eps, pm, plv, m = make_inputs((5, 12), prior="full", mask="some")
    z, kl = torch.ops.robustmm_C.reparam_kl_forward(mu[:, ::2], lv[:, ::2], eps[:, ::2], pm[:, ::2],
                                                    plv[:, ::2], m, 0, 1)
    zr, klr = ref.reparameterize_kl(mu[:, ::2], lv[:, ::2], eps=eps[:, ::2], prior_mu=pm[:, ::2],
                                    prior_logvar=plv[:, ::2], mask=m)
    torch.testing.assert_close(z, zr)
    torch.testing.assert_close(kl, klr)
    z0, kl0 = torch.ops.robustmm_C.reparam_kl_forward(torch.randn(4, 0), torch.randn(4, 0), None, None,
                                                      None, None, 0, 2)
    assert z0.shape == (4, 0) and torch.equal(kl0, torch.zeros(4))


# ---------------------------------------------------------------- backend choice

def test_explicit_backend_unavailable_raises():
    mu, lv = torch.randn(3, 4), torch.randn(3, 4)
    with pytest.raises(RuntimeError, match=r"(?s)'cuda'.*unavailable.*CUDA tensors.*To fix"):
        with robustmm_fast.use_backend("cuda"):
            reparameterize_kl(mu, lv)
    # (TRITON_INTERPRET=1 -- which tests/test_reparam_kl_interpret.py sets when it is collected --
    # makes triton run CPU tensors)
    if _backend._unavailable_reason("triton", mu.device) is not None:
        with pytest.raises(RuntimeError, match=r"'triton'.*unavailable"):
            with robustmm_fast.use_backend("triton"):
                reparameterize_kl(mu, lv)


def test_unknown_backend_raises():
    with pytest.raises(ValueError, match="bogus"):
        with robustmm_fast.use_backend("bogus"):
            pass


@pytest.mark.parametrize("name", ("reference", "cpp", "Reference", " cpp "))
def test_env_backend_honored(monkeypatch, name):
    want = name.strip().lower()
    if want == "cpp":
        require_cpp()
    monkeypatch.setenv("ROBUSTMM_BACKEND", name)
    before = _backend.backend_calls[("reparam_kl", want)]
    reparameterize_kl(torch.randn(3, 4), torch.randn(3, 4))
    assert robustmm_fast.last_backend("reparam_kl") == want
    assert _backend.backend_calls[("reparam_kl", want)] == before + 1


def test_env_backend_invalid(monkeypatch):
    monkeypatch.setenv("ROBUSTMM_BACKEND", "fastest")
    with pytest.raises(ValueError, match="ROBUSTMM_BACKEND"):
        reparameterize_kl(torch.randn(3, 4), torch.randn(3, 4))


def test_use_backend_overrides_env(monkeypatch):
    monkeypatch.setenv("ROBUSTMM_BACKEND", "fastest")  # ignored inside use_backend
    with run_on("reference"):
        reparameterize_kl(torch.randn(3, 4), torch.randn(3, 4))


def test_auto_picks_cpp_on_cpu():
    expected = "cpp" if robustmm_fast.backends()["cpp"]["available"] else "reference"
    if expected == "reference":
        require_cpp()  # fails under ROBUSTMM_REQUIRE_EXT=1
    reparameterize_kl(torch.randn(3, 4), torch.randn(3, 4))
    assert robustmm_fast.last_backend("reparam_kl") == expected


def test_run_on_detects_fallback():
    """The run_on helper itself fails when another backend ran than the one it names."""
    require_cpp()
    with pytest.raises(AssertionError, match="'reference' ran"):
        with run_on("cpp"):
            with robustmm_fast.use_backend("reference"):
                reparameterize_kl(torch.randn(3, 4), torch.randn(3, 4))
    with pytest.raises(AssertionError, match="never ran"):
        with run_on("reference"):
            pass


@pytest.mark.parametrize("which", ("native", "default"))
def test_cpu_capability_switch(cpu_isa, which):
    require_cpp()
    got = cpu_isa(which)
    mu, lv, eps, pm, plv, m = make_inputs(AWKWARD, prior="full", mask="some")
    with run_on("cpp"):
        z, kl = reparameterize_kl(mu.float(), lv.float(), eps=eps.float(), prior_mu=pm.float(),
                                  prior_logvar=plv.float(), mask=m)
    assert got in ("avx2", "default")
