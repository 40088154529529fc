"""Benchmark cases of reparameterize_kl: this package's backends against the eager reference,
torch.compile(reference) and torch.distributions (Normal.rsample + kl_divergence), forward and
forward+backward, with eps drawn inside (how models use it) and with eps given; effective
bandwidth at the bytes a fused kernel must move (bytes_moved)."""
from __future__ import annotations

import torch

from ..ops.reparam_kl import reparameterize_kl
from ..reference.reparam_kl import reparameterize_kl as reference
from .runner import Case, Impl, compiled, on_backend

SHAPES = ((64, 50, 128), (256, 50, 1024), (4096, 256))
EPS_MODES = ("in-kernel", "given")
REDUCTION = "mean"


def bytes_moved(shape, dtype: torch.dtype, eps_given: bool) -> tuple[int, int]:
    """(forward, forward + backward) bytes a fused implementation reads and writes, no mask or
    prior (as in these cases). Forward reads mu, logvar (+ eps) and writes z and the per-row KL
    (float32; float64 for float64); backward reads grad_z, mu, logvar (+ eps) and grad_kl's rows
    and writes dmu, dlogvar. In-kernel eps is regenerated, never read."""
    n = 1
    for s in shape:
        n *= int(s)
    rows = n // int(shape[-1]) if shape and int(shape[-1]) else 0
    elem = torch.empty((), dtype=dtype).element_size()
    acc = 8 if dtype == torch.float64 else 4
    given = 1 if eps_given else 0
    fwd = (2 + given) * n * elem + n * elem + rows * acc
    bwd = (3 + given) * n * elem + rows * acc + 2 * n * elem
    return fwd, fwd + bwd


def cases(shapes=SHAPES, eps_modes=EPS_MODES, dtype=torch.float32) -> list[Case]:
    out = []
    for s in shapes:
        for m in eps_modes:
            fwd, fwd_bwd = bytes_moved(s, dtype, m == "given")
            out.append(Case(f"{'x'.join(map(str, s))} {str(dtype).split('.')[-1]} eps={m}",
                            {"shape": s, "eps": m, "dtype": dtype}, bytes_fwd=fwd, bytes_fwd_bwd=fwd_bwd))
    return out


def _inputs(case: Case, device):
    gen = torch.Generator(device="cpu").manual_seed(0)
    shape, dtype = case.params["shape"], case.params["dtype"]
    mu = torch.randn(shape, generator=gen).to(device, dtype).requires_grad_()
    logvar = (0.5 * torch.randn(shape, generator=gen)).to(device, dtype).requires_grad_()
    eps = torch.randn(shape, generator=gen).to(device, dtype) if case.params["eps"] == "given" else None
    grad_z = torch.randn(shape, generator=gen).to(device, dtype)
    return mu, logvar, eps, grad_z


def _closures(fn, case, device):
    mu, logvar, eps, grad_z = _inputs(case, device)
    one = torch.ones((), device=device, dtype=mu.dtype)

    def forward():
        with torch.no_grad():
            return fn(mu, logvar, eps=eps, reduction=REDUCTION)

    def forward_backward():
        z, kl = fn(mu, logvar, eps=eps, reduction=REDUCTION)
        torch.autograd.backward((z, kl), (grad_z, one))
        mu.grad = logvar.grad = None  # as optimizer.zero_grad(set_to_none=True)

    return forward, forward_backward


def _ours(backend: str):
    def make(case, device):
        fn = on_backend(reparameterize_kl, "reparam_kl", backend, device)
        return None if fn is None else _closures(fn, case, device)
    return make


def _compiled(case, device):
    return _closures(compiled(reference), case, device)


def _distributions(mu, logvar, *, eps=None, reduction=REDUCTION):
    posterior = torch.distributions.Normal(mu, torch.exp(0.5 * logvar))
    prior = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))
    z = posterior.rsample()
    return z, torch.distributions.kl_divergence(posterior, prior).sum(-1).mean()


def implementations(device: torch.device) -> tuple[list[Impl], str, tuple[str, ...]]:
    """(impls, name of ours, baselines for the ratio columns)."""
    ours = ["cpp"] if device.type == "cpu" else ["cuda", "triton"]
    impls = [Impl(f"robustmm[{b}]", lambda c, b=b: _ours(b)(c, device)) for b in ours]
    impls += [
        Impl("eager reference", lambda c: _closures(reference, c, device)),
        Impl("compile(reference)", lambda c: _compiled(c, device)),
        Impl("torch.distributions",
             lambda c: _closures(_distributions, c, device) if c.params["eps"] == "in-kernel" else None),
    ]
    return impls, f"robustmm[{ours[0]}]", ("eager reference", "compile(reference)", "torch.distributions")
