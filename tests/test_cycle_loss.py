"""cycle_reconstruction_loss on the CPU backends (reference, cpp and cpp's baseline ISA copy)
against the autograd oracle robustmm_fast.reference.cycle_reconstruction_loss and against
torch's own loss functions (DESIGN §4, §7)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from robustmm_fast import _backend
from robustmm_fast import reference as ref
from robustmm_fast.reference import cycle_loss as ref_cycle_loss
from robustmm_fast.ops import cycle_reconstruction_loss
from robustmm_fast.ops.cycle_loss import DISTANCE_CODES, _ReferenceKernel

from conftest import assert_close_dtype, LOW_PRECISION, opcheck_kernel_op, require_cpp, run_on

OP = "cycle_loss"
DISTANCES = ("mse", "l1", "smooth_l1", "cosine")
REDUCTIONS = ("mean", "sum", "none")
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
DTYPE_IDS = {torch.float32: "fp32", torch.float64: "fp64", torch.float16: "fp16", torch.bfloat16: "bf16"}
# (P, B, L, D) as CyIN stacks pairs; an awkward one (D not a multiple of 8 or 16); vectors (L = 1)
REALISTIC, AWKWARD, VECTORS = (3, 6, 10, 128), (2, 7, 37), (3, 5, 1, 1000)
SHAPES = (REALISTIC, AWKWARD, VECTORS)
MASKS = ("none", "some", "all_excluded", "all_included", "single")
NAMES = ("forward_pred", "target", "cycle_pred", "source")


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


def make_inputs(shape, *, mask="none", seed=0):
    """Four fp64 tensors (forward_pred near target, cycle_pred near source, as after some
    training, so smooth_l1 sees both of its branches) and a mask."""
    gen = torch.Generator().manual_seed(seed)
    target = torch.randn(shape, dtype=torch.float64, generator=gen)
    source = torch.randn(shape, dtype=torch.float64, generator=gen)
    forward_pred = target + 0.8 * torch.randn(shape, dtype=torch.float64, generator=gen)
    cycle_pred = source + 0.8 * torch.randn(shape, dtype=torch.float64, generator=gen)
    return [forward_pred, target, cycle_pred, source], make_mask(mask, tuple(shape[:-1]), gen)


def poison(tensors, mask):
    """NaN and Inf in every excluded row: they must reach neither the loss nor the gradients."""
    if mask is None:
        return tensors
    out = []
    for i, t in enumerate(tensors):
        t = t.clone()
        t[~mask] = float("nan") if i % 2 == 0 else float("inf")
        out.append(t)
    return out


def run(fn, tensors, mask, dtype, upstream=None, requires=(True,) * 4, **kwargs):
    """(loss, grads) of fn on copies of `tensors` in `dtype`; the loss is backpropagated with
    `upstream` (a random tensor of the loss's shape by default seeded from the shape)."""
    xs = [t.detach().to(dtype).requires_grad_(r) for t, r in zip(tensors, requires)]
    loss = fn(*xs, mask=mask, **kwargs)
    if upstream is None:
        gen = torch.Generator().manual_seed(1)
        upstream = torch.randn(loss.shape, dtype=torch.float64, generator=gen)
    wanted = [x for x in xs if x.requires_grad]
    grads = torch.autograd.grad(loss, wanted, upstream.to(loss.dtype)) if wanted else ()
    it = iter(grads)
    return loss.detach(), [next(it) if x.requires_grad else None for x in xs], upstream


def check_against_truth(backend, tensors, mask, dtype, requires=(True,) * 4, **kwargs):
    """The op on `backend` in `dtype` against the oracle in fp64 (and, for fp16/bf16, against
    the oracle's own error in that dtype)."""
    with run_on(backend, OP, backward=any(requires)):
        loss, grads, upstream = run(cycle_reconstruction_loss, poison(tensors, mask), mask, dtype,
                                    requires=requires, **kwargs)
    truth, truth_grads, _ = run(ref.cycle_reconstruction_loss, tensors, mask, torch.float64,
                                upstream, requires=requires, **kwargs)
    lowp = lowp_grads = [None] * 4
    if dtype in LOW_PRECISION:
        lowp, lowp_grads, _ = run(ref.cycle_reconstruction_loss, tensors, mask, dtype, upstream,
                                  requires=requires, **kwargs)
    assert loss.dtype == dtype
    assert_close_dtype(loss, truth, "loss", lowp if dtype in LOW_PRECISION else None)
    for name, g, t, lg in zip(NAMES, grads, truth_grads, lowp_grads):
        if t is None:
            assert g is None
            continue
        assert g.dtype == dtype and torch.isfinite(g).all(), f"d {name}: non-finite"
        assert_close_dtype(g, t, f"d {name}", lg)
        if mask is not None:
            assert (g[~mask] == 0).all(), f"d {name}: excluded rows got a gradient"


# ---------------------------------------------------------------- values and gradients

@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("distance", DISTANCES)
def test_matches_reference(backend, distance, reduction, mask, shape):
    tensors, m = make_inputs(shape, mask=mask)
    check_against_truth(backend, tensors, m, torch.float32, distance=distance, reduction=reduction,
                        forward_weight=0.7, cycle_weight=1.9, beta=0.5)


@pytest.mark.parametrize("reduction", ("mean", "none"))
@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_dtypes(backend, dtype, distance, reduction):
    tensors, m = make_inputs(REALISTIC, mask="some", seed=3)
    check_against_truth(backend, tensors, m, dtype, distance=distance, reduction=reduction,
                        forward_weight=1.5, cycle_weight=0.25)


# which inputs require grad: every non-empty subset (the backward's need_grad bits 1..15),
# named by the inputs in it, e.g. "forward_pred+cycle_pred" (targets detached)
REQUIRES = {"+".join(n for n, r in zip(NAMES, bits) if r): bits
            for bits in (tuple(bool(k >> i & 1) for i in range(4)) for k in range(1, 16))}


@pytest.mark.parametrize("requires", REQUIRES.values(), ids=REQUIRES.keys())
@pytest.mark.parametrize("mask", ("some", "all_excluded"))
@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_partial_requires_grad(backend, dtype, distance, mask, requires):
    """Every need_grad subset, every dtype: each requested gradient against the oracle (NaN/Inf
    in the excluded rows), none for the others."""
    tensors, m = make_inputs(AWKWARD, mask=mask, seed=4)
    check_against_truth(backend, tensors, m, dtype, requires=requires, distance=distance,
                        reduction="mean", beta=0.5)


@pytest.mark.parametrize("distance", DISTANCES)
def test_matches_torch_losses_without_mask(backend, distance):
    """With no mask and reduction mean, the terms are torch's own losses of the two pairs."""
    tensors, _ = make_inputs(REALISTIC, seed=5)
    fp, tg, cp, src = [t.float() for t in tensors]
    torch_loss = {
        "mse": F.mse_loss, "l1": F.l1_loss,
        "smooth_l1": lambda a, b: F.smooth_l1_loss(a, b, beta=0.5),
        "cosine": lambda a, b: (1 - F.cosine_similarity(a, b, dim=-1, eps=1e-8)).mean(),
    }[distance]
    with run_on(backend, OP):
        loss, fwd, cyc = cycle_reconstruction_loss(fp, tg, cp, src, distance=distance, beta=0.5,
                                                   forward_weight=2.0, cycle_weight=3.0,
                                                   return_terms=True)
    torch.testing.assert_close(fwd, torch_loss(fp, tg))
    torch.testing.assert_close(cyc, torch_loss(cp, src))
    torch.testing.assert_close(loss, 2.0 * torch_loss(fp, tg) + 3.0 * torch_loss(cp, src))


def test_return_terms_are_detached_and_reduced_like_the_loss(backend):
    tensors, m = make_inputs(AWKWARD, mask="some", seed=6)
    xs = [t.float().requires_grad_() for t in tensors]
    for reduction in REDUCTIONS:
        with run_on(backend, OP):
            loss, fwd, cyc = cycle_reconstruction_loss(*xs, mask=m, reduction=reduction,
                                                       forward_weight=0.5, cycle_weight=2.0,
                                                       return_terms=True)
        assert not fwd.requires_grad and not cyc.requires_grad
        assert fwd.shape == cyc.shape == loss.shape
        torch.testing.assert_close(loss, 0.5 * fwd + 2.0 * cyc)


def test_loss_scaled_before_backward(backend):
    """grad_output != 1 through a scalar reduction (as in `lambda * loss`)."""
    tensors, m = make_inputs(REALISTIC, mask="some", seed=7)
    xs = [t.float().requires_grad_() for t in tensors]
    with run_on(backend, OP):
        (3.7 * cycle_reconstruction_loss(*xs, mask=m, distance="smooth_l1")).backward()
    ys = [t.clone().requires_grad_() for t in tensors]
    (3.7 * ref.cycle_reconstruction_loss(*ys, mask=m, distance="smooth_l1")).backward()
    for x, y in zip(xs, ys):
        torch.testing.assert_close(x.grad, y.grad.float())


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=DTYPE_IDS.get)
@pytest.mark.parametrize("distance", DISTANCES)
def test_retain_graph_second_backward(backend, distance, dtype):
    """A second backward through the same graph (retain_graph) recomputes from the saved inputs
    and gives bitwise the same gradients as the first, which match the oracle."""
    tensors, m = make_inputs(AWKWARD, mask="some", seed=8)
    xs = [t.to(dtype).requires_grad_() for t in poison(tensors, m)]
    before = _backend.backward_calls[(OP, backend)]
    with run_on(backend, OP, backward=True):
        loss = cycle_reconstruction_loss(*xs, mask=m, distance=distance)
        first = [g.clone() for g in torch.autograd.grad(loss, xs, retain_graph=True)]
        second = torch.autograd.grad(loss, xs)
    assert _backend.backward_calls[(OP, backend)] - before == 2
    for name, a, b in zip(NAMES, first, second):
        assert torch.equal(a, b), f"d {name}: the second backward differs from the first"
    ys = [t.clone().requires_grad_() for t in tensors]
    truth = torch.autograd.grad(ref.cycle_reconstruction_loss(*ys, mask=m, distance=distance), ys)
    if dtype == torch.float32:
        for name, a, t in zip(NAMES, first, truth):
            assert_close_dtype(a, t, f"d {name}")


@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=DTYPE_IDS.get)
def test_forward_saves_no_derivative_buffer(backend, dtype, distance):
    """The forward kernel returns the (2, ...) terms alone, and the graph keeps no tensor of the
    inputs' size other than the inputs themselves (no derivative buffers, no fp32 copies): every
    saved tensor of that size is one of the four inputs."""
    tensors, m = make_inputs(AWKWARD, mask="some", seed=17)
    xs = [t.to(dtype).requires_grad_() for t in tensors]
    with run_on(backend, OP), torch.no_grad():
        terms = torch.ops.robustmm.cycle_loss_forward(backend, *xs, m, DISTANCE_CODES[distance],
                                                      0.5)
    assert isinstance(terms, torch.Tensor) and terms.shape == (2, *AWKWARD[:-1])
    assert terms.dtype == torch.float32
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with run_on(backend, OP):
            loss = cycle_reconstruction_loss(*xs, mask=m, distance=distance)
    big = [t for t in saved if t.numel() >= xs[0].numel()]
    inputs = {x.data_ptr() for x in xs}
    assert len(big) == 4 and all(t.data_ptr() in inputs and t.dtype == dtype for t in big), (
        [(tuple(t.shape), t.dtype) for t in big])
    with run_on(backend, OP, backward=True):
        loss.backward()
    assert all(x.grad is not None and x.grad.dtype == dtype for x in xs)


@pytest.mark.parametrize("distance", DISTANCES)
def test_accumulates_into_leaf_grads(backend, distance):
    """Two steps without zero_grad: .grad is the sum (the first step's buffer is not reused)."""
    tensors, m = make_inputs(AWKWARD, mask="some", seed=9)
    xs = [t.float().requires_grad_() for t in tensors]
    with run_on(backend, OP):
        for _ in range(2):
            cycle_reconstruction_loss(*xs, mask=m, distance=distance).backward()
    ys = [t.clone().requires_grad_() for t in tensors]
    ref.cycle_reconstruction_loss(*ys, mask=m, distance=distance).backward()
    for x, y in zip(xs, ys):
        torch.testing.assert_close(x.grad, 2 * y.grad.float())


# ---------------------------------------------------------------- masks and edge cases

def test_mask_broadcasts_over_tokens(backend):
    """A (P, B, 1) mask (which pairs are present per sample) covers every token of (P, B, L)."""
    tensors, _ = make_inputs(REALISTIC, seed=10)
    gen = torch.Generator().manual_seed(0)
    pair_mask = torch.rand(REALISTIC[:2], generator=gen) < 0.5
    full = pair_mask.unsqueeze(-1).expand(REALISTIC[:-1])
    xs = [t.float() for t in tensors]
    with run_on(backend, OP):
        a = cycle_reconstruction_loss(*xs, mask=pair_mask.unsqueeze(-1))
        b = cycle_reconstruction_loss(*xs, mask=full)
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_all_rows_excluded_is_zero_not_nan(backend, reduction):
    tensors, m = make_inputs(AWKWARD, mask="all_excluded")
    xs = [t.float().requires_grad_() for t in poison(tensors, m)]
    with run_on(backend, OP):
        loss = cycle_reconstruction_loss(*xs, mask=m, distance="cosine", reduction=reduction)
        loss.sum().backward()
    assert (loss == 0).all()
    assert all((x.grad == 0).all() for x in xs)


def test_no_rows(backend):
    xs = [torch.zeros(0, 5, 8, requires_grad=True) for _ in range(4)]
    with run_on(backend, OP):
        loss = cycle_reconstruction_loss(*xs)
        loss.backward()
    assert loss.item() == 0.0
    assert all(x.grad.shape == (0, 5, 8) for x in xs)


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=DTYPE_IDS.get)
def test_cosine_zero_vectors(backend, dtype):
    """Zero rows in any position: finite, and equal to F.cosine_similarity's autograd."""
    tensors, _ = make_inputs(AWKWARD, seed=11)
    tensors[0][0, 0] = 0          # forward_pred zero
    tensors[1][0, 1] = 0          # target zero
    tensors[2][1, 2] = 0          # both of the cycle pair
    tensors[3][1, 2] = 0
    tensors[0][1, 3] = 1e-10      # below eps, nonzero
    check_against_truth(backend, tensors, None, dtype, distance="cosine", reduction="sum")


def test_smooth_l1_beta_zero_is_l1(backend):
    tensors, m = make_inputs(AWKWARD, mask="some", seed=12)
    xs = [t.float() for t in tensors]
    with run_on(backend, OP):
        a = cycle_reconstruction_loss(*xs, mask=m, distance="smooth_l1", beta=0.0)
        b = cycle_reconstruction_loss(*xs, mask=m, distance="l1")
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("beta", (1e-3, 0.3, 1.0, 5.0))
def test_smooth_l1_betas(backend, beta):
    tensors, m = make_inputs(AWKWARD, mask="some", seed=13)
    check_against_truth(backend, tensors, m, torch.float32, distance="smooth_l1", beta=beta,
                        reduction="none")


def test_non_contiguous_inputs(backend):
    tensors, m = make_inputs((2, 7, 40), mask="some", seed=14)
    strided = [t.transpose(0, 1).contiguous().transpose(0, 1) for t in tensors]
    assert not strided[0].is_contiguous()
    check_against_truth(backend, strided, m, torch.float32, distance="cosine")


def test_no_grad_forward_matches(backend):
    tensors, m = make_inputs(REALISTIC, mask="some", seed=15)
    xs = [t.float() for t in tensors]
    with run_on(backend, OP), torch.no_grad():
        loss = cycle_reconstruction_loss(*xs, mask=m, distance="l1")
    torch.testing.assert_close(loss, ref.cycle_reconstruction_loss(*tensors, mask=m, distance="l1").float())


# ---------------------------------------------------------------- gradcheck, opcheck

@pytest.mark.parametrize("reduction", ("mean", "none"))
@pytest.mark.parametrize("distance", DISTANCES)
def test_gradcheck(backend, distance, reduction):
    tensors, m = make_inputs((2, 3, 6), mask="some", seed=16)
    xs = [t.clone().requires_grad_() for t in tensors]

    def fn(*args):
        return cycle_reconstruction_loss(*args, mask=m, distance=distance, reduction=reduction,
                                         forward_weight=0.6, cycle_weight=1.7, beta=0.7)

    with run_on(backend, OP):
        assert torch.autograd.gradcheck(fn, xs)


def _opcheck_samples():
    out = []
    for i, (distance, mask, dtype) in enumerate((("mse", "none", torch.float32),
                                                  ("cosine", "some", torch.float64),
                                                  ("smooth_l1", "some", torch.float32),
                                                  ("l1", "all_excluded", torch.bfloat16))):
        tensors, m = make_inputs((2, 3, 9), mask=mask, seed=20 + i)
        xs = [t.to(dtype).requires_grad_() for t in tensors]
        out.append((xs, m, {"mse": 0, "l1": 1, "smooth_l1": 2, "cosine": 3}[distance]))
    return out


@pytest.mark.parametrize("sample_idx", range(4))
def test_opcheck_forward(backend, sample_idx):
    xs, m, code = _opcheck_samples()[sample_idx]
    with run_on(backend, OP):
        opcheck_kernel_op(torch.ops.robustmm.cycle_loss_forward, (backend, *xs, m, code, 0.5))


@pytest.mark.parametrize("need_grad", (15, 1, 2, 10, 0))
@pytest.mark.parametrize("sample_idx", range(4))
def test_opcheck_backward(backend, sample_idx, need_grad):
    xs, m, code = _opcheck_samples()[sample_idx]
    acc = torch.float64 if xs[0].dtype == torch.float64 else torch.float32
    grad_terms = torch.randn((2, *xs[0].shape[:-1]), dtype=acc)
    with run_on(backend, OP, backward=True):
        opcheck_kernel_op(torch.ops.robustmm.cycle_loss_backward,
                          (backend, grad_terms, *xs, m, code, 0.5, need_grad))


# ---------------------------------------------------------------- the backward kernel itself

def _raw_backward_truth(grad_terms, tensors, mask, distance, beta):
    """d sum(grad_terms * row_terms) / d inputs in fp64 by autograd: what the backward op must
    return for every input (the oracle for its raw outputs)."""
    xs = [t.detach().double().requires_grad_() for t in tensors]
    terms = ref_cycle_loss.row_terms(*xs, mask, distance, beta)
    g = grad_terms.double()
    if mask is not None:
        g = torch.where(mask, g, torch.zeros((), dtype=torch.float64))
    return torch.autograd.grad(terms, xs, g)


@pytest.mark.parametrize("mask", ("none", "some", "all_excluded"))
@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_backward_kernel_every_need_grad(backend, dtype, distance, mask):
    """cycle_loss_backward of this backend called directly, for all 16 need_grad masks, with NaN
    in the excluded rows of the inputs and of grad_terms: each wanted gradient against fp64
    autograd of the row terms (exact 0 at excluded rows, in the inputs' dtype), numel 0 for
    the others."""
    tensors, m = make_inputs(AWKWARD, mask=mask, seed=18)
    xs = [t.to(dtype) for t in poison(tensors, m)]
    code = DISTANCE_CODES[distance]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    gen = torch.Generator().manual_seed(19)
    grad_terms = torch.randn((2, *AWKWARD[:-1]), generator=gen, dtype=torch.float64)
    truth = _raw_backward_truth(grad_terms, [t.to(dtype).double() for t in tensors], m, distance,
                                0.5)
    gt = grad_terms.to(acc)
    if m is not None:
        gt[:, ~m] = float("nan")  # excluded rows: never read
    lowp = None
    if dtype in LOW_PRECISION:  # the reference backend's own error in this dtype
        lowp = _ReferenceKernel.cycle_loss_backward(gt, *xs, m, code, 0.5, 15)
    for need_grad in range(16):
        with run_on(backend, OP, backward=True):
            got = torch.ops.robustmm.cycle_loss_backward(backend, gt, *xs, m, code, 0.5, need_grad)
        assert len(got) == 4
        for i, (name, g, t) in enumerate(zip(NAMES, got, truth)):
            assert g.dtype == dtype, f"need_grad {need_grad}: d {name} is {g.dtype}"
            if not need_grad >> i & 1:
                assert g.numel() == 0, f"need_grad {need_grad}: d {name} was computed"
                continue
            assert torch.isfinite(g).all(), f"need_grad {need_grad}: d {name} not finite"
            if m is not None:
                assert (g[~m] == 0).all(), f"need_grad {need_grad}: d {name} at excluded rows"
            assert_close_dtype(g, t, f"need_grad {need_grad}: d {name}",
                               None if lowp is None else lowp[i])


# ---------------------------------------------------------------- torch.compile

def _loss_fn(fp, tg, cp, src, mask):
    return 0.5 * cycle_reconstruction_loss(fp, tg, cp, src, mask=mask, distance="smooth_l1",
                                           cycle_weight=2.0) + fp.mean()


@pytest.mark.parametrize("compiler", ("eager", "aot_eager", "inductor"))
def test_compile_fullgraph(backend, compiler):
    tensors, m = make_inputs(AWKWARD, mask="some", seed=30)
    torch._dynamo.reset()
    compiled = torch.compile(_loss_fn, backend=compiler, fullgraph=True)
    results = []
    for fn in (_loss_fn, compiled):
        xs = [t.float().requires_grad_() for t in tensors]
        with run_on(backend, OP):
            loss = fn(*xs, m)
            loss.backward()
        results.append((loss.detach(), [x.grad for x in xs]))
    torch.testing.assert_close(results[0][0], results[1][0])
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------- bad input

def _good():
    tensors, m = make_inputs(AWKWARD, mask="some")
    return [t.float() for t in tensors], m


@pytest.mark.parametrize("which", range(4))
def test_shape_mismatch_names_the_argument(which):
    xs, _ = _good()
    xs[which] = xs[which][..., :-1] if which else xs[which]
    if which == 0:
        xs[1] = xs[1][..., :-1]
    name = NAMES[which] if which else "target"
    with pytest.raises(ValueError, match=name):
        cycle_reconstruction_loss(*xs)


def test_dtype_mismatch():
    xs, _ = _good()
    xs[2] = xs[2].double()
    with pytest.raises(TypeError, match="cycle_pred"):
        cycle_reconstruction_loss(*xs)


def test_integer_input():
    xs, _ = _good()
    xs[0] = xs[0].long()
    with pytest.raises(TypeError, match="forward_pred"):
        cycle_reconstruction_loss(*xs)


@pytest.mark.parametrize("bad", ("shape", "dtype", "type"))
def test_bad_mask(bad):
    xs, m = _good()
    mask = {"shape": m[:, :-1], "dtype": m.float(), "type": m.tolist()}[bad]
    with pytest.raises(TypeError if bad != "shape" else ValueError, match="mask"):
        cycle_reconstruction_loss(*xs, mask=mask)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"distance": "huber"}, ValueError, "distance"),
    ({"reduction": "batchmean"}, ValueError, "reduction"),
    ({"beta": -0.1}, ValueError, "beta"),
    ({"forward_weight": -1.0}, ValueError, "forward_weight"),
    ({"cycle_weight": float("nan")}, ValueError, "cycle_weight"),
    ({"cycle_weight": float("inf")}, ValueError, "cycle_weight"),
    ({"forward_weight": "1"}, TypeError, "forward_weight"),
    ({"return_terms": 1}, TypeError, "return_terms"),
])
def test_bad_options(kwargs, error, match):
    xs, _ = _good()
    with pytest.raises(error, match=match):
        cycle_reconstruction_loss(*xs, **kwargs)


def test_zero_width_last_dim():
    xs = [torch.zeros(3, 0) for _ in range(4)]
    with pytest.raises(ValueError, match="D > 0"):
        cycle_reconstruction_loss(*xs)


def test_cpp_kernel_checks_its_arguments():
    """The C++ entry points reject bad input themselves (TORCH_CHECK), whoever calls them."""
    require_cpp()
    ops = torch.ops.robustmm_C
    xs, m = _good()
    with pytest.raises(ValueError, match="target"):
        ops.cycle_loss_forward(xs[0], xs[1][..., :-1], xs[2], xs[3], m, 0, 1.0)
    with pytest.raises(TypeError, match="source"):
        ops.cycle_loss_forward(xs[0], xs[1], xs[2], xs[3].double(), m, 0, 1.0)
    with pytest.raises(ValueError, match="mask"):
        ops.cycle_loss_forward(*xs, m[:, :-1], 0, 1.0)
    with pytest.raises(TypeError, match="mask"):
        ops.cycle_loss_forward(*xs, m.float(), 0, 1.0)
    with pytest.raises(ValueError, match="distance"):
        ops.cycle_loss_forward(*xs, m, 7, 1.0)
    with pytest.raises(ValueError, match="beta"):
        ops.cycle_loss_forward(*xs, m, 2, 0.0)
    with pytest.raises(TypeError, match="forward_pred"):
        ops.cycle_loss_forward(*(x.long() for x in xs), m, 0, 1.0)
    terms = ops.cycle_loss_forward(*xs, m, 0, 1.0)
    assert terms.shape == (2, *xs[0].shape[:-1]) and terms.dtype == torch.float32
    grad_terms = torch.ones_like(terms)
    with pytest.raises(ValueError, match="grad_terms"):
        ops.cycle_loss_backward(grad_terms[:, :-1], *xs, m, 0, 1.0, 15)
    with pytest.raises(TypeError, match="grad_terms"):
        ops.cycle_loss_backward(grad_terms.double(), *xs, m, 0, 1.0, 15)
    with pytest.raises(ValueError, match="need_grad"):
        ops.cycle_loss_backward(grad_terms, *xs, m, 0, 1.0, 16)
    with pytest.raises(ValueError, match="need_grad"):
        ops.cycle_loss_backward(grad_terms, *xs, m, 0, 1.0, -1)
    with pytest.raises(ValueError, match="cycle_pred"):
        ops.cycle_loss_backward(grad_terms, xs[0], xs[1], xs[2][..., :-1], xs[3], m, 0, 1.0, 15)
    with pytest.raises(TypeError, match="target"):
        ops.cycle_loss_backward(grad_terms, xs[0], xs[1].half(), xs[2], xs[3], m, 0, 1.0, 15)
    with pytest.raises(ValueError, match="mask"):
        ops.cycle_loss_backward(grad_terms, *xs, m[:, :-1], 0, 1.0, 15)
    with pytest.raises(ValueError, match="distance"):
        ops.cycle_loss_backward(grad_terms, *xs, m, 4, 1.0, 15)
    with pytest.raises(ValueError, match="beta"):
        ops.cycle_loss_backward(grad_terms, *xs, m, 2, 0.0, 15)
    assert not hasattr(ops, "cycle_loss_scale_")  # the in-place backward is gone


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_one_row_without_leading_dims(backend, reduction):
    """A (D,) input is one row; mean and sum reduce it to a scalar, none keeps the 0-dim row."""
    tensors, _ = make_inputs((37,), seed=40)
    check_against_truth(backend, tensors, None, torch.float32, distance="smooth_l1",
                        reduction=reduction)


def test_double_backward_raises(backend):
    """The backward has no derivative of its own: create_graph must fail loudly, not give 0."""
    tensors, m = make_inputs(AWKWARD, mask="some", seed=41)
    xs = [t.float().requires_grad_() for t in tensors]
    with run_on(backend, OP):
        loss = cycle_reconstruction_loss(*xs, mask=m)
        grads = torch.autograd.grad(loss, xs, create_graph=True)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(sum(g.sum() for g in grads), xs)
