"""gpu tier of what every fused op must do on CUDA (issue 14), for each GPU backend by name:

- the backward runs the forward's backend: called after the `use_backend` block under another
  backend (on CUDA autograd runs the backward on its device thread, which never sees the
  ContextVar; `backward_calls` counts what ran);
- bf16 `torch.autocast("cuda")` with float32 auxiliaries, within the low-precision rule;
- tensors on a device that is not the current one (needs two GPUs; skipped with one): the same
  values and gradients as on the current device, and nothing launched on the current device;
- masked attention with B*H = 70000 (past grid axis 1's 65535 limit) at tiny lengths.

    ROBUSTMM_REQUIRE_EXT=1 pytest -m gpu tests/test_ops_devices_gpu.py

A backend that cannot run CUDA tensors here is skipped (failed under ROBUSTMM_REQUIRE_EXT=1);
run_on() fails when the backend named did not run.
"""
from __future__ import annotations

import os

import pytest
import torch

import robustmm_fast
from robustmm_fast import _backend
from robustmm_fast.ops import cycle_reconstruction_loss, masked_cross_attention, reparameterize_kl
from conftest import assert_close_dtype, run_on
from test_ops_dispatch import (_assert_bf16_results, _attn_inputs, _bf16_rule, _cycle_inputs,
                               _reparam_inputs)

pytestmark = pytest.mark.gpu

DEV = torch.device("cuda")
# the GPU backends of each op (masked_attention has no CUDA C++ kernel)
GPU_BACKENDS = {"reparam_kl": ("cuda", "triton"), "cycle_loss": ("cuda", "triton"),
                "masked_attention": ("triton",)}
CASES = [(op, b) for op, backends in GPU_BACKENDS.items() for b in backends]
CASE_IDS = [f"{op}-{b}" for op, b in CASES]


def require(backend: str, op: str, device: torch.device = DEV) -> None:
    why = None if torch.cuda.is_available() else "no CUDA device is visible"
    why = why or _backend._unavailable_reason(backend, device, op)
    if why is not None:
        msg = f"backend {backend!r} cannot run {op} on {device}: {why}"
        if os.environ.get("ROBUSTMM_REQUIRE_EXT", "0") == "1":
            pytest.fail(msg + " (ROBUSTMM_REQUIRE_EXT=1 requires it)", pytrace=False)
        pytest.skip(msg)


def op_call(op: str, device, dtype=torch.float32):
    """(fn(*leaves) -> scalar, leaves) of test_ops_dispatch's call of `op`, on `device`."""
    def leaves(*ts):
        return [t.to(device).requires_grad_() for t in ts]

    if op == "reparam_kl":
        mu, lv, eps, pm, plv, mask = (t.to(device) for t in _reparam_inputs(dtype))
        return (lambda a, b, c, d, e: reparameterize_kl(
            a, b, prior_mu=c, prior_logvar=d, mask=mask, reduction="mean")[1]
            + reparameterize_kl(a, b, eps=e, mask=mask)[0].sum()), leaves(mu, lv, pm, plv, eps)
    if op == "cycle_loss":
        xs, mask = _cycle_inputs(dtype)
        mask = mask.to(device)
        return (lambda a, b, c, d: cycle_reconstruction_loss(a, b, c, d, mask=mask,
                                                              distance="cosine")), leaves(*xs)
    q, k, v, present, lengths = _attn_inputs(dtype)
    present = present.to(device)
    # dropout 0: the same values wherever it runs (the dropout stream has its own tests)
    return (lambda a, b, c: masked_cross_attention(a, b, c, present=present,
                                                   key_lengths=lengths).square().sum()), \
        leaves(q, k, v)


def grads_of(fn, leaves):
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    out = fn(*leaves)
    out.backward()
    return out.detach(), [t.grad for t in leaves]


# ---------------------------------------------------------------- the backward's backend

@pytest.mark.parametrize("op,backend", CASES, ids=CASE_IDS)
def test_backward_outside_use_backend_runs_the_forwards_backend(op, backend):
    require(backend, op)
    fn, leaves = op_call(op, DEV)
    for forward_backend, other in ((backend, "reference"), ("reference", backend)):
        ts = [t.detach().clone().requires_grad_() for t in leaves]
        with run_on(forward_backend, op):
            loss = fn(*ts)
        before = dict(_backend.backward_calls)
        with robustmm_fast.use_backend(other):
            loss.backward()
        torch.cuda.synchronize()
        ran = {b: _backend.backward_calls[(op, b)] - before.get((op, b), 0)
               for b in (forward_backend, other)}
        assert ran[forward_backend] >= 1 and ran[other] == 0, (
            f"{op}: forward on {forward_backend}, backward calls per backend {ran}")


# ---------------------------------------------------------------- autocast

@pytest.mark.parametrize("op,backend", CASES, ids=CASE_IDS)
def test_bf16_autocast_with_fp32_inputs(op, backend):
    require(backend, op)
    fn, leaves = op_call(op, DEV)
    before = _backend.backend_calls[(op, backend)]
    results = _bf16_rule(fn, leaves, backend, "cuda")
    assert _backend.backend_calls[(op, backend)] > before, f"{op} never ran on {backend!r}"
    _assert_bf16_results(op, results)


# ---------------------------------------------------------------- a non-current device

@pytest.mark.parametrize("op,backend", CASES, ids=CASE_IDS)
def test_tensors_on_a_non_current_device(op, backend):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices (tensors on one that is not the current one)")
    other = torch.device("cuda", 1)
    require(backend, op, other)
    fn, leaves = op_call(op, other)
    with torch.cuda.device(0):
        with run_on(backend, op):
            out, grads = grads_of(fn, leaves)
        torch.cuda.synchronize(other)
    with torch.cuda.device(1):  # the same call with its device current
        with robustmm_fast.use_backend(backend):
            want, want_grads = grads_of(fn, leaves)
    assert out.device == other and all(g.device == other for g in grads)
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    # and against the fp64 reference on the CPU
    with robustmm_fast.use_backend("reference"):
        # op_call builds the masks on the CPU from fixed seeds: the same ones on "cpu"
        truth, truth_grads = grads_of(op_call(op, "cpu")[0],
                                      [t.detach().cpu().double() for t in leaves])
    assert_close_dtype(out.cpu(), truth, f"{op} value")
    for i, (g, t) in enumerate(zip(grads, truth_grads)):
        assert_close_dtype(g.cpu(), t, f"{op} grad {i}")


# ---------------------------------------------------------------- grid limits

@pytest.mark.parametrize("B,H", [(70000, 1), (35000, 2)])
def test_attention_batch_heads_past_grid_axis_1_limit(B, H):
    """B*H = 70000 programs on one grid axis: the kernels put B*H on axis 0 (axis 1 stops at
    65535). Every (b, h) gets its own keys; some batch rows have a modality absent."""
    require("triton", "masked_attention")
    gen = torch.Generator(device="cuda").manual_seed(0)
    Lq, lengths, d = 2, (2, 3), 16
    q = torch.randn(B, H, Lq, d, device=DEV, generator=gen)
    k, v = (torch.randn(B, H, sum(lengths), d, device=DEV, generator=gen) for _ in range(2))
    present = torch.rand(B, len(lengths), device=DEV, generator=gen) > 0.3
    upstream = torch.randn(B, H, Lq, d, device=DEV, generator=gen)

    def run(name):
        ts = [t.clone().requires_grad_() for t in (q, k, v)]
        with robustmm_fast.use_backend(name):
            out = masked_cross_attention(*ts, present=present, key_lengths=lengths)
        out.backward(upstream)
        return out.detach(), [t.grad for t in ts]

    with run_on("triton", "masked_attention"):
        out, grads = run("triton")
    want, want_grads = run("reference")
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    for name, g, w in zip("qkv", grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5, msg=lambda m: f"d{name}: {m}")
    # the last (b, h) programs ran: rows past 65535 are not zeros left behind
    tail = out.reshape(B * H, Lq, d)[65535:]
    wanted = want.reshape(B * H, Lq, d)[65535:]
    assert tail.abs().sum() > 0 and torch.equal(tail == 0, wanted == 0)
