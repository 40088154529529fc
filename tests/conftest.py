"""Shared fixtures and helpers of the test suite (DESIGN §7).

- ``run_on(backend, op)``: run a block on a named backend and fail if that backend did not run
  (a silent fall back to the reference is a test failure, not a pass).
- ``backend`` fixture: parametrized over the CPU backends, ``reference``, ``cpp`` (the native ISA
  copy of the C++ kernels) and ``cpp-default`` (the baseline x86-64 copy, forced with
  ``ROBUSTMM_CPU_CAPABILITY=default``); it yields the backend name to pass to ``run_on``.
  ``cpp`` tests skip when the extension is missing, unless ``ROBUSTMM_REQUIRE_EXT=1`` (CI), where a
  missing extension fails them.
- ``assert_close_dtype``: per-dtype tolerances; for float16/bfloat16 the error against an fp64
  ground truth must be at most twice the reference's own low-precision error (flash-attention's rule).
- ``gpu`` marker: skipped without a CUDA device.
- ``one_thread`` fixture: one intra-op thread for the test.
"""
from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path

import pytest

import torch

import robustmm_fast
from robustmm_fast import _backend

# The interpret tier sets TRITON_INTERPRET=1 when imported, which must not leak into the default
# run: collect it only in its own process (`TRITON_INTERPRET=1 pytest -m interpret`).
collect_ignore_glob = [] if os.environ.get("TRITON_INTERPRET") == "1" else ["*_interpret.py"]

LOW_PRECISION = (torch.float16, torch.bfloat16)
CPU_BACKENDS = ("reference", "cpp", "cpp-default")


# ---------------------------------------------------------------- threads

@pytest.fixture
def one_thread():
    """One intra-op thread for the test (files of tiny models use it for all theirs:
    `pytestmark = pytest.mark.usefixtures("one_thread")`). Small models run faster on one
    thread, and on a shared 2-core machine two threads' synchronisation can cost 10-100x."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------- streams

@contextlib.contextmanager
def late_copies_on_side_stream(src):
    """GPU: make a side stream current and yield NaN-filled copies of the tensors `src` that
    it overwrites with their values only after a long sleep, so a kernel launched on any other
    stream reads the NaN placeholders. On exit the current stream waits for the side one."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        leaves = [torch.full_like(t, float("nan")) for t in src]
        torch.cuda._sleep(50_000_000)
        for x, t in zip(leaves, src):
            x.copy_(t)
        yield leaves
    torch.cuda.current_stream().wait_stream(side)


# ---------------------------------------------------------------- backend choice

def forward_backward_on(model, backend: str, ops, forward):
    """Zero `model`'s gradients, run `out = forward()` and `out.loss.backward()` on `backend`,
    and assert every op in `ops` ran there. Returns (out, {parameter name: gradient})."""
    model.zero_grad(set_to_none=True)
    before = {op: _backend.backend_calls[(op, backend)] for op in ops}
    with robustmm_fast.use_backend(backend):
        out = forward()
        out.loss.backward()
    for op, n in before.items():
        assert robustmm_fast.last_backend(op) == backend, op
        assert _backend.backend_calls[(op, backend)] > n, f"{op} never ran on {backend}"
    return out, {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def assert_steps_agree(ref, grads_ref, other, grads_other, **tol):
    """Two (ModelOutput, gradients) results: the same loss terms, outputs and gradients."""
    assert list(other.losses) == list(ref.losses)
    for k in ref.losses:
        torch.testing.assert_close(other.losses[k], ref.losses[k], **tol)
    torch.testing.assert_close(other.output, ref.output, **tol)
    assert grads_ref.keys() == grads_other.keys() and len(grads_ref) > 0
    for k in grads_ref:
        torch.testing.assert_close(grads_other[k], grads_ref[k], **tol,
                                   msg=lambda m, k=k: f"{k}: {m}")


def assert_inert(clean, poisoned):
    """(output, loss, gradients) with hidden values finite vs NaN: finite and bit-identical."""
    (y1, l1, g1), (y2, l2, g2) = clean, poisoned
    assert torch.isfinite(y2).all() and torch.isfinite(l2)
    assert torch.equal(y1, y2) and torch.equal(l1, l2)
    assert g1.keys() == g2.keys() and len(g1) > 0
    for n in g1:
        assert torch.isfinite(g2[n]).all(), n
        assert torch.equal(g1[n], g2[n]), n


def opcheck_kernel_op(op, args) -> None:
    """torch.library.opcheck of one of our forward/backward custom ops, with its tensors
    detached: those ops are the kernels under the one autograd.Function (ops/_autograd.py) and
    have no autograd formula of their own, so opcheck's autograd-registration check does not
    apply to them (the Function's gradients are checked through the public functions)."""
    args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    torch.library.opcheck(op, args)


@contextlib.contextmanager
def run_on(backend: str, op: str = "reparam_kl", backward: bool = False):
    """Run the block with ``robustmm_fast.use_backend(backend)``; afterwards assert that `op`
    ran at least once inside the block and that its last call ran on `backend` (and, with
    `backward`, that its backward kernel ran there too)."""
    before = _backend.backend_calls[(op, backend)]
    before_backward = _backend.backward_calls[(op, backend)]
    with robustmm_fast.use_backend(backend):
        yield
    ran = robustmm_fast.last_backend(op)
    assert ran == backend, f"{op}: backend {backend!r} was requested but {ran!r} ran"
    assert _backend.backend_calls[(op, backend)] > before, (
        f"{op} never ran on backend {backend!r} inside the block")
    if backward:
        assert _backend.backward_calls[(op, backend)] > before_backward, (
            f"{op}'s backward never ran on backend {backend!r} inside the block")


def cpp_reason() -> str | None:
    """None if the C++ extension is importable, else why not."""
    info = robustmm_fast.backends()["cpp"]
    return None if info["available"] else info["reason"]


def require_cpp(op: str | None = None) -> None:
    """Skip (or, with ROBUSTMM_REQUIRE_EXT=1, fail) when the C++ extension is missing, or when
    `op` is given and the built extension predates its CPU kernel (a stale in-place build)."""
    why = cpp_reason()
    if why is None and op is not None and not _backend.kernel_registered(op, "CPU"):
        why = (f"it has no {op} CPU kernel (built before the op existed; "
               "rebuild with `python setup.py build_ext --inplace`)")
    if why is None:
        return
    msg = f"the C++ extension robustmm_fast._C is unavailable: {why}"
    if os.environ.get("ROBUSTMM_REQUIRE_EXT", "0") == "1":
        pytest.fail(msg + " (ROBUSTMM_REQUIRE_EXT=1 requires it)", pytrace=False)
    pytest.skip(msg)


def native_cpu_capability() -> str | None:
    """The ISA copy the C++ kernels should pick on this machine without the override
    ('avx2' or 'default'), or None when it cannot be told from here."""
    import platform
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return "default"
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            return "avx2" if {"avx2", "fma"} <= flags else "default"
    return None


@pytest.fixture
def cpu_isa(monkeypatch):
    """Select the ISA copy of the C++ kernels: call with 'native' or 'default'."""

    def select(which: str) -> str:
        if which == "default":
            monkeypatch.setenv("ROBUSTMM_CPU_CAPABILITY", "default")
            expected = "default"
        else:
            monkeypatch.delenv("ROBUSTMM_CPU_CAPABILITY", raising=False)
            expected = native_cpu_capability()
        got = _backend.cpu_capability()
        if expected is None:
            assert got in ("avx2", "default")
        else:
            assert got == expected, f"cpu_capability() is {got!r}, expected {expected!r}"
        return got

    return select


@pytest.fixture(params=CPU_BACKENDS)
def backend(request, monkeypatch, cpu_isa):
    """A CPU backend name for run_on(); 'cpp-default' runs 'cpp' on its baseline ISA copy."""
    name = request.param
    monkeypatch.delenv("ROBUSTMM_BACKEND", raising=False)
    if name.startswith("cpp"):
        require_cpp()
        cpu_isa("default" if name == "cpp-default" else "native")
        return "cpp"
    return name


@pytest.fixture(autouse=True)
def _clean_backend_env(monkeypatch):
    """A test starts in auto mode with the native ISA unless it says otherwise."""
    monkeypatch.delenv("ROBUSTMM_BACKEND", raising=False)
    monkeypatch.delenv("ROBUSTMM_CPU_CAPABILITY", raising=False)


# ---------------------------------------------------------------- tolerances

def default_tols(dtype: torch.dtype) -> dict:
    if dtype == torch.float64:
        return dict(rtol=1e-10, atol=1e-12)
    if dtype == torch.float32:
        return dict(rtol=1e-5, atol=1e-5)
    raise ValueError(f"no fixed tolerance for {dtype}; use the 2x rule")


def assert_close_dtype(actual: torch.Tensor, truth: torch.Tensor, name: str = "",
                       lowp_ref: torch.Tensor | None = None, factor: float = 2.0,
                       half_ulp_floor: bool = False) -> None:
    """Compare `actual` with the fp64 ground truth `truth`.

    fp64 and fp32: fixed tolerances. fp16/bf16: max |actual - truth| <= factor * max
    |lowp_ref - truth| (+ a tiny floor for an exact reference), where `lowp_ref` is the
    reference implementation run in the same low precision (flash-attention's rule).
    half_ulp_floor: the floor is also half a unit in the last place of max |truth| in that
    dtype -- for values rounded to the low precision only for the comparison (fp32 gradients
    of a composite layer cast to bf16), where rounding alone moves a value by up to half an ulp
    and both max errors are quantised at that step.
    """
    assert actual.shape == truth.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(truth.shape)}"
    if actual.dtype in LOW_PRECISION:
        assert lowp_ref is not None, f"{name}: low precision needs the reference's own result"
        assert lowp_ref.dtype == actual.dtype
        truth = truth.double()
        assert torch.isfinite(actual).all(), f"{name}: non-finite values"
        err = (actual.double() - truth).abs().max().item() if actual.numel() else 0.0
        ref_err = (lowp_ref.double() - truth).abs().max().item() if actual.numel() else 0.0
        floor = 1e-6 * (1.0 + (truth.abs().max().item() if truth.numel() else 0.0))
        if half_ulp_floor and truth.numel():
            top = truth.abs().max().item()
            floor = max(floor, 0.5 * torch.finfo(actual.dtype).eps * 2.0 ** math.floor(
                math.log2(top)) if top > 0 else floor)
        assert err <= factor * ref_err + floor, (
            f"{name} ({actual.dtype}): max error {err:.3e} > {factor} x reference's own error "
            f"{ref_err:.3e} (+{floor:.1e})")
    else:
        torch.testing.assert_close(actual, truth.to(actual.dtype), **default_tols(actual.dtype),
                                   msg=lambda m: f"{name}: {m}")


# ---------------------------------------------------------------- markers

def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
