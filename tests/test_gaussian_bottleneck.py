"""robustmm_fast.nn.GaussianBottleneck: heads + fused reparameterize_kl."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from robustmm_fast import reference as ref
from robustmm_fast.nn import GaussianBottleneck

from conftest import run_on

IN, LATENT, HIDDEN = 10, 6, 12
INPUT_SHAPES = ((5, IN), (3, 4, IN))
HEADS = ({}, {"hidden_dim": HIDDEN}, {"batch_norm": True}, {"hidden_dim": HIDDEN, "batch_norm": True})
HEAD_IDS = ("linear", "hidden", "linear-bn", "hidden-bn")


def _layer(seed=0, **kw) -> GaussianBottleneck:
    torch.manual_seed(seed)
    return GaussianBottleneck(IN, LATENT, **kw).double()


def _x(shape, seed=1, **kw):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64, **kw)


def _mask(shape):
    lead = shape[:-1]
    m = torch.rand(lead, generator=torch.Generator().manual_seed(2)) < 0.6
    m.view(-1)[0], m.view(-1)[-1] = True, False
    return m


def _manual(layer: GaussianBottleneck, x, mask, eps, sample):
    """The layer by hand: its heads (with their weights), then the reference op. Excluded rows
    are zeroed first, and in training batch norm takes its statistics over included rows only."""
    if mask is not None:
        x = torch.where(mask.unsqueeze(-1), x, 0)

    def head(h, norm, t):
        if isinstance(h, torch.nn.Linear):
            out = F.linear(t, h.weight, h.bias)
        else:
            out = F.linear(F.relu(F.linear(t, h[0].weight, h[0].bias)), h[2].weight, h[2].bias)
        if norm is not None:
            flat = out.reshape(-1, out.shape[-1])
            stats = (norm.running_mean.clone(), norm.running_var.clone(), norm.weight, norm.bias)
            if mask is not None and layer.training:
                keep = mask.reshape(-1)
                kept = F.batch_norm(flat[keep], *stats, training=True, momentum=0.0, eps=norm.eps)
                flat = torch.zeros_like(flat).index_put((keep,), kept)
            else:
                flat = F.batch_norm(flat, *stats, training=layer.training, momentum=0.0, eps=norm.eps)
            out = flat.reshape(out.shape)
        return out

    mu = head(layer.mu, layer.mu_norm, x)
    lv = head(layer.logvar, layer.logvar_norm, x)
    if layer.logvar_clamp is not None:
        lv = lv.clamp(*layer.logvar_clamp)
    return ref.reparameterize_kl(mu, lv, eps=eps if sample else None, mask=mask, sample=sample,
                                 reduction=layer.reduction)


@pytest.mark.parametrize("reduction", ("none", "mean"))
@pytest.mark.parametrize("use_mask", (False, True), ids=("nomask", "mask"))
@pytest.mark.parametrize("head", HEADS, ids=HEAD_IDS)
@pytest.mark.parametrize("shape", INPUT_SHAPES, ids=str)
def test_matches_manual_composition(backend, shape, head, use_mask, reduction):
    """Values and gradients (input and every parameter) equal a hand-built composition with the
    same weights and the reference op, for a given eps, in train mode."""
    layer = _layer(reduction=reduction, logvar_clamp=(-4.0, 3.0), **head).train()
    manual = copy.deepcopy(layer)
    x = _x(shape, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    mask = _mask(shape) if use_mask else None
    eps = _x(shape[:-1] + (LATENT,), seed=3)
    with run_on(backend):
        z, kl = layer(x, mask, eps=eps)
    zr, klr = _manual(manual, x2, mask, eps, sample=True)
    torch.testing.assert_close(z, zr)
    torch.testing.assert_close(kl, klr)
    gen = torch.Generator().manual_seed(4)
    gz = torch.randn(z.shape, generator=gen, dtype=z.dtype)
    gk = torch.randn(kl.shape, generator=gen, dtype=kl.dtype)
    with run_on(backend):
        torch.autograd.backward([z, kl], [gz, gk])
    torch.autograd.backward([zr, klr], [gz, gk])
    torch.testing.assert_close(x.grad, x2.grad)
    for (name, p), (_, q) in zip(layer.named_parameters(), manual.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=lambda m: f"grad of {name}: {m}")
    if head.get("batch_norm"):
        assert layer.mu_norm.num_batches_tracked.item() == 1


@pytest.mark.parametrize("shape", INPUT_SHAPES, ids=str)
@pytest.mark.parametrize("head", HEADS, ids=HEAD_IDS)
def test_eval_gives_mean(backend, shape, head):
    layer = _layer(**head)
    layer.train()
    layer(_x(shape))  # update the batch-norm statistics once
    layer.eval()
    x = _x(shape, seed=5)
    with run_on(backend):
        z, kl, mu, _ = layer(x, return_moments=True)
    assert torch.equal(z, mu)
    zr, klr = _manual(layer, x, None, None, sample=False)
    torch.testing.assert_close(z, zr)
    torch.testing.assert_close(kl, klr)
    with run_on(backend):  # eval is deterministic
        z2, _ = layer(x)
    assert torch.equal(z, z2)


def test_eval_sampling_options(backend):
    x = _x((6, IN))
    layer = _layer().eval()
    with run_on(backend):
        z_mean, _, mu, _ = layer(x, return_moments=True)
        z_forced, _ = layer(x, sample=True)
    assert torch.equal(z_mean, mu)
    assert not torch.equal(z_forced, mu)
    sampling = _layer(sample_in_eval=True).eval()
    with run_on(backend):
        torch.manual_seed(0)
        z1, _, mu, _ = sampling(x, return_moments=True)
        z2, _ = sampling(x)
        z_off, _ = sampling(x, sample=False)
    assert not torch.equal(z1, mu) and not torch.equal(z1, z2)
    assert torch.equal(z_off, mu)


def test_train_samples(backend):
    x = _x((3, 4, IN))
    layer = _layer().train()
    with run_on(backend):
        torch.manual_seed(1)
        z1, kl1, mu, logvar = layer(x, return_moments=True)
        z2, kl2 = layer(x)
        torch.manual_seed(1)
        z3, _ = layer(x)
        z_mean, _ = layer(x, sample=False)
    assert not torch.equal(z1, z2), "train mode must draw new noise each call"
    assert torch.equal(z1, z3), "torch.manual_seed must reproduce the draw"
    assert torch.equal(kl1, kl2)
    assert torch.equal(z_mean, mu)
    sigma = torch.exp(0.5 * logvar)
    eps = (z1 - mu) / sigma
    assert eps.abs().max() < 7 and 0.5 < eps.std() < 1.5


@pytest.mark.parametrize("reduction", ("none", "sum", "mean", "batchmean"))
def test_kl_reduction_and_mask(backend, reduction):
    shape = (4, 5, IN)
    x = _x(shape)
    mask = _mask(shape)
    per_row = _layer(reduction="none").eval()
    reduced = _layer(reduction=reduction).eval()
    with run_on(backend):
        z, kl_rows = per_row(x, mask)
        _, kl = reduced(x, mask)
    assert z.shape == (4, 5, LATENT)
    assert kl_rows.shape == (4, 5)
    assert not z[~mask].any() and not kl_rows[~mask].any()
    want = {"none": kl_rows, "sum": kl_rows.sum(), "mean": kl_rows.sum() / mask.sum(),
            "batchmean": kl_rows.sum() / shape[0]}[reduction]
    torch.testing.assert_close(kl, want)


def test_logvar_clamp(backend):
    layer = _layer(logvar_clamp=(-0.1, 0.1))
    with torch.no_grad():
        layer.logvar.weight.mul_(100)
    x = _x((8, IN))
    with run_on(backend):
        _, _, _, logvar = layer(x, return_moments=True)
    assert logvar.min() >= -0.1 and logvar.max() <= 0.1
    mu2, logvar2 = layer.moments(x)
    assert torch.equal(logvar2, logvar)


def test_nan_in_excluded_rows_output(backend):
    """NaN in an excluded row of x does not reach z or kl (heads without batch norm)."""
    shape = (5, IN)
    mask = torch.tensor([True, False, True, True, False])
    x = _x(shape)
    x[~mask] = float("nan")
    layer = _layer()
    with run_on(backend):
        z, kl = layer(x, mask)
    assert torch.isfinite(z).all() and torch.isfinite(kl).all()


@pytest.mark.parametrize("head", HEADS, ids=HEAD_IDS)
def test_nan_in_excluded_rows_no_leak_into_parameters(head):
    """Excluded rows are zeroed before the heads and batch-norm statistics use included rows."""
    shape = (5, IN)
    mask = torch.tensor([True, False, True, True, False])
    x = _x(shape)
    x[~mask] = float("nan")
    layer = _layer(**head).train()
    z, kl = layer(x, mask)
    (z.sum() + kl.sum()).backward()
    assert torch.isfinite(z).all() and torch.isfinite(kl).all()
    for name, p in layer.named_parameters():
        assert torch.isfinite(p.grad).all(), f"NaN reached the gradient of {name}"
    for name, b in layer.named_buffers():
        assert torch.isfinite(b.float()).all(), f"NaN reached the buffer {name}"


@pytest.mark.parametrize("compiler", ("eager", "aot_eager"))
@pytest.mark.parametrize("head", ({}, {"hidden_dim": HIDDEN, "batch_norm": True}), ids=("linear", "hidden-bn"))
@pytest.mark.parametrize("backend", ("reference", "cpp"), indirect=True)
def test_compile_fullgraph(backend, head, compiler):
    torch._dynamo.reset()
    layer = _layer(reduction="mean", **head).float().train()
    compiled_layer = copy.deepcopy(layer)
    compiled = torch.compile(compiled_layer, backend=compiler, fullgraph=True)
    x = _x((3, 4, IN)).float()
    mask = _mask(x.shape)
    eps = _x((3, 4, LATENT), seed=3).float()
    results = []
    for module in (layer, compiled):
        xi = x.clone().requires_grad_()
        with run_on(backend):
            z, kl = module(xi, mask, eps=eps)
            (z.square().sum() + kl).backward()
        results.append((z, kl, xi.grad))
    for a, b in zip(results[0], results[1]):
        torch.testing.assert_close(b, a)
    for (name, p), (_, q) in zip(layer.named_parameters(), compiled_layer.named_parameters()):
        torch.testing.assert_close(q.grad, p.grad, msg=lambda m: f"grad of {name}: {m}")
    # in-kernel eps inside the compiled graph: same seed, same draw as eager
    with run_on(backend):
        torch.manual_seed(8)
        z_e, _ = layer(x, mask)
        torch.manual_seed(8)
        z_c, _ = compiled(x, mask)
    torch.testing.assert_close(z_c, z_e)


@pytest.mark.parametrize("kwargs,match", [
    (dict(in_dim=0, latent_dim=4), "in_dim"),
    (dict(in_dim=-3, latent_dim=4), "in_dim"),
    (dict(in_dim=2.5, latent_dim=4), "in_dim"),
    (dict(in_dim=4, latent_dim=0), "latent_dim"),
    (dict(in_dim=4, latent_dim="8"), "latent_dim"),
    (dict(in_dim=4, latent_dim=4, hidden_dim=0), "hidden_dim"),
    (dict(in_dim=4, latent_dim=4, reduction="avg"), "reduction"),
    (dict(in_dim=4, latent_dim=4, logvar_clamp=(1.0, -1.0)), "logvar_clamp"),
    (dict(in_dim=4, latent_dim=4, logvar_clamp=(1.0,)), "logvar_clamp"),
])
def test_bad_constructor_args(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GaussianBottleneck(**kwargs)


def test_bad_forward_input():
    layer = _layer()
    with pytest.raises(ValueError, match="in_dim"):
        layer(torch.randn(3, IN + 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="mask"):
        layer(torch.randn(3, IN, dtype=torch.float64), torch.ones(4, dtype=torch.bool))
    with pytest.raises(TypeError, match="mask"):
        layer(torch.randn(3, IN, dtype=torch.float64), torch.ones(3, dtype=torch.float64))


@pytest.mark.parametrize("head", HEADS, ids=HEAD_IDS)
def test_state_dict_round_trip(head):
    layer = _layer(seed=0, **head).train()
    layer(_x((6, IN)))  # non-trivial batch-norm buffers
    state = layer.state_dict()
    clone = _layer(seed=1, **head)
    assert state.keys() == clone.state_dict().keys()
    clone.load_state_dict(state)
    for (k, a), b in zip(state.items(), clone.state_dict().values()):
        assert torch.equal(a, b), k
    layer.eval()
    clone.eval()
    x = _x((4, 3, IN), seed=9)
    za, kla = layer(x)
    zb, klb = clone(x)
    assert torch.equal(za, zb) and torch.equal(kla, klb)


def test_extra_repr():
    text = repr(GaussianBottleneck(IN, LATENT, hidden_dim=HIDDEN, reduction="mean"))
    assert f"in_dim={IN}" in text and f"latent_dim={LATENT}" in text and "'mean'" in text


def test_joint_head_is_cyin_encoder(backend):
    """joint_head: one Linear-ReLU-Linear(hidden, 2 latent) whose halves are mu and logvar, as
    CyIN's Encoder (Conv1d k1 -> ReLU -> Conv1d k1 to 2 IB_btnk_dim, then chunk(2, dim=1)):
    the KL and the sample equal the hand-written computation, and grads reach both layers."""
    layer = _layer(hidden_dim=HIDDEN, joint_head=True, reduction="none")
    assert not hasattr(layer, "mu") and layer.head[2].out_features == 2 * LATENT
    x = _x((3, 4, IN), requires_grad=True)
    eps = _x((3, 4, LATENT), seed=3)
    with run_on(backend, "reparam_kl"):
        z, kl = layer(x, eps=eps)
        (z.sum() + kl.sum()).backward()
    h = layer.head
    out = F.linear(F.relu(F.linear(x, h[0].weight, h[0].bias)), h[2].weight, h[2].bias)
    mu, logvar = out[..., :LATENT], out[..., LATENT:]
    torch.testing.assert_close(z, mu + eps * torch.exp(logvar / 2))
    torch.testing.assert_close(kl, -0.5 * (1 + logvar - mu ** 2 - logvar.exp()).sum(-1))
    assert h[0].weight.grad.abs().sum() > 0 and h[2].weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="joint_head"):
        GaussianBottleneck(IN, LATENT, joint_head=True)
