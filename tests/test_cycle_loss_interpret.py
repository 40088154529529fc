import os
os.environ["TRITON_INTERPRET"] = "1"  # before triton / robustmm_fast are imported  # noqa: E402

"""Interpret tier of cycle_reconstruction_loss's Triton backend (kernels/cycle_loss.py) on CPU tensors.

Run in its own process:
    TRITON_INTERPRET=1 python -m pytest -m interpret tests/test_cycle_loss_interpret.py -p no:cacheprovider

Every test names the triton backend and fails if it did not run. The oracle is the reference
(robustmm_fast.reference.cycle_loss, autograd for the gradients); the raw kernel outputs are also
compared with the reference backend's kernel and, when built, the C++ kernel.
"""
import contextlib
import zlib

import pytest
import torch

triton = pytest.importorskip("triton")

import robustmm_fast  # noqa: E402
from robustmm_fast import _backend  # noqa: E402
from robustmm_fast.kernels import cycle_loss as K  # noqa: E402
from robustmm_fast.ops.cycle_loss import DISTANCE_CODES, _ReferenceKernel  # noqa: E402
from robustmm_fast.reference.cycle_loss import cycle_reconstruction_loss as ref_loss  # noqa: E402
from conftest import assert_close_dtype, require_cpp  # noqa: E402

pytestmark = pytest.mark.interpret

OP = "cycle_loss"
DISTANCES = ("mse", "l1", "smooth_l1", "cosine")
SHAPES = [(2, 3, 37), (5, 16)]  # a leading pair dim with an awkward D; plain (rows, D)
MASKS = ("none", "some", "single", "all", "excluded")
REDUCTIONS = ("mean", "sum", "none")
NAMES = ("forward_pred", "target", "cycle_pred", "source")
BETA = 0.5  # smooth_l1: randn differences fall on both sides


# ---- helpers ----

@contextlib.contextmanager
def triton_ran(calls: int):
    """Run the block on the triton backend and check that exactly `calls` cycle_loss ops
    (forward + backward) ran on it, the backward among them when calls > 1, and that it ran
    last."""
    before = _backend.backend_calls[(OP, "triton")]
    before_backward = _backend.backward_calls[(OP, "triton")]
    with robustmm_fast.use_backend("triton"):
        yield
    assert robustmm_fast.last_backend(OP) == "triton"
    assert _backend.backend_calls[(OP, "triton")] - before == calls
    assert _backend.backward_calls[(OP, "triton")] - before_backward == calls - 1


def seeded(*key):
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def make_mask(kind, lead, gen):
    if kind == "none":
        return None
    n = lead.numel() if isinstance(lead, torch.Size) else int(torch.Size(lead).numel())
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


def make_inputs(shape, dtype, gen, mask_kind="none", requires=NAMES, nan_excluded=True):
    """[forward_pred, target, cycle_pred, source], mask; excluded rows hold NaN."""
    ins = [torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype) for _ in NAMES]
    mask = make_mask(mask_kind, shape[:-1], gen)
    if mask is not None and nan_excluded:
        for t in ins:
            t[~mask] = float("nan")
    for name, t in zip(NAMES, ins):
        t.requires_grad_(name in requires)
    return ins, mask


def grads_of(loss, ins, upstream):
    """[d loss / d input, or None where it does not require grad] with `upstream` as dL/dloss."""
    leaves = [t for t in ins if t.requires_grad]
    got = iter(torch.autograd.grad(loss, leaves, upstream) if leaves else ())
    return [next(got) if t.requires_grad else None for t in ins]


def upstream_like(loss, gen):
    return torch.randn(loss.shape, generator=gen, dtype=torch.float64).to(loss.dtype)


def assert_close(a, b, atol, rtol, what):
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    assert a.dtype == b.dtype, f"{what}: dtype {a.dtype} != {b.dtype}"
    torch.testing.assert_close(a, b, atol=atol, rtol=rtol, equal_nan=False, msg=lambda m: f"{what}: {m}")


def check_against_reference(ins, mask, gen, tol=1e-5, **kw):
    """The public op on triton vs the reference: the loss and every gradient, random upstream."""
    kw = dict(mask=mask, **kw)
    with triton_ran(2 if any(t.requires_grad for t in ins) else 1):
        loss = robustmm_fast.ops.cycle_reconstruction_loss(*ins, **kw)
        upstream = upstream_like(loss, gen)
        got = grads_of(loss, ins, upstream)
    loss_ref = ref_loss(*ins, **kw)
    want = grads_of(loss_ref, ins, upstream)
    assert_close(loss, loss_ref, tol, tol, "loss")
    assert torch.isfinite(loss).all()
    for name, g, w in zip(NAMES, got, want):
        if w is None:
            assert g is None, f"a gradient for {name}, which does not require grad"
            continue
        assert_close(g, w, tol, tol, f"d{name}")
        assert torch.isfinite(g).all(), f"d{name} not finite"
        if mask is not None:
            assert (g[~mask] == 0).all(), f"d{name} nonzero at an excluded row"
    return loss, got


# ---- values and every gradient vs the reference ----

@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_matches_reference(distance, shape, mask_kind, reduction):
    gen = seeded(distance, shape, mask_kind, reduction)
    ins, mask = make_inputs(shape, torch.float32, gen, mask_kind)
    loss, _ = check_against_reference(ins, mask, gen, distance=distance, reduction=reduction,
                                      forward_weight=0.75, cycle_weight=1.5, beta=BETA)
    if mask is not None and reduction == "none":
        assert (loss[~mask] == 0).all()


@pytest.mark.parametrize("distance", DISTANCES)
def test_return_terms_and_zero_weight(distance):
    gen = seeded("terms", distance)
    ins, mask = make_inputs((2, 3, 37), torch.float32, gen, "some")
    kw = dict(mask=mask, distance=distance, reduction="none", return_terms=True, beta=BETA)
    with triton_ran(1):
        loss, fwd, cyc = robustmm_fast.ops.cycle_reconstruction_loss(*ins, **kw)
    loss_ref, fwd_ref, cyc_ref = ref_loss(*ins, **kw)
    for name, a, b in (("loss", loss, loss_ref), ("forward", fwd, fwd_ref), ("cycle", cyc, cyc_ref)):
        assert_close(a.detach(), b.detach(), 1e-5, 1e-5, name)
    # a zero weight: that term's inputs get zero gradients, the other's are unchanged
    _, got = check_against_reference(ins, mask, gen, distance=distance, cycle_weight=0.0, beta=BETA)
    assert (got[2] == 0).all() and (got[3] == 0).all()


@pytest.mark.parametrize("beta", [0.0, 0.1, 3.0])
def test_smooth_l1_beta(beta):
    gen = seeded("beta", beta)
    ins, mask = make_inputs((2, 3, 37), torch.float32, gen, "some")
    check_against_reference(ins, mask, gen, distance="smooth_l1", beta=beta)


# every subset of the inputs (need_grad bits 0..15)
SUBSETS = [tuple(n for i, n in enumerate(NAMES) if k >> i & 1) for k in range(16)]


@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("requires", SUBSETS, ids=lambda r: "+".join(r) or "none")
def test_partial_requires_grad(distance, requires):
    """Every need_grad subset (detached targets, one side only, ...): the backward writes only
    what is asked, each against the reference."""
    gen = seeded("partial", distance, requires)
    ins, mask = make_inputs((2, 3, 37), torch.float32, gen, "some", requires=requires)
    check_against_reference(ins, mask, gen, distance=distance, beta=BETA)


# ---- the chunk loop, several programs, int64 offsets ----

@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("force_index64", [False, True])
def test_many_programs_and_chunks(monkeypatch, distance, force_index64):
    """Tiny tiles: several programs per launch, several D chunks per row (cosine's two-loop
    path), partial tiles; the int64-offset variant gives the same numbers."""
    monkeypatch.setattr(K, "_MAX_BLOCK_D", 8)
    monkeypatch.setattr(K, "_FWD_TILE", 16)
    monkeypatch.setattr(K, "_BWD_TILE", 16)
    if force_index64:
        monkeypatch.setattr(K, "_INDEX64_LIMIT", 0)
    shape = (2, 3, 37)
    grid, _, block_d, index64, _ = K._launch_config(6, 37, 16)
    assert grid == (3, 2) and block_d == 8 and index64 == force_index64
    gen = seeded("chunks", distance, force_index64)
    ins, mask = make_inputs(shape, torch.float32, gen, "some")
    check_against_reference(ins, mask, gen, distance=distance, reduction="none", beta=BETA)


@pytest.mark.parametrize("block_d", [1024, 8])
def test_cosine_zero_vectors(monkeypatch, block_d):
    """|a| = 0, |b| = 0 and both: finite, the reference's value (1) and gradients."""
    monkeypatch.setattr(K, "_MAX_BLOCK_D", block_d)
    gen = seeded("zero", block_d)
    ins, mask = make_inputs((2, 4, 37), torch.float32, gen, "none", requires=())
    with torch.no_grad():
        ins[0][0, 0] = 0      # forward_pred zero
        ins[1][0, 1] = 0      # target zero
        ins[0][0, 2] = 0      # both zero
        ins[1][0, 2] = 0
        ins[2][1, 0] = 0      # cycle_pred zero
        ins[3][1, 1] = 0      # source zero
        ins[2][1, 3] = 0
        ins[3][1, 3] = 0
    for t in ins:
        t.requires_grad_(True)
    _, got = check_against_reference(ins, mask, gen, distance="cosine", reduction="none")
    terms = K.cycle_loss_forward(*(t.detach() for t in ins), None, 3, 1.0)
    assert terms[0, 0, 0] == 1 and terms[0, 0, 2] == 1 and terms[1, 1, 3] == 1
    # a zero row's own derivative is 0 (the norm's derivative at 0), its partner's is not
    assert (got[0][0, 2] == 0).all() and (got[1][0, 2] == 0).all()
    assert (got[1][0, 0] == 0).all() and (got[0][0, 0] != 0).any()


# ---- low precision: error at most 2x the reference's own ----

@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_float16_within_twice_reference_error(distance, reduction):
    gen = seeded("fp16", distance, reduction)
    ins, mask = make_inputs((2, 3, 37), torch.float16, gen, "some")
    kw = dict(mask=mask, distance=distance, reduction=reduction, beta=BETA)
    with triton_ran(2):
        loss = robustmm_fast.ops.cycle_reconstruction_loss(*ins, **kw)
        upstream = upstream_like(loss, gen)
        got = grads_of(loss, ins, upstream)
    low = ref_loss(*ins, **kw)
    low_grads = grads_of(low, ins, upstream)
    hi = [t.detach().double().requires_grad_(True) for t in ins]
    truth = ref_loss(*hi, **kw)
    truth_grads = grads_of(truth, hi, upstream.double())
    assert loss.dtype == torch.float16
    assert_close_dtype(loss.detach(), truth.detach(), "loss", lowp_ref=low.detach())
    for name, g, l, t in zip(NAMES, got, low_grads, truth_grads):
        assert g.dtype == torch.float16, name
        assert_close_dtype(g, t, f"d{name}", lowp_ref=l)


@pytest.mark.parametrize("distance", DISTANCES)
def test_float64_matches_reference(distance):
    gen = seeded("fp64", distance)
    ins, mask = make_inputs((2, 3, 37), torch.float64, gen, "some")
    check_against_reference(ins, mask, gen, tol=1e-12, distance=distance, beta=0.1)
    terms = K.cycle_loss_forward(*(t.detach() for t in ins), mask, 0, 1.0)
    assert terms.dtype == torch.float64 and terms.shape == (2, 2, 3)


# ---- the kernel interface itself ----

def raw_outputs(kernel, ins, mask, code, beta, need_grad_bits):
    """The forward's terms and, for every need_grad bitmask, the backward outputs of one kernel
    (grad_terms NaN at excluded rows: never read)."""
    terms = kernel.cycle_loss_forward(*ins, mask, code, beta)
    grad_terms = torch.randn(terms.shape, generator=torch.Generator().manual_seed(1),
                             dtype=torch.float64).to(terms.dtype)
    if mask is not None:
        grad_terms[:, ~mask] = float("nan")
    bwd = {bits: kernel.cycle_loss_backward(grad_terms, *ins, mask, code, beta, bits)
           for bits in need_grad_bits}
    return terms, bwd


def compare_raw(got, want, tol, mask=None):
    (terms, bwd), (terms_w, bwd_w) = got, want
    assert_close(terms, terms_w, tol, tol, "terms")
    for bits in bwd:
        assert len(bwd[bits]) == 4
        for i, (name, a, b) in enumerate(zip(NAMES, bwd[bits], bwd_w[bits])):
            if not bits >> i & 1:
                assert a.numel() == 0, f"d{name} (need_grad {bits}) was computed"
            else:
                assert a.numel() > 0, f"d{name} (need_grad {bits}) is missing"
            assert_close(a, b, tol, tol, f"d{name} (need_grad {bits})")
            if a.numel():
                assert torch.isfinite(a).all(), f"d{name} (need_grad {bits}) not finite"
                if mask is not None:
                    assert (a[~mask] == 0).all(), f"d{name} (need_grad {bits}) at excluded rows"


@pytest.mark.parametrize("mask_kind", ["some", "excluded", "none"])
@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_kernel_interface_matches_reference_kernel(distance, dtype, mask_kind):
    """Raw outputs (terms; the gradients of every need_grad bitmask, in the inputs' dtype, numel 0
    where not asked for) = the reference kernel's, with NaN in the excluded rows."""
    gen = seeded("raw", distance, dtype, mask_kind)
    ins, mask = make_inputs((2, 3, 37), dtype, gen, mask_kind, requires=())
    code = DISTANCE_CODES[distance]
    # low precision: both round an fp32 result once, so they differ by at most an ulp
    tol = {torch.float32: 1e-5, torch.float64: 1e-12, torch.float16: 2e-3,
           torch.bfloat16: 1.6e-2}[dtype]
    got = raw_outputs(K, ins, mask, code, BETA, range(16))
    compare_raw(got, raw_outputs(_ReferenceKernel, ins, mask, code, BETA, range(16)), tol, mask)
    terms, bwd = got
    assert terms.shape == (2, 2, 3)
    assert terms.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert all(g.dtype == dtype for g in bwd[15])
    # non-contiguous inputs are handled
    ins_t = [torch.randn(37, 6, generator=gen).t() for _ in NAMES]
    a = raw_outputs(K, ins_t, None, code, BETA, [15])
    b = raw_outputs(K, [t.contiguous() for t in ins_t], None, code, BETA, [15])
    compare_raw(a, b, 0, None)


@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kernel_matches_cpp(distance, dtype):
    """Triton against the C++ kernel on the raw kernel outputs."""
    require_cpp("cycle_loss")  # skips, or fails under ROBUSTMM_REQUIRE_EXT=1 (CI)
    gen = seeded("cpp", distance, dtype)
    ins, mask = make_inputs((2, 3, 37), dtype, gen, "some", requires=())
    code = DISTANCE_CODES[distance]
    bits = (15, 1, 2, 5, 10, 0)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    compare_raw(raw_outputs(K, ins, mask, code, BETA, bits),
                raw_outputs(torch.ops.robustmm_C, ins, mask, code, BETA, bits), tol, mask)


def test_kernel_argument_errors():
    x = torch.zeros(2, 4)
    fwd = K.cycle_loss_forward
    with pytest.raises(TypeError, match="target"):
        fwd(x, x.double(), x, x, None, 0, 1.0)
    with pytest.raises(TypeError, match="int64"):
        fwd(x.long(), x.long(), x.long(), x.long(), None, 0, 1.0)
    with pytest.raises(ValueError, match="source"):
        fwd(x, x, x, torch.zeros(2, 5), None, 0, 1.0)
    with pytest.raises(ValueError, match="D > 0"):
        e = torch.zeros(2, 0)
        fwd(e, e, e, e, None, 0, 1.0)
    with pytest.raises(ValueError, match="distance"):
        fwd(x, x, x, x, None, 4, 1.0)
    with pytest.raises(ValueError, match="beta"):
        fwd(x, x, x, x, None, 2, 0.0)
    with pytest.raises(TypeError, match="mask"):
        fwd(x, x, x, x, torch.ones(2), 0, 1.0)
    with pytest.raises(ValueError, match="mask"):
        fwd(x, x, x, x, torch.ones(3, dtype=torch.bool), 0, 1.0)
    gterms = fwd(x, x, x, x, None, 0, 1.0)
    assert gterms.shape == (2, 2)
    bwd = K.cycle_loss_backward
    with pytest.raises(TypeError, match="grad_terms"):
        bwd(gterms.double(), x, x, x, x, None, 0, 1.0, 15)
    with pytest.raises(ValueError, match="grad_terms"):
        bwd(torch.zeros(2, 3), x, x, x, x, None, 0, 1.0, 15)
    with pytest.raises(ValueError, match="cycle_pred"):
        bwd(gterms, x, x, torch.zeros(2, 5), x, None, 3, 1.0, 15)
    with pytest.raises(TypeError, match="target"):
        bwd(gterms, x, x.half(), x, x, None, 3, 1.0, 15)
    with pytest.raises(ValueError, match="need_grad"):
        bwd(gterms, x, x, x, x, None, 0, 1.0, 16)
    with pytest.raises(ValueError, match="beta"):
        bwd(gterms, x, x, x, x, None, 2, 0.0, 15)
    with pytest.raises(ValueError, match="mask"):
        bwd(gterms, x, x, x, x, torch.ones(3, dtype=torch.bool), 0, 1.0, 15)


@pytest.mark.parametrize("shape", [(0, 8), (0, 3, 13)])
def test_empty(shape):
    ins = [torch.zeros(shape, requires_grad=True) for _ in NAMES]
    with triton_ran(2):
        loss = robustmm_fast.ops.cycle_reconstruction_loss(*ins, reduction="sum")
        loss.backward()
    assert loss == 0
    assert all(t.grad.shape == shape for t in ins)


def test_one_dim_input_and_scalar_mask():
    gen = seeded("1d")
    for distance in DISTANCES:
        for mask in (None, torch.tensor(True), torch.tensor(False)):
            ins, _ = make_inputs((6,), torch.float32, gen)
            check_against_reference(ins, mask, gen, distance=distance, reduction="none", beta=BETA)
