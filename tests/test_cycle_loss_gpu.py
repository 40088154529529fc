"""gpu tier of cycle_reconstruction_loss: the `cuda` (csrc/cuda) and `triton` (kernels/) backends on
CUDA tensors against the autograd oracle robustmm_fast.reference.cycle_reconstruction_loss run on
the same CUDA tensors (DESIGN §4, §7), and their raw kernel outputs against the C++ CPU kernel.

    pytest -m gpu tests/test_cycle_loss_gpu.py

A backend that cannot run here is skipped, or fails under ROBUSTMM_REQUIRE_EXT=1. Low precision:
the error against an fp64 ground truth is at most 2x the reference's own (conftest). Excluded rows
hold NaN/Inf in every check against the oracle (the oracle gets the clean tensors).
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from robustmm_fast import _backend
from robustmm_fast import reference as ref
from robustmm_fast.ops import cycle_reconstruction_loss
from robustmm_fast.ops.cycle_loss import DISTANCE_CODES, _kernel, _ReferenceKernel

from conftest import (assert_close_dtype, late_copies_on_side_stream, opcheck_kernel_op,
                      require_cpp, run_on)
from test_cycle_loss import (DISTANCES, DTYPE_IDS, MASKS, NAMES, OP, REDUCTIONS, REQUIRES,
                             _loss_fn, _opcheck_samples, make_inputs, poison)

pytestmark = pytest.mark.gpu

DEV = torch.device("cuda")
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
AWKWARD = (2, 7, 37)
# (P, B, L, D) as CyIN stacks its 9 pairs; awkward D (odd, > one 256-thread chunk, > 4096);
# one-element rows
SHAPES = ((9, 4, 6, 128), AWKWARD, (3, 5, 1, 1000), (2, 3, 4099), (4, 1))
WEIGHTS = dict(forward_weight=0.7, cycle_weight=1.9)


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


def require_cuda_ext():
    why = _backend._unavailable_reason("cuda", DEV)
    if why is not None:
        msg = f"the CUDA extension cannot run: {why}"
        if os.environ.get("ROBUSTMM_REQUIRE_EXT", "0") == "1":
            pytest.fail(msg + " (ROBUSTMM_REQUIRE_EXT=1 requires it)", pytrace=False)
        pytest.skip(msg)


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


def run(fn, leaves, mask, upstream, **kw):
    """The loss (detached) and the gradients of sum(loss * upstream) w.r.t. every leaf that
    requires grad (None for the others)."""
    loss = fn(*leaves, mask=mask, **kw)
    wanted = [x for x in leaves if x.requires_grad]
    grads = torch.autograd.grad(loss, wanted, upstream.to(loss.dtype)) if wanted else ()
    it = iter(grads)
    return loss.detach(), [next(it) if x.requires_grad else None for x in leaves]


def upstream_for(shape, reduction, seed):
    gen = torch.Generator().manual_seed(seed)
    lead = tuple(shape[:-1]) if reduction == "none" else ()
    return torch.randn(lead, generator=gen, dtype=torch.float64).to(DEV)


def check(backend, dtype, shape, *, distance, reduction="none", mask="some", offset=0, seed=0,
          requires=(True,) * 4, tensors=None, m=None, **kw):
    """Loss and every gradient of the op on `backend` (NaN/Inf in the excluded rows) vs the
    oracle on the clean tensors in the same dtype and in fp64 (the ground truth), all on the GPU."""
    if tensors is None:
        tensors, m = make_inputs(shape, mask=mask, seed=seed)
    up = upstream_for(shape, reduction, seed + 1)
    kw = dict(distance=distance, reduction=reduction, **kw)
    leaves = [on_gpu(t, dtype, grad=r, offset=offset) for t, r in zip(poison(tensors, m), requires)]
    mg = on_gpu(m)
    with run_on(backend, OP, backward=any(requires)):
        loss, grads = run(cycle_reconstruction_loss, leaves, mg, up, **kw)
    clean = [on_gpu(t, dtype, grad=r) for t, r in zip(tensors, requires)]
    loss_lp, grads_lp = run(ref.cycle_reconstruction_loss, clean, mg, up, **kw)
    hi = [x.detach().double().requires_grad_(r) for x, r in zip(clean, requires)]
    loss64, grads64 = run(ref.cycle_reconstruction_loss, hi, mg, up, **kw)
    assert loss.dtype == dtype and loss.shape == loss64.shape
    assert_close_dtype(loss, loss64, "loss", loss_lp)
    for name, g, g64, g_lp in zip(NAMES, grads, grads64, grads_lp):
        if g64 is None:
            assert g is None, f"d {name}: a gradient for an input that does not require one"
            continue
        assert g is not None and g.dtype == dtype and g.shape == tuple(shape), f"d {name}"
        assert torch.isfinite(g).all(), f"d {name}: non-finite"
        assert_close_dtype(g, g64, f"d {name}", g_lp)
        if mg is not None:
            assert not g[~mg].any(), f"d {name}: excluded rows got a gradient"
    return loss, grads


# ---------------------------------------------------------------- values and gradients

@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("distance", DISTANCES)
def test_values_and_gradients(gpu_backend, distance, reduction, dtype, shape):
    check(gpu_backend, dtype, shape, distance=distance, reduction=reduction, beta=0.5, **WEIGHTS)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=DTYPE_IDS.get)
@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("shape", ((9, 64, 50, 128), (9, 16, 8, 1024)), ids=lambda s: "x".join(map(str, s)))
def test_large(gpu_backend, shape, distance, dtype):
    check(gpu_backend, dtype, shape, distance=distance, reduction="mean", **WEIGHTS)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=DTYPE_IDS.get)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("distance", DISTANCES)
def test_masks(gpu_backend, distance, mask, reduction, dtype):
    loss, grads = check(gpu_backend, dtype, AWKWARD, distance=distance, reduction=reduction,
                        mask=mask, seed=2)
    if mask == "all_excluded":
        assert not loss.any() and not any(g.any() for g in grads)


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.float64), ids=DTYPE_IDS.get)
@pytest.mark.parametrize("distance", DISTANCES)
def test_misaligned_contiguous_inputs(gpu_backend, distance, dtype):
    """Every input one element into its buffer (D % 8 == 0): the CUDA kernel's generic path."""
    check(gpu_backend, dtype, (6, 7, 64), distance=distance, offset=1, seed=3)


@pytest.mark.parametrize("requires", REQUIRES.values(), ids=REQUIRES.keys())
@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=DTYPE_IDS.get)
def test_partial_requires_grad(gpu_backend, dtype, distance, requires):
    """Each need_grad combination of the backward (targets detached, one side only)."""
    check(gpu_backend, dtype, (3, 4, 40), distance=distance, reduction="mean", requires=requires,
          seed=4)


@pytest.mark.parametrize("beta", (1e-3, 0.3, 1.0, 5.0, 0.0))
def test_smooth_l1_betas(gpu_backend, beta):
    check(gpu_backend, torch.float32, AWKWARD, distance="smooth_l1", beta=beta, seed=5)


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=DTYPE_IDS.get)
@pytest.mark.parametrize("dim", (37, 128))
def test_cosine_zero_vectors(gpu_backend, dim, dtype):
    """Zero rows in any position: finite, and equal to F.cosine_similarity's autograd."""
    tensors, _ = make_inputs((2, 7, dim), seed=11)
    tensors[0][0, 0] = 0          # forward_pred zero
    tensors[1][0, 1] = 0          # target zero
    tensors[2][1, 2] = 0          # both of the cycle pair
    tensors[3][1, 2] = 0
    tensors[0][1, 3] = 1e-10      # below eps, nonzero
    check(gpu_backend, dtype, (2, 7, dim), distance="cosine", reduction="sum", tensors=tensors)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=DTYPE_IDS.get)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("shape", ((4, 3, 40), (4, 3, 9)), ids=lambda s: "x".join(map(str, s)))
def test_nan_in_excluded_rows_does_not_leak(gpu_backend, shape, distance, reduction, dtype):
    """NaN/Inf in the excluded rows of every input (and, for reduction none, of the upstream
    gradient) leave the loss and every gradient bitwise unchanged."""
    tensors, m = make_inputs(shape, mask="some", seed=6)
    up = upstream_for(shape, reduction, 7)
    mg = on_gpu(m)

    def go(value):
        ts, g = tensors, up
        if value is not None:
            ts = [t.masked_fill(~m.unsqueeze(-1), value) for t in tensors]
            g = up.masked_fill(~mg, value) if reduction == "none" else up
        leaves = [on_gpu(t, dtype, grad=True) for t in ts]
        with run_on(gpu_backend, OP):
            loss, grads = run(cycle_reconstruction_loss, leaves, mg, g, distance=distance,
                              reduction=reduction, **WEIGHTS)
        return [loss, *grads]

    clean = go(None)
    assert all(not g[~mg].any() for g in clean[1:])
    if reduction == "none":
        assert not clean[0][~mg].any()
    for value in (float("nan"), float("inf"), float("-inf")):
        for a, b in zip(go(value), clean):
            assert torch.equal(a, b), f"a {value} in excluded rows changed the result"


@pytest.mark.parametrize("shape,reduction", [((0, 8), "mean"), ((9, 0, 16), "none"),
                                             ((0, 3, 5), "sum")])
def test_empty(gpu_backend, shape, reduction):
    xs = [torch.randn(shape, device=DEV, requires_grad=True) for _ in NAMES]
    with run_on(gpu_backend, OP):
        loss = cycle_reconstruction_loss(*xs, reduction=reduction)
        grads = torch.autograd.grad(loss.sum(), xs)
    assert loss.shape == (shape[:-1] if reduction == "none" else ()) and not loss.any()
    assert all(g.shape == shape for g in grads)


def test_deterministic(gpu_backend):
    """The same call twice gives bitwise the same loss and gradients (no atomics)."""
    if gpu_backend != "cuda":
        pytest.skip("bitwise determinism is promised by the CUDA kernel (fixed reduction order)")
    tensors, m = make_inputs((9, 16, 8, 1024), mask="some", seed=8)
    out = []
    for _ in range(2):
        leaves = [on_gpu(t, torch.float32, grad=True) for t in tensors]
        with run_on(gpu_backend, OP):
            out.append(run(cycle_reconstruction_loss, leaves, on_gpu(m),
                           upstream_for((9, 16, 8, 1024), "none", 9), distance="cosine",
                           reduction="none"))
    assert torch.equal(out[0][0], out[1][0])
    for a, b in zip(out[0][1], out[1][1]):
        assert torch.equal(a, b)


# ---------------------------------------------------------------- raw kernel outputs

RAW_TOLS = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float64: dict(rtol=1e-10, atol=1e-12),
            torch.float16: dict(rtol=2e-3, atol=1e-5), torch.bfloat16: dict(rtol=1.6e-2, atol=1e-5)}


def _raw_inputs(shape, dtype, mask, seed):
    tensors, m = make_inputs(shape, mask=mask, seed=seed)
    return [t.to(dtype) for t in poison(tensors, m)], m


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("shape", ((9, 4, 6, 128), AWKWARD, (3, 4099)), ids=lambda s: "x".join(map(str, s)))
def test_raw_kernels_match_cpp(gpu_backend, shape, distance, dtype):
    """cycle_loss_forward / cycle_loss_backward of this backend on CUDA tensors against the C++
    kernel on the same values on the CPU (and the reference backend's kernel on CUDA): the
    terms, and the gradients of every need_grad combination (numel 0 where not asked for), with
    NaN in the excluded rows of the inputs and of grad_terms."""
    require_cpp()
    xs, m = _raw_inputs(shape, dtype, "some", seed=12)
    code = DISTANCE_CODES[distance]
    kernel = _kernel(gpu_backend)
    cpu_ops = torch.ops.robustmm_C
    tol = RAW_TOLS[torch.float64 if dtype == torch.float64 else torch.float32]
    gpu_xs, gpu_m = [on_gpu(x) for x in xs], on_gpu(m)
    got = kernel.cycle_loss_forward(*gpu_xs, gpu_m, code, 0.5)
    want = cpu_ops.cycle_loss_forward(*xs, m, code, 0.5)
    refk = _ReferenceKernel.cycle_loss_forward(*gpu_xs, gpu_m, code, 0.5)
    assert got.device.type == DEV.type and got.dtype == want.dtype and got.shape == want.shape
    assert refk.shape == want.shape
    torch.testing.assert_close(got.cpu(), want, **tol, msg=lambda s: f"terms vs cpp: {s}")
    torch.testing.assert_close(got, refk, **tol, msg=lambda s: f"terms vs reference: {s}")
    gen = torch.Generator().manual_seed(13)
    grad_terms = torch.randn((2, *shape[:-1]), generator=gen, dtype=want.dtype)
    grad_terms[:, ~m] = float("nan")  # excluded rows: never read
    for need_grad in range(16):
        got = kernel.cycle_loss_backward(on_gpu(grad_terms), *gpu_xs, gpu_m, code, 0.5, need_grad)
        want = cpu_ops.cycle_loss_backward(grad_terms, *xs, m, code, 0.5, need_grad)
        assert len(got) == 4
        for i, (g, w) in enumerate(zip(got, want)):
            assert g.dtype == dtype and g.shape == w.shape, f"need_grad {need_grad}: output {i}"
            assert g.numel() == (w.numel() if need_grad >> i & 1 else 0)
            torch.testing.assert_close(g.cpu(), w, **RAW_TOLS[dtype],
                                       msg=lambda s: f"need_grad {need_grad}, output {i}: {s}")
            if g.numel():
                assert not g[~gpu_m].any() and torch.isfinite(g).all()


def test_cuda_kernel_checks_its_arguments():
    """The CUDA entry points reject bad input themselves (TORCH_CHECK), naming the argument."""
    require_cuda_ext()
    ops = torch.ops.robustmm_C
    tensors, m = make_inputs(AWKWARD, mask="some")
    xs, m = [t.float().to(DEV) for t in tensors], m.to(DEV)
    with pytest.raises(ValueError, match="target"):
        ops.cycle_loss_forward(xs[0], xs[1][..., :-1], xs[2], xs[3], m, 0, 1.0)
    with pytest.raises(TypeError, match="source"):
        ops.cycle_loss_forward(xs[0], xs[1], xs[2], xs[3].double(), m, 0, 1.0)
    with pytest.raises(RuntimeError, match="cycle_pred"):  # device
        ops.cycle_loss_forward(xs[0], xs[1], xs[2].cpu(), xs[3], m, 0, 1.0)
    with pytest.raises(ValueError, match="mask"):
        ops.cycle_loss_forward(*xs, m[:, :-1], 0, 1.0)
    with pytest.raises(TypeError, match="mask"):
        ops.cycle_loss_forward(*xs, m.float(), 0, 1.0)
    with pytest.raises(ValueError, match="distance"):
        ops.cycle_loss_forward(*xs, m, 7, 1.0)
    with pytest.raises(ValueError, match="beta"):
        ops.cycle_loss_forward(*xs, m, 2, 0.0)
    grad_terms = torch.ones_like(ops.cycle_loss_forward(*xs, m, 0, 1.0))
    with pytest.raises(ValueError, match="grad_terms"):
        ops.cycle_loss_backward(grad_terms[:, :-1], *xs, m, 0, 1.0, 15)
    with pytest.raises(TypeError, match="grad_terms"):
        ops.cycle_loss_backward(grad_terms.double(), *xs, m, 0, 1.0, 15)
    with pytest.raises(RuntimeError, match="grad_terms"):  # device
        ops.cycle_loss_backward(grad_terms.cpu(), *xs, m, 0, 1.0, 15)
    with pytest.raises(ValueError, match="need_grad"):
        ops.cycle_loss_backward(grad_terms, *xs, m, 0, 1.0, 16)
    with pytest.raises(ValueError, match="source"):
        ops.cycle_loss_backward(grad_terms, xs[0], xs[1], xs[2], xs[3][..., :-1], m, 0, 1.0, 15)
    with pytest.raises(ValueError, match="beta"):
        ops.cycle_loss_backward(grad_terms, *xs, m, 2, 0.0, 15)


# ---------------------------------------------------------------- gradcheck, opcheck, torch.compile

@pytest.mark.parametrize("reduction", ("mean", "none"))
@pytest.mark.parametrize("distance", DISTANCES)
def test_gradcheck(gpu_backend, distance, reduction):
    tensors, m = make_inputs((2, 3, 6), mask="some", seed=16)
    xs = [on_gpu(t, grad=True) for t in tensors]
    m = on_gpu(m)

    def fn(*args):
        return cycle_reconstruction_loss(*args, mask=m, distance=distance, reduction=reduction,
                                         forward_weight=0.6, cycle_weight=1.7, beta=0.7)

    with run_on(gpu_backend, OP):
        assert torch.autograd.gradcheck(fn, xs)


def _opcheck_samples_gpu(sample_idx):
    xs, m, code = _opcheck_samples()[sample_idx]
    return [on_gpu(x, grad=True) for x in xs], on_gpu(m), code


@pytest.mark.parametrize("sample_idx", range(4))
def test_opcheck_forward(gpu_backend, sample_idx):
    xs, m, code = _opcheck_samples_gpu(sample_idx)
    with run_on(gpu_backend, OP):
        opcheck_kernel_op(torch.ops.robustmm.cycle_loss_forward, (gpu_backend, *xs, m, code, 0.5))


@pytest.mark.parametrize("need_grad", (15, 1, 2, 10, 0))
@pytest.mark.parametrize("sample_idx", range(4))
def test_opcheck_backward(gpu_backend, sample_idx, need_grad):
    xs, m, code = _opcheck_samples_gpu(sample_idx)
    acc = torch.float64 if xs[0].dtype == torch.float64 else torch.float32
    grad_terms = torch.randn((2, *xs[0].shape[:-1]), dtype=acc, device=DEV)
    with run_on(gpu_backend, OP, backward=True):
        opcheck_kernel_op(torch.ops.robustmm.cycle_loss_backward,
                          (gpu_backend, grad_terms, *xs, m, code, 0.5, need_grad))


@pytest.mark.parametrize("compiler", ("aot_eager", "inductor"))
def test_compile_fullgraph(gpu_backend, compiler):
    tensors, m = make_inputs(AWKWARD, mask="some", seed=30)
    m = on_gpu(m)
    torch._dynamo.reset()
    compiled = torch.compile(_loss_fn, backend=compiler, fullgraph=True)
    results = []
    for fn in (_loss_fn, compiled):
        xs = [on_gpu(t, torch.float32, grad=True) for t in tensors]
        with run_on(gpu_backend, OP):
            loss = fn(*xs, m)
            loss.backward()
        results.append((loss.detach(), [x.grad for x in xs]))
    torch.testing.assert_close(results[0][0], results[1][0])
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b)


def test_matches_torch_losses_without_mask(gpu_backend):
    """With no mask and reduction mean, the terms are torch's own losses of the two pairs."""
    tensors, _ = make_inputs((9, 4, 6, 128), seed=5)
    fp, tg, cp, src = [on_gpu(t, torch.float32) for t in tensors]
    torch_loss = {
        "mse": F.mse_loss, "l1": F.l1_loss,
        "smooth_l1": lambda a, b: F.smooth_l1_loss(a, b, beta=0.5),
        "cosine": lambda a, b: (1 - F.cosine_similarity(a, b, dim=-1, eps=1e-8)).mean(),
    }
    for distance, fn in torch_loss.items():
        with run_on(gpu_backend, OP):
            _, fwd, cyc = cycle_reconstruction_loss(fp, tg, cp, src, distance=distance, beta=0.5,
                                                    return_terms=True)
        torch.testing.assert_close(fwd, fn(fp, tg))
        torch.testing.assert_close(cyc, fn(cp, src))


# ---------------------------------------------------------------- streams

def test_non_default_stream(gpu_backend):
    """The kernels launch on the current stream: the inputs are written on a side stream held
    busy by a sleep, so a kernel on any other stream would read the NaN placeholders."""
    shape = (9, 4, 6, 128)
    tensors, m = make_inputs(shape, mask="some", seed=40)
    src, m = [on_gpu(t, torch.float32) for t in tensors], on_gpu(m)
    up = upstream_for(shape, "none", 41)
    kw = dict(distance="cosine", reduction="none")
    want = run(ref.cycle_reconstruction_loss, [t.clone().requires_grad_() for t in src], m, up, **kw)
    with late_copies_on_side_stream(src) as leaves:
        with run_on(gpu_backend, OP):
            got = run(cycle_reconstruction_loss, [x.requires_grad_() for x in leaves], m, up, **kw)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    for a, b in zip(got[1], want[1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
