import os
os.environ["TRITON_INTERPRET"] = "1"  # before triton / robustmm_fast are imported  # noqa: E402

"""Interpret tier of reparameterize_kl's Triton backend (kernels/reparam_kl.py) on CPU tensors.

Run in its own process:
    TRITON_INTERPRET=1 python -m pytest -m interpret tests/test_reparam_kl_interpret.py -p no:cacheprovider

Every test names the triton backend and fails if it did not run. The oracle is the reference
(robustmm_fast.reference.reparameterize_kl, autograd for the gradients) with the same eps, and
robustmm_fast.reference.philox for the in-kernel eps.
"""
import contextlib
import zlib

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

import robustmm_fast  # noqa: E402
from robustmm_fast import _backend  # noqa: E402
from robustmm_fast.reference import reparameterize_kl as ref_reparameterize_kl  # noqa: E402
from robustmm_fast.reference.philox import (_box_muller, _uniform, philox4x32_10,  # noqa: E402
                                            philox_randn)
from robustmm_fast.kernels import reparam_kl as K  # noqa: E402
from conftest import assert_close_dtype, require_cpp  # noqa: E402
from robustmm_fast.kernels.reparam_kl import _philox_eps  # noqa: E402

pytestmark = pytest.mark.interpret

OP = "reparam_kl"
SHAPES = [(3, 5, 8), (2, 7, 13), (4, 1)]  # D % 4 == 0, an awkward D, D = 1
REDUCTIONS = ("none", "sum", "mean", "batchmean")
MASKS = ("none", "all", "some", "single", "excluded")


# ---- helpers ----

@contextlib.contextmanager
def triton_ran(calls: int):
    """Run the block on the triton backend and check that exactly `calls` reparam_kl ops
    (forward + backward) ran on it, and that it ran last."""
    before = _backend.backend_calls[(OP, "triton")]
    with robustmm_fast.use_backend("triton"):
        yield
    assert robustmm_fast.last_backend(OP) == "triton"
    assert _backend.backend_calls[(OP, "triton")] - before == calls


def make_mask(kind, lead, gen):
    if kind == "none":
        return None
    n = 1
    for s in lead:
        n *= s
    if kind == "all":
        flat = torch.ones(n, dtype=torch.bool)
    elif kind == "excluded":
        flat = torch.zeros(n, dtype=torch.bool)
    elif kind == "single":
        flat = torch.zeros(n, dtype=torch.bool)
        flat[int(torch.randint(0, n, (), generator=gen))] = True
    else:  # some: both kinds present when n >= 2
        flat = torch.rand(n, generator=gen) < 0.5
        flat[0] = True
        if n > 1:
            flat[-1] = False
    return flat.reshape(lead)


def make_inputs(shape, dtype, gen, *, prior=None, mask_kind="none", nan_excluded=True):
    """Leaf tensors (mu, logvar, eps, prior_mu, prior_logvar, mask); excluded rows hold NaN."""
    def rnd(s, scale=1.0):
        return (torch.randn(s, generator=gen, dtype=torch.float64) * scale).to(dtype)
    mu, logvar, eps = rnd(shape), rnd(shape, 0.5), rnd(shape)
    pm = plv = None
    if prior == "full":
        pm, plv = rnd(shape), rnd(shape, 0.5)
    elif prior == "broadcast":
        pm, plv = rnd(shape[-1:]), rnd(shape[-1:], 0.5)
    mask = make_mask(mask_kind, shape[:-1], gen)
    if mask is not None and nan_excluded:
        bad = ~mask
        for t in (mu, logvar, eps) + ((pm, plv) if prior == "full" else ()):
            t[bad] = float("nan")
    leaves = [mu, logvar, eps, pm, plv]
    for t in leaves:
        if t is not None:
            t.requires_grad_(True)
    return leaves + [mask]


def grads_of(outputs, upstream, inputs):
    present = [t for t in inputs if t is not None]
    got = torch.autograd.grad(outputs, present, upstream, allow_unused=True)
    it = iter(got)
    return [None if t is None else next(it) for t in inputs]


def assert_close(a, b, atol, rtol, what):
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    assert a.dtype == b.dtype, f"{what}: dtype {a.dtype} != {b.dtype}"
    torch.testing.assert_close(a, b, atol=atol, rtol=rtol, equal_nan=False, msg=lambda m: f"{what}: {m}")


def oracle_eps(seed, first, n):
    """float32 eps of flat indices [first, first + n): component (i & 3) of Philox counter i >> 2."""
    idx = torch.arange(first, first + n, dtype=torch.int64)
    u = [_uniform(x) for x in philox4x32_10(seed, idx >> 2)]
    n0, n1 = _box_muller(u[0], u[1])
    n2, n3 = _box_muller(u[2], u[3])
    return torch.stack([n0, n1, n2, n3], dim=1).gather(1, (idx & 3)[:, None]).squeeze(1)


def seed_from_manual_seed(s):
    """The seed reparameterize_kl draws after torch.manual_seed(s) (ops/_random.draw_seed)."""
    torch.manual_seed(s)
    return int(torch.randint(0, 2**62, (), dtype=torch.int64))


# ---- in-kernel eps: the shared Philox stream ----

@pytest.mark.parametrize("shape", [(3, 5, 8), (2, 7, 13), (4, 1), (6,), (2, 3, 4)])
@pytest.mark.parametrize("seed", [0, 12345, 2**31 + 11, 2**61 + 2**40 + 3])
def test_philox_eps_matches_oracle(shape, seed):
    mu, lv = torch.zeros(shape), torch.zeros(shape)
    z, kl = K.reparam_kl_forward(mu, lv, None, None, None, None, seed, 2)
    expect = philox_randn(seed, shape)
    assert z.shape == shape and z.dtype == torch.float32
    torch.testing.assert_close(z, expect, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kl, torch.zeros(shape[:-1]), atol=0, rtol=0)
    # the stream is not trivially constant and its moments are plausible
    assert z.std() > 0.3


@triton.jit
def _eps_probe_kernel(out_ptr, seed, first, ALIGNED4: tl.constexpr, BLOCK_D: tl.constexpr):
    f = tl.zeros((1,), dtype=tl.int64) + first
    eps = _philox_eps(seed, f, ALIGNED4, BLOCK_D)  # (1, BLOCK_D)
    tl.store(out_ptr + tl.arange(0, BLOCK_D)[None, :], eps)


@pytest.mark.parametrize("aligned4,first", [(True, 2**34 + 8), (True, 2**33 - 8), (False, 2**34 + 5),
                                            (False, 2**31 - 3), (True, 0), (False, 7)])
def test_philox_eps_large_counters(aligned4, first):
    """Counters beyond 2^31 / 2^32 (huge tensors) take the int64 path: (lo, hi) words of the counter."""
    seed, block_d = 987654321987, 16
    out = torch.empty(block_d)
    _eps_probe_kernel[(1,)](out, seed, first, ALIGNED4=aligned4, BLOCK_D=block_d)
    torch.testing.assert_close(out, oracle_eps(seed, first, block_d), atol=1e-5, rtol=1e-5)


def test_interleave_order_is_n1_n2_n3_n4():
    """Group g of 4 elements = (n1, n2, n3, n4) of counter g, explicitly."""
    seed = 77
    z, _ = K.reparam_kl_forward(torch.zeros(2, 8), torch.zeros(2, 8), None, None, None, None, seed, 2)
    u = [_uniform(x) for x in philox4x32_10(seed, torch.arange(4))]
    n1, n2 = _box_muller(u[0], u[1])
    n3, n4 = _box_muller(u[2], u[3])
    for g in range(4):
        torch.testing.assert_close(z.reshape(-1)[4 * g:4 * g + 4],
                                   torch.stack([n1[g], n2[g], n3[g], n4[g]]), atol=1e-5, rtol=1e-5)


# ---- values and every gradient vs the reference, given eps ----

@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("prior", [None, "full", "broadcast"])
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_given_eps_matches_reference(shape, prior, mask_kind, reduction):
    gen = torch.Generator().manual_seed(zlib.crc32(repr((shape, prior, mask_kind, reduction)).encode()))
    inputs = make_inputs(shape, torch.float32, gen, prior=prior, mask_kind=mask_kind)
    mu, logvar, eps, pm, plv, mask = inputs
    kw = dict(eps=eps, prior_mu=pm, prior_logvar=plv, mask=mask, reduction=reduction)
    leaves = [mu, logvar, eps, pm, plv]

    with triton_ran(2):
        z, kl = robustmm_fast.reparameterize_kl(mu, logvar, **kw)
        gz = torch.randn(z.shape, generator=gen)
        gk = torch.randn(kl.shape, generator=gen)
        got = grads_of((z, kl), (gz, gk), leaves)
    z_ref, kl_ref = ref_reparameterize_kl(mu, logvar, **kw)
    want = grads_of((z_ref, kl_ref), (gz, gk), leaves)

    assert_close(z, z_ref, 1e-5, 1e-5, "z")
    assert_close(kl, kl_ref, 1e-5, 1e-5, "kl")
    for name, g, w in zip(["mu", "logvar", "eps", "prior_mu", "prior_logvar"], got, want):
        if w is None:
            continue
        assert g is not None, f"no gradient for {name}"
        assert_close(g, w, 1e-5, 1e-5, f"d{name}")
        assert torch.isfinite(g).all(), f"d{name} not finite"
    assert torch.isfinite(z).all() and torch.isfinite(kl).all()
    if mask is not None:
        bad = ~mask
        assert (z[bad] == 0).all()
        if reduction == "none":
            assert (kl[bad] == 0).all()
        for g in got[:3] + (got[3:] if prior == "full" else []):
            assert (g[bad] == 0).all()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mask_kind", ["none", "some"])
def test_no_sample_matches_reference(shape, mask_kind):
    gen = torch.Generator().manual_seed(5)
    mu, logvar, _, pm, plv, mask = make_inputs(shape, torch.float32, gen, prior="full", mask_kind=mask_kind)
    kw = dict(prior_mu=pm, prior_logvar=plv, mask=mask, sample=False)
    with triton_ran(2):
        z, kl = robustmm_fast.reparameterize_kl(mu, logvar, **kw)
        gz, gk = torch.randn(z.shape, generator=gen), torch.randn(kl.shape, generator=gen)
        got = grads_of((z, kl), (gz, gk), [mu, logvar, pm, plv])
    z_ref, kl_ref = ref_reparameterize_kl(mu, logvar, **kw)
    want = grads_of((z_ref, kl_ref), (gz, gk), [mu, logvar, pm, plv])
    assert_close(z, z_ref, 1e-6, 1e-6, "z")
    assert_close(kl, kl_ref, 1e-5, 1e-5, "kl")
    for name, g, w in zip(["mu", "logvar", "prior_mu", "prior_logvar"], got, want):
        assert_close(g, w, 1e-5, 1e-5, f"d{name}")


# ---- in-kernel eps: forward and backward consistent with the eps used ----

@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("prior", [None, "full"])
@pytest.mark.parametrize("mask_kind", ["none", "some"])
def test_philox_noise_forward_backward(shape, prior, mask_kind):
    gen = torch.Generator().manual_seed(11)
    mu, logvar, _, pm, plv, mask = make_inputs(shape, torch.float32, gen, prior=prior, mask_kind=mask_kind)
    leaves = [mu, logvar, pm, plv]
    kw = dict(prior_mu=pm, prior_logvar=plv, mask=mask)
    seed = seed_from_manual_seed(1234)
    torch.manual_seed(1234)
    with triton_ran(2):
        z, kl = robustmm_fast.reparameterize_kl(mu, logvar, **kw)
        gz, gk = torch.randn(z.shape, generator=gen), torch.randn(kl.shape, generator=gen)
        got = grads_of((z, kl), (gz, gk), leaves)
    eps = philox_randn(seed, shape)
    z_ref, kl_ref = ref_reparameterize_kl(mu, logvar, eps=eps, **kw)
    want = grads_of((z_ref, kl_ref), (gz, gk), leaves)
    assert_close(z, z_ref, 2e-5, 2e-5, "z")
    assert_close(kl, kl_ref, 1e-5, 1e-5, "kl")
    for name, g, w in zip(["mu", "logvar", "prior_mu", "prior_logvar"], got, want):
        if w is not None:
            assert_close(g, w, 2e-5, 2e-5, f"d{name}")


@pytest.mark.parametrize("shape", [(3, 5, 8), (2, 7, 13)])
@pytest.mark.parametrize("other", ["cpp", "reference"])
def test_philox_noise_same_as_other_backends(shape, other):
    """One torch.manual_seed gives the same eps (so z and every gradient) on every backend."""
    if other == "cpp":
        require_cpp()  # skips, or fails under ROBUSTMM_REQUIRE_EXT=1 (CI)
    gen = torch.Generator().manual_seed(3)
    mu, logvar, _, pm, plv, mask = make_inputs(shape, torch.float32, gen, prior="full", mask_kind="some")
    leaves = [mu, logvar, pm, plv]
    kw = dict(prior_mu=pm, prior_logvar=plv, mask=mask, reduction="mean")
    gz = torch.randn(shape, generator=gen)
    gk = torch.randn((), generator=gen)
    torch.manual_seed(99)
    with triton_ran(2):
        z, kl = robustmm_fast.reparameterize_kl(mu, logvar, **kw)
        got = grads_of((z, kl), (gz, gk), leaves)
    torch.manual_seed(99)
    with robustmm_fast.use_backend(other):
        z_o, kl_o = robustmm_fast.reparameterize_kl(mu, logvar, **kw)
        want = grads_of((z_o, kl_o), (gz, gk), leaves)
    assert robustmm_fast.last_backend(OP) == other
    assert_close(z, z_o, 2e-5, 2e-5, "z")
    assert_close(kl, kl_o, 1e-5, 1e-5, "kl")
    for name, g, w in zip(["mu", "logvar", "prior_mu", "prior_logvar"], got, want):
        assert_close(g, w, 2e-5, 2e-5, f"d{name}")
    # a different seed gives different noise
    torch.manual_seed(100)
    with triton_ran(1):
        z2, _ = robustmm_fast.reparameterize_kl(mu.detach(), logvar.detach(), **kw)
    assert not torch.equal(z2[mask], z.detach()[mask])


# ---- low precision: error at most 2x the reference's own ----

def _lowp_errors(shape, dtype, noise):
    gen = torch.Generator().manual_seed(21)
    ins = make_inputs(shape, dtype, gen, prior="full", mask_kind="some")
    mu, logvar, eps, pm, plv, mask = ins
    leaves = [mu, logvar, eps, pm, plv]
    kw = dict(prior_mu=pm, prior_logvar=plv, mask=mask, reduction="none")
    if noise == "given":
        kw["eps"] = eps
    else:
        leaves[2] = None
        kw["eps"] = None
    seed = seed_from_manual_seed(7)
    torch.manual_seed(7)
    with triton_ran(2):
        z, kl = robustmm_fast.reparameterize_kl(mu, logvar, **kw)
        gz = torch.randn(z.shape, generator=gen).to(dtype)
        gk = torch.randn(kl.shape, generator=gen).to(dtype)
        got = [z, kl] + grads_of((z, kl), (gz, gk), leaves)
    if noise != "given":
        kw["eps"] = philox_randn(seed, shape).to(dtype)
    z16, kl16 = ref_reparameterize_kl(mu, logvar, **kw)
    low = [z16, kl16] + grads_of((z16, kl16), (gz, gk), leaves)
    hi = [None if t is None else t.detach().double().requires_grad_(True) for t in leaves]
    kw64 = dict(kw, prior_mu=hi[3], prior_logvar=hi[4],
                eps=hi[2] if noise == "given" else kw["eps"].double())
    z64, kl64 = ref_reparameterize_kl(hi[0], hi[1], **kw64)
    truth = [z64, kl64] + grads_of((z64, kl64), (gz.double(), gk.double()), hi)
    return got, low, truth


@pytest.mark.parametrize("shape", [(3, 5, 8), (2, 7, 13)])
@pytest.mark.parametrize("noise", ["given", "philox"])
def test_float16_within_twice_reference_error(shape, noise):
    got, low, truth = _lowp_errors(shape, torch.float16, noise)
    names = ["z", "kl", "dmu", "dlogvar", "deps", "dprior_mu", "dprior_logvar"]
    for name, g, l, t in zip(names, got, low, truth):
        if t is None:
            continue
        assert g.dtype == torch.float16, name
        assert_close_dtype(g.detach(), t.detach(), name, lowp_ref=l.detach())


def test_float64_matches_reference():
    gen = torch.Generator().manual_seed(8)
    mu, logvar, eps, pm, plv, mask = make_inputs((2, 7, 13), torch.float64, gen, prior="full",
                                                 mask_kind="some")
    leaves = [mu, logvar, eps, pm, plv]
    kw = dict(eps=eps, prior_mu=pm, prior_logvar=plv, mask=mask)
    with triton_ran(2):
        z, kl = robustmm_fast.reparameterize_kl(mu, logvar, **kw)
        gz, gk = torch.randn(z.shape, generator=gen, dtype=torch.float64), torch.randn(kl.shape, generator=gen, dtype=torch.float64)
        got = grads_of((z, kl), (gz, gk), leaves)
    z_ref, kl_ref = ref_reparameterize_kl(mu, logvar, **kw)
    want = grads_of((z_ref, kl_ref), (gz, gk), leaves)
    assert_close(z, z_ref, 1e-12, 1e-12, "z")
    assert_close(kl, kl_ref, 1e-12, 1e-12, "kl")
    for g, w in zip(got, want):
        assert_close(g, w, 1e-12, 1e-12, "grad")
    # the kernel's per-row KL is float64 for float64 inputs
    _, kl_rows = K.reparam_kl_forward(mu.detach(), logvar.detach(), None, None, None, None, 0, 0)
    assert kl_rows.dtype == torch.float64


# ---- the kernel interface itself ----

def test_kernel_interface_optional_grads_and_strides():
    gen = torch.Generator().manual_seed(4)
    shape = (3, 5, 8)
    mu, lv, eps, pm, plv = (torch.randn(shape, generator=gen) for _ in range(5))
    mask = torch.tensor([[True, False, True, True, False]] * 3)
    z, kl = K.reparam_kl_forward(mu, lv, eps, pm, plv, mask, 0, 1)
    assert z.dtype == mu.dtype and kl.dtype == torch.float32 and kl.shape == (3, 5)
    grad_z = torch.ones(()).expand(shape)  # autograd's stride-0 gradient of a sum
    grad_kl = torch.randn(3, 5, generator=gen)
    full = K.reparam_kl_backward(grad_z, grad_kl, mu, lv, eps, pm, plv, mask, 0, 1, True, True)
    assert all(g is not None and g.shape == shape for g in full)
    part = K.reparam_kl_backward(grad_z, grad_kl, mu, lv, eps, pm, plv, mask, 0, 1, False, False)
    assert part[2] is None and part[3] is None and part[4] is None
    torch.testing.assert_close(part[0], full[0], atol=0, rtol=0)
    torch.testing.assert_close(part[1], full[1], atol=0, rtol=0)
    want = robustmm_fast.reference.reparam_kl.reparam_kl_rows_backward(
        grad_z, grad_kl, mu, lv, eps, pm, plv, mask, True, True, True)
    for g, w in zip(full, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    # no eps tensor: no deps, even when asked for
    none_eps = K.reparam_kl_backward(grad_z, grad_kl, mu, lv, None, None, None, None, 5, 2, True, True)
    assert none_eps[2] is None and none_eps[3] is None and none_eps[4] is None
    # non-contiguous inputs are handled
    mu_t = torch.randn(8, 3, generator=gen).t()
    lv_t = torch.randn(8, 3, generator=gen).t()
    z_t, kl_t = K.reparam_kl_forward(mu_t, lv_t, None, None, None, None, 0, 0)
    z_c, kl_c = K.reparam_kl_forward(mu_t.contiguous(), lv_t.contiguous(), None, None, None, None, 0, 0)
    torch.testing.assert_close(z_t, z_c, atol=0, rtol=0)
    torch.testing.assert_close(kl_t, kl_c, atol=0, rtol=0)


def test_kernel_argument_errors():
    mu = torch.zeros(2, 4)
    with pytest.raises(ValueError, match="eps"):
        K.reparam_kl_forward(mu, mu, None, None, None, None, 0, 1)
    with pytest.raises(ValueError, match="eps"):
        K.reparam_kl_forward(mu, mu, mu, None, None, None, 0, 2)
    with pytest.raises(ValueError, match="noise"):
        K.reparam_kl_forward(mu, mu, None, None, None, None, 0, 3)
    with pytest.raises(ValueError, match="prior"):
        K.reparam_kl_forward(mu, mu, None, mu, None, None, 0, 0)
    with pytest.raises(TypeError, match="int64"):
        K.reparam_kl_forward(mu.long(), mu.long(), None, None, None, None, 0, 0)
    with pytest.raises(TypeError, match="dtype"):
        K.reparam_kl_forward(mu, mu.double(), None, None, None, None, 0, 0)
    with pytest.raises(TypeError, match="bool"):
        K.reparam_kl_forward(mu, mu, None, None, None, torch.ones(2), 0, 0)


@pytest.mark.parametrize("shape", [(0, 8), (0, 3, 13), (3, 0)])
def test_empty(shape):
    mu = torch.zeros(shape, requires_grad=True)
    logvar = torch.zeros(shape, requires_grad=True)
    with triton_ran(2):
        z, kl = robustmm_fast.reparameterize_kl(mu, logvar)
        (z.sum() + kl.sum()).backward()
    assert z.shape == shape and kl.shape == shape[:-1]
    assert (kl == 0).all()
    assert mu.grad.shape == shape and logvar.grad.shape == shape


def test_one_dim_input_and_scalar_mask():
    gen = torch.Generator().manual_seed(6)
    mu = torch.randn(6, generator=gen, requires_grad=True)
    logvar = torch.randn(6, generator=gen, requires_grad=True)
    eps = torch.randn(6, generator=gen)
    for mask in (None, torch.tensor(True), torch.tensor(False)):
        with triton_ran(2):
            z, kl = robustmm_fast.reparameterize_kl(mu, logvar, eps=eps, mask=mask)
            got = torch.autograd.grad((z, kl), (mu, logvar), (torch.ones(6), torch.ones(())))
        z_ref, kl_ref = ref_reparameterize_kl(mu, logvar, eps=eps, mask=mask)
        want = torch.autograd.grad((z_ref, kl_ref), (mu, logvar), (torch.ones(6), torch.ones(())))
        assert kl.shape == ()
        assert_close(z, z_ref, 1e-5, 1e-5, "z")
        assert_close(kl, kl_ref, 1e-5, 1e-5, "kl")
        for g, w in zip(got, want):
            assert_close(g, w, 1e-5, 1e-5, "grad")


@pytest.mark.parametrize("force_index64", [False, True])
@pytest.mark.parametrize("shape", [(3, 5, 12), (2, 7, 13)])
def test_many_programs_and_chunks(monkeypatch, shape, force_index64):
    """Tiny tiles: several programs per launch, several D chunks per row, partial tiles; the
    int64-offset variant gives the same numbers."""
    monkeypatch.setattr(K, "_MAX_BLOCK_D", 8)
    monkeypatch.setattr(K, "_FWD_TILE", 16)
    monkeypatch.setattr(K, "_BWD_TILE", 16)
    if force_index64:
        monkeypatch.setattr(K, "_INDEX64_LIMIT", 0)
    grid, block_rows, block_d, _, index64, _ = K._launch_config(shape[0] * shape[1], shape[-1], 16, 1)
    assert grid[0] > 1 and block_d < shape[-1] and index64 == force_index64
    gen = torch.Generator().manual_seed(31)
    mu, logvar, eps, pm, plv, mask = make_inputs(shape, torch.float32, gen, prior="full", mask_kind="some")
    leaves = [mu, logvar, eps, pm, plv]
    kw = dict(eps=eps, prior_mu=pm, prior_logvar=plv, mask=mask)
    with triton_ran(2):
        z, kl = robustmm_fast.reparameterize_kl(mu, logvar, **kw)
        gz, gk = torch.randn(z.shape, generator=gen), torch.randn(kl.shape, generator=gen)
        got = grads_of((z, kl), (gz, gk), leaves)
    z_ref, kl_ref = ref_reparameterize_kl(mu, logvar, **kw)
    want = grads_of((z_ref, kl_ref), (gz, gk), leaves)
    assert_close(z, z_ref, 1e-5, 1e-5, "z")
    assert_close(kl, kl_ref, 1e-5, 1e-5, "kl")
    for g, w in zip(got, want):
        assert_close(g, w, 1e-5, 1e-5, "grad")
    # in-kernel eps across chunk boundaries and programs
    seed = 2**45 + 17
    z2, _ = K.reparam_kl_forward(torch.zeros(shape), torch.zeros(shape), None, None, None, None, seed, 2)
    torch.testing.assert_close(z2, philox_randn(seed, shape), atol=1e-5, rtol=1e-5)
    grads = K.reparam_kl_backward(torch.ones(shape), torch.zeros(shape[:-1]), torch.zeros(shape),
                                  torch.zeros(shape), None, None, None, None, seed, 2, False, False)
    # dlogvar = gz * eps * sigma / 2 with sigma = 1: the regenerated eps, halved
    torch.testing.assert_close(grads[1], 0.5 * philox_randn(seed, shape), atol=1e-5, rtol=1e-5)
