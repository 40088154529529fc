"""robustmm_fast.nn.CycleTranslator and CycleConsistency: batched residual-autoencoder
translators + one fused cycle_reconstruction_loss call.

Every forward pass runs on a named backend (`run_on(backend, "cycle_loss")`); its values and
gradients are compared with a plain-PyTorch restatement of the layer -- one F.linear loop per
translator, one loop over modality pairs, the reference row distances -- built here from the
same parameters.
"""
from __future__ import annotations

import copy
import itertools
import os

import pytest
import torch
import torch.nn.functional as F

from robustmm_fast.nn import CycleConsistency, CycleTranslator
from robustmm_fast.reference.cycle_loss import row_distance

from conftest import require_cpp, run_on

D, WIDTHS, BLOCKS = 8, (6, 4), 2
B, L = 6, 3


@pytest.fixture(autouse=True)
def _cpp_kernel_built(request):
    """A stale extension without the cycle_loss kernel skips the cpp backend (fails in CI)."""
    if "backend" in request.fixturenames and request.getfixturevalue("backend") == "cpp":
        require_cpp("cycle_loss")


def _layer(M, seed=0, **kw) -> CycleConsistency:
    torch.manual_seed(seed)
    kw = {"widths": WIDTHS, "n_blocks": BLOCKS, **kw}
    return CycleConsistency(M, D, **kw).double()


def _z(M, shape=(B, L), seed=1, **kw):
    return torch.randn(M, *shape, D, generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64, **kw)


def _present(M, batch=B, seed=2):
    """Rows: all present, none, only modality 0, all but the last, then random."""
    p = torch.rand(batch, M, generator=torch.Generator().manual_seed(seed)) < 0.5
    p[0], p[1], p[2], p[3] = True, False, False, True
    p[2, 0], p[3, -1] = True, False
    return p


# ---------------------------------------------------------------- the restatement

def _net_index(M, shared, m, n):
    half = list(itertools.combinations(range(M), 2))
    if shared:
        return half.index((min(m, n), max(m, n)))
    return half.index((m, n)) if m < n else len(half) + half.index((n, m))


def _manual_layer(x, w, b, taps, mask):
    """One translator layer: F.linear per token, or F.conv1d over time (x (..., L, C))."""
    if w.dim() == 2:
        return F.linear(x, w, b)
    lead, L = x.shape[:-2], x.shape[-2]
    y = F.conv1d(x.reshape(-1, L, x.shape[-1]).transpose(1, 2), w, b, padding=taps // 2)
    y = y.transpose(1, 2).reshape(*lead, L, -1)
    return y if mask is None else torch.where(mask.unsqueeze(-1), y, 0)


def _manual_translate(tr: CycleTranslator, x, m, n, mask=None):
    """G_{m->n}(x): MMIN's / CyIN's ResidualAE with network (m, n)'s slices of the stacked
    weights (Conv1d layers when kernel_size > 1; mask (..., L) zeroes padding after each)."""
    t = _net_index(tr.num_modalities, tr.shared, m, n)
    E = len(tr.widths)
    W = [w[:, t] for w in tr.weight]
    Bs = [b[:, t] for b in tr.bias] if tr.bias is not None else [[None] * tr.n_blocks] * len(W)
    k = tr.kernel_size
    if mask is not None:
        x = torch.where(mask.unsqueeze(-1), x, 0)
    h = x
    for blk in range(tr.n_blocks):
        y = h
        for j in range(E):  # encoder D -> widths, LeakyReLU between layers
            y = _manual_layer(y, W[j][blk], Bs[j][blk], k, mask)
            y = F.leaky_relu(y) if j < E - 1 else y
        for j in range(E, 2 * E):  # decoder widths reversed -> D, ReLU between layers
            y = _manual_layer(y, W[j][blk], Bs[j][blk], 1 if j == 2 * E - 1 else k, mask)
            y = F.relu(y) if j < 2 * E - 1 else y
        h = h + y
    if tr.transition:
        tw = tr.transition_weight[:, t]
        tb = tr.transition_bias[:, t] if tr.transition_bias is not None else (None, None)
        h = _manual_layer(F.relu(_manual_layer(h, tw[0], tb[0], k, mask)), tw[1], tb[1], k, mask)
    return h


def _manual(layer: CycleConsistency, z, present, token_mask=None):
    """(loss, reconstructed, forward_term, cycle_term) by loops over pairs and targets."""
    M, tr = layer.num_modalities, layer.translator
    args = layer.loss_args
    dist = lambda a, b: row_distance(a, b, args["distance"], args["beta"])  # noqa: E731
    tail = (1,) * (z.dim() - 2)
    col = lambda m: present[:, m].view(-1, *tail)  # noqa: E731  (B, 1.., 1)
    keep = present.t().view(M, -1, *tail)
    if token_mask is not None:
        keep = keep & token_mask.unsqueeze(-1)
    z = torch.where(keep, z, 0)
    tmask = None if token_mask is None else token_mask.expand(z.shape[1:-1])
    rows, trans, cycles = {}, {}, {}  # rows: key -> (forward distance, cycle distance, row mask)
    for m, n in itertools.permutations(range(M), 2):
        f = trans[m, n] = _manual_translate(tr, z[m], m, n, tmask)
        c = cycles[m, n] = _manual_translate(tr, f, n, m, tmask)
        rows[m, n] = (dist(f, z[n]), dist(c, z[m]), present[:, m] & present[:, n])
    recon = []
    for n in range(M):
        srcs = [m for m in range(M) if m != n]
        count = sum(present[:, m].double() for m in srcs)
        def combine(parts):
            total = sum(torch.where(col(m), part, 0) for m, part in parts)
            if layer.combine == "mean":
                total = total / count.clamp_min(1).view(-1, *tail)
            return total
        total = combine([(m, trans[m, n]) for m in srcs])
        recon.append(torch.where(col(n), z[n], total))
        if layer.combination_loss:
            fd = dist(total, z[n])
            if layer.objective == "cyin":  # n -> k -> n through every present k, combined
                cd = dist(combine([(k, cycles[n, k]) for k in srcs]), z[n])
            else:
                cd = torch.zeros_like(fd)
            rows["comb", n] = (fd, cd, present[:, n] & (count >= 2))
    order = list(layer.pairs) + ([("comb", n) for n in range(M)] if layer.combination_loss else [])
    fw, cy, mask = (torch.stack([rows[k][i] for k in order]) for i in range(3))
    mask = mask.view(*mask.shape, *tail[1:]).expand(fw.shape)
    if token_mask is not None:
        mask = mask & token_mask
    fw, cy = torch.where(mask, fw, 0), torch.where(mask, cy, 0)
    if args["reduction"] == "sum":
        fw, cy = fw.sum(), cy.sum()
    elif args["reduction"] == "mean" and layer.objective == "cyin":  # mean of the term means
        terms = range(len(order))
        means = lambda x: [x[t].sum() / mask[t].sum() for t in terms if mask[t].any()]  # noqa: E731
        fw, cy = (torch.stack(means(x)).mean() if mask.any() else x.sum() * 0 for x in (fw, cy))
    elif args["reduction"] == "mean":  # "grouped": each group (pairs, combinations) pooled
        P = len(layer.pairs)
        def reduce(x):
            parts = [x[g].sum() / mask[g].sum().clamp_min(1) for g in (slice(0, P), slice(P, None))]
            return parts[0] + parts[1]
        fw, cy = reduce(fw), reduce(cy)
    loss = args["forward_weight"] * fw + args["cycle_weight"] * cy
    return loss, torch.stack(recon), fw.detach(), cy.detach()


def _check_against_manual(backend, layer, z, present, token_mask=None, check_grads=True):
    manual = copy.deepcopy(layer)
    z1 = z.detach().clone().requires_grad_()
    z2 = z.detach().clone().requires_grad_()
    with run_on(backend, "cycle_loss"):
        out = layer(z1, present, token_mask)
    want = _manual(manual, z2, present, token_mask)
    for name, a, b in zip(("loss", "reconstructed", "forward_term", "cycle_term"), out, want):
        torch.testing.assert_close(a, b, msg=lambda m: f"{name}: {m}")
    if not check_grads:
        return out
    gen = torch.Generator().manual_seed(5)
    g_loss = torch.randn(out.loss.shape, generator=gen, dtype=z.dtype)
    g_rec = torch.randn(out.reconstructed.shape, generator=gen, dtype=z.dtype)
    with run_on(backend, "cycle_loss"):
        torch.autograd.backward([out.loss, out.reconstructed], [g_loss, g_rec])
    torch.autograd.backward([want[0], want[1]], [g_loss, g_rec])
    torch.testing.assert_close(z1.grad, z2.grad)
    for (name, p), (_, q) in zip(layer.named_parameters(), manual.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=lambda m: f"grad of {name}: {m}")
    return out


# ---------------------------------------------------------------- translator

@pytest.mark.parametrize("shared", (False, True), ids=("per-direction", "shared"))
@pytest.mark.parametrize("M", (2, 3, 6))
def test_translator_pairs_and_batching(M, shared):
    """`pairs` order, and the batched pass (forward and reverse) equals one network at a time."""
    torch.manual_seed(0)
    tr = CycleTranslator(M, D, WIDTHS, BLOCKS, shared=shared).double()
    half = list(itertools.combinations(range(M), 2))
    assert tr.pairs == half + [(b, a) for a, b in half]
    assert tr.num_networks == len(half) * (1 if shared else 2)
    x = torch.randn(len(tr.pairs), B, L, D, dtype=torch.float64)
    fwd, rev = tr(x), tr(x, reverse=True)
    assert fwd.shape == rev.shape == x.shape
    for p, (m, n) in enumerate(tr.pairs):
        torch.testing.assert_close(fwd[p], _manual_translate(tr, x[p], m, n))
        torch.testing.assert_close(rev[p], _manual_translate(tr, x[p], n, m))
        torch.testing.assert_close(tr.translate(x[p], m, n), fwd[p])
        assert tr.network(m, n) == _net_index(M, shared, m, n)
    if shared:
        torch.testing.assert_close(fwd, rev)


def test_translator_residual_structure():
    """Zero decoder outputs make every block the identity; without the transition head the
    translator is then the identity, with it the head alone."""
    torch.manual_seed(0)
    tr = CycleTranslator(3, D, WIDTHS, BLOCKS, transition=False).double()
    with torch.no_grad():
        tr.weight[-1].zero_()
        tr.bias[-1].zero_()
    x = torch.randn(len(tr.pairs), 4, D, dtype=torch.float64)
    torch.testing.assert_close(tr(x), x)
    with torch.no_grad():  # one block's decoder adds a constant: x + b
        tr.bias[-1][0].fill_(0.5)
    torch.testing.assert_close(tr(x), x + 0.5)


@pytest.mark.parametrize("M", (2, 3, 6))
def test_parameter_counts(M):
    """Per direction: M(M-1) networks; shared: half as many. One network: K blocks of the
    mirrored MLP D -> widths -> D plus the transition head's two D x D linears."""
    dims = (D, *WIDTHS, *WIDTHS[-2::-1], D)
    one = BLOCKS * sum(i * o + o for i, o in zip(dims, dims[1:])) + 2 * (D * D + D)
    for shared, nets in ((False, M * (M - 1)), (True, M * (M - 1) // 2)):
        tr = CycleTranslator(M, D, WIDTHS, BLOCKS, shared=shared)
        assert sum(p.numel() for p in tr.parameters()) == nets * one
        layer = CycleConsistency(M, D, widths=WIDTHS, n_blocks=BLOCKS, shared=shared)
        assert sum(p.numel() for p in layer.parameters()) == nets * one
    bare = CycleTranslator(M, D, WIDTHS, BLOCKS, transition=False)
    assert sum(p.numel() for p in bare.parameters()) == M * (M - 1) * (one - 2 * (D * D + D))


def test_translator_init_like_linear():
    torch.manual_seed(0)
    tr = CycleTranslator(3, 32, (16, 8), 3)
    for w, b in zip(tr.weight, tr.bias):
        bound = w.shape[-1] ** -0.5
        assert w.abs().max() <= bound and b.abs().max() <= bound
        assert w.abs().max() > 0.9 * bound and w.std() > 0.5 * bound


# ---------------------------------------------------------------- layer vs restatement

@pytest.mark.parametrize("combine", ("sum", "mean"))
@pytest.mark.parametrize("shared", (False, True), ids=("per-direction", "shared"))
@pytest.mark.parametrize("M", (2, 3, 6))
def test_matches_manual(backend, M, shared, combine):
    """Loss, terms, reconstructions and every gradient (latents, all parameters) equal the
    loop restatement, with a batch holding all-present, all-absent, single-present,
    one-absent and random rows."""
    layer = _layer(M, shared=shared, combine=combine)
    _check_against_manual(backend, layer, _z(M), _present(M))


@pytest.mark.parametrize("objective", ("cyin", "grouped"))
@pytest.mark.parametrize("reduction", ("mean", "sum", "none"))
@pytest.mark.parametrize("distance", ("mse", "l1", "smooth_l1", "cosine"))
def test_distances_and_reductions(backend, distance, reduction, objective):
    layer = _layer(3, distance=distance, reduction=reduction, forward_weight=0.7,
                   cycle_weight=1.3, beta=0.5, objective=objective)
    out = _check_against_manual(backend, layer, _z(3), _present(3))
    if reduction == "none":  # P pair rows + M combination rows, per token
        assert out.loss.shape == out.forward_term.shape == (6 + 3, B, L)


@pytest.mark.parametrize("M", (2, 3))
def test_vectors_and_list_input(backend, M):
    """(B, D) latents (no token dim) and a list of M tensors work alike."""
    layer = _layer(M)
    z = _z(M, shape=(B,))
    _check_against_manual(backend, layer, z, _present(M))
    with run_on(backend, "cycle_loss"):
        a = layer(z, _present(M))
        b = layer(list(z.unbind(0)), _present(M))
    assert a.reconstructed.shape == (M, B, D)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_combination_rows(backend):
    """M >= 3 adds CyIN's sum-of-translations rows; M = 2 or combination_loss=False has the
    pair rows only. A combination row counts where its target and >= 2 sources are present."""
    z, present = _z(3), _present(3)
    with run_on(backend, "cycle_loss"):
        on = _layer(3, reduction="none")(z, present)
        off = _layer(3, reduction="none", combination_loss=False)(z, present)
        two = _layer(2, reduction="none")(z[:2], present[:, :2])
    assert on.loss.shape[0] == 9 and off.loss.shape[0] == 6 and two.loss.shape[0] == 2
    torch.testing.assert_close(on.loss[:6], off.loss)
    comb_rows = present & (present.sum(1, keepdim=True) - present.long() >= 2)  # (B, M)
    assert torch.equal(on.loss[6:].ne(0).any(-1), comb_rows.t())
    assert torch.equal(on.cycle_term[6:].ne(0).any(-1), comb_rows.t())  # cycles of the sums
    with run_on(backend, "cycle_loss"):
        grouped = _layer(3, reduction="none", objective="grouped")(z, present)
    assert not grouped.cycle_term[6:].any()  # the earlier objective: no combination cycles
    _check_against_manual(backend, _layer(3, combination_loss=False), z, present)


# ---------------------------------------------------------------- masks

def test_all_present_is_default(backend):
    layer = _layer(3)
    z = _z(3)
    with run_on(backend, "cycle_loss"):
        a = layer(z)
        b = layer(z, torch.ones(B, 3, dtype=torch.bool))
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert torch.equal(a.reconstructed, z)
    _check_against_manual(backend, layer, z, torch.ones(B, 3, dtype=torch.bool))


@pytest.mark.parametrize("shared", (False, True), ids=("per-direction", "shared"))
def test_all_absent(backend, shared):
    """No modality present: loss and terms 0, reconstructions 0, gradients 0, never NaN."""
    layer = _layer(3, shared=shared)
    z = _z(3, requires_grad=True)
    with torch.no_grad():
        z[:, :2] = float("nan")
    present = torch.zeros(B, 3, dtype=torch.bool)
    with run_on(backend, "cycle_loss"):
        out = layer(z, present)
        (out.loss + out.reconstructed.sum()).backward()
    assert out.loss.item() == 0 and out.forward_term.item() == 0 and out.cycle_term.item() == 0
    assert not out.reconstructed.any()
    assert not z.grad.any()
    for name, p in layer.named_parameters():
        assert p.grad is None or not p.grad.any(), name


@pytest.mark.parametrize("combine", ("sum", "mean"))
@pytest.mark.parametrize("M", (2, 3, 6))
def test_reconstruction_rule(backend, M, combine):
    """Present modalities are returned as they are; an absent one is its single present
    source's translation, or the sum (mean) of several; no present source gives zeros."""
    layer = _layer(M, combine=combine)
    tr = layer.translator
    z, present = _z(M), _present(M)
    with run_on(backend, "cycle_loss"):
        rec = layer(z, present).reconstructed
    for b in range(B):
        for n in range(M):
            if present[b, n]:
                assert torch.equal(rec[n, b], z[n, b])
                continue
            srcs = [m for m in range(M) if m != n and present[b, m]]
            if not srcs:
                assert not rec[n, b].any()
                continue
            parts = torch.stack([tr.translate(z[m, b], m, n) for m in srcs])
            want = parts.sum(0) if combine == "sum" else parts.mean(0)
            torch.testing.assert_close(rec[n, b], want)


def test_sum_vs_mean(backend):
    """With k present sources the sum is k times the mean; with one they agree."""
    z, present = _z(3), _present(3)
    with run_on(backend, "cycle_loss"):
        s = _layer(3, combine="sum")(z, present).reconstructed
        m = _layer(3, combine="mean")(z, present).reconstructed
    on = present.t().view(3, B, 1, 1)
    sources = present.sum(1).view(1, B, 1, 1) - on.long()  # (M, B, 1, 1) present sources
    torch.testing.assert_close(s, torch.where(on, m, m * sources.clamp_min(1)))
    assert torch.equal(torch.where(on, s, 0), torch.where(on, z, 0))


@pytest.mark.parametrize("shared", (False, True), ids=("per-direction", "shared"))
@pytest.mark.parametrize("M", (2, 3, 6))
def test_nan_in_absent_latents_does_not_leak(backend, M, shared):
    """NaN (or anything) in absent modalities' latents changes nothing: loss, terms,
    reconstructions and all gradients equal those with other values there, and are finite."""
    present = _present(M)
    absent = ~present.t().view(M, B, 1, 1)
    results = []
    for fill in (float("nan"), 3.0):
        layer = _layer(M, shared=shared)
        z = torch.where(absent, fill, _z(M)).requires_grad_()
        with run_on(backend, "cycle_loss"):
            out = layer(z, present)
            (out.loss + out.reconstructed.square().sum()).backward()
        grads = [p.grad for p in layer.parameters()]
        results.append((*out, z.grad, *grads))
    for a, b in zip(*results):
        assert torch.isfinite(a).all()
        assert torch.equal(a, b)
    assert not results[0][len(out)][absent.expand(M, B, L, D)].any(), "absent latents got a gradient"


def test_token_mask(backend):
    """Padding tokens (token_mask False) are excluded from the loss and zeroed before the
    translators: NaN there reaches nothing."""
    z, present = _z(3), _present(3)
    token_mask = torch.ones(B, L, dtype=torch.bool)
    token_mask[:, -1] = False
    token_mask[4, 1] = False
    z = torch.where(token_mask.unsqueeze(-1), z, float("nan"))
    out = _check_against_manual(backend, _layer(3), z, present, token_mask)
    assert torch.isfinite(out.reconstructed).all()


def test_gradients_reach_translators_and_latents(backend):
    M = 3
    layer = _layer(M).float()
    z = _z(M).float().requires_grad_()
    with run_on(backend, "cycle_loss"):
        layer(z).loss.backward()
    assert z.grad.abs().sum() > 0
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"no gradient reached {name}"


def test_gradcheck(backend):
    """Finite differences through translators and the fused op (float64, small)."""
    layer = _layer(3, widths=(3,), n_blocks=1, distance="smooth_l1")
    z = _z(3, shape=(3, 2), seed=7).requires_grad_()
    present = torch.tensor([[True, True, True], [True, False, True], [False, True, False]])

    def fn(z):
        out = layer(z, present)
        return out.loss, out.reconstructed

    with run_on(backend, "cycle_loss"):
        assert torch.autograd.gradcheck(fn, (z,), fast_mode=True)


# ---------------------------------------------------------------- torch.compile, state, args

@pytest.mark.parametrize("shared,compiler", [(False, "eager"), (False, "aot_eager"),
                                             (True, "aot_eager")])
def test_compile_fullgraph(backend, shared, compiler):
    """fullgraph compile gives eager's values and gradients; a new presence mask (same
    shapes) does not recompile."""
    if backend == "cpp" and os.environ.get("ROBUSTMM_CPU_CAPABILITY") == "default":
        pytest.skip("the compiled graph is backend-agnostic; cpp's native ISA copy covers it")
    torch._dynamo.reset()
    layer = _layer(3, shared=shared).float()
    compiled_layer = copy.deepcopy(layer)
    compiled = torch.compile(compiled_layer, backend=compiler, fullgraph=True)
    z, present = _z(3).float(), _present(3)
    results = []
    for module in (layer, compiled):
        zi = z.clone().requires_grad_()
        with run_on(backend, "cycle_loss"):
            out = module(zi, present)
            (out.loss + out.reconstructed.square().mean()).backward()
        results.append((*out, zi.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(b, a)
    for (name, p), (_, q) in zip(layer.named_parameters(), compiled_layer.named_parameters()):
        torch.testing.assert_close(q.grad, p.grad, msg=lambda m: f"grad of {name}: {m}")
    with torch._dynamo.config.patch(error_on_recompile=True), run_on(backend, "cycle_loss"):
        a = compiled(z.clone().requires_grad_(), ~present)
        b = layer(z.clone().requires_grad_(), ~present)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)


def test_state_dict_round_trip(backend):
    layer = _layer(3, seed=0, shared=True)
    state = layer.state_dict()
    assert all(k.startswith("translator.") for k in state)  # pair index buffers not saved
    clone = _layer(3, seed=1, shared=True)
    assert state.keys() == clone.state_dict().keys()
    assert not torch.equal(state["translator.weight.0"], clone.state_dict()["translator.weight.0"])
    clone.load_state_dict(state)
    z, present = _z(3), _present(3)
    with run_on(backend, "cycle_loss"):
        a, b = layer(z, present), clone(z, present)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    with pytest.raises(RuntimeError):  # per-direction has twice the networks
        _layer(3, shared=False).load_state_dict(state)


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_modalities=1, dim=4), "num_modalities"),
    (dict(num_modalities=True, dim=4), "num_modalities"),
    (dict(num_modalities=3, dim=0), "dim"),
    (dict(num_modalities=3, dim=4, n_blocks=0), "n_blocks"),
    (dict(num_modalities=3, dim=4, widths=()), "widths"),
    (dict(num_modalities=3, dim=4, widths=(4, 0)), "widths"),
    (dict(num_modalities=3, dim=4, combine="max"), "combine"),
    (dict(num_modalities=3, dim=4, distance="l2"), "distance"),
    (dict(num_modalities=3, dim=4, reduction="avg"), "reduction"),
    (dict(num_modalities=3, dim=4, cycle_weight=-1.0), "cycle_weight"),
    (dict(num_modalities=3, dim=4, forward_weight=float("nan")), "forward_weight"),
    (dict(num_modalities=3, dim=4, beta=-0.5), "beta"),
    (dict(num_modalities=3, dim=4, objective="pairs"), "objective"),
    (dict(num_modalities=3, dim=4, kernel_size=2), "kernel_size"),
    (dict(num_modalities=3, dim=4, kernel_size=0), "kernel_size"),
])
def test_bad_constructor_args(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CycleConsistency(**kwargs)


def test_bad_forward_input():
    layer = _layer(3)
    z = _z(3)
    with pytest.raises(ValueError, match="latents"):
        layer(z[:2])
    with pytest.raises(ValueError, match="latents"):
        layer(torch.randn(3, B, L, D + 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="present"):
        layer(z, torch.ones(B, 2, dtype=torch.bool))
    with pytest.raises(TypeError, match="present"):
        layer(z, torch.ones(B, 3))
    with pytest.raises(TypeError, match="token_mask"):
        layer(z, None, torch.ones(B, L))
    with pytest.raises(ValueError, match="shape"):
        layer.translator(torch.randn(5, B, D, dtype=torch.float64))


def test_extra_repr():
    text = repr(CycleConsistency(3, D, widths=WIDTHS, n_blocks=BLOCKS, shared=True, combine="mean"))
    assert "shared=True" in text and "'mean'" in text and f"widths={WIDTHS}" in text


# ---------------------------------------------------------------- CyIN's official translators

def _official_rae(tr: CycleTranslator, t: int, x):
    """CyIN's ResidualAE.forward written as the official code does it (channels first,
    x (N, D, L); x_in accumulates x_out; transition(x_in + x_out)), on network t's weights."""
    E = len(tr.widths)

    def conv(h, w):  # nn.Conv1d(bias=False, padding=k // 2); kernel 1 is stored as (out, in)
        w = w if w.dim() == 3 else w.unsqueeze(-1)
        return F.conv1d(h, w, padding=w.shape[-1] // 2)
    x_in, x_out = x, torch.zeros_like(x)
    for blk in range(tr.n_blocks):
        x_in = x_in + x_out
        h = x_in
        for j in range(E):
            h = conv(h, tr.weight[j][blk, t])
            h = F.leaky_relu(h) if j < E - 1 else h  # "delete the activation of the last layer"
        for j in range(E, 2 * E):
            h = conv(h, tr.weight[j][blk, t])
            h = F.relu(h) if j < 2 * E - 1 else h
        x_out = h
    tw = tr.transition_weight[:, t]
    return conv(F.relu(conv(x_in + x_out, tw[0])), tw[1])


@pytest.mark.parametrize("kernel", (3, 1))
def test_cyin_official_objective_nine_plus_nine(backend, kernel):
    """CyIN's TRANSLATE_loss for complete l, a, v, restated term by term from the official code
    (models/generationBased/CyIN.py, generation_stage branch): 6 pair + 3 sum forward terms and
    the same 9 cycle terms, each nn.MSELoss, each sum weighted 1/9; netRAE_LA / LV / AV shared
    by both directions. The layer with the official settings gives the same value and grads."""
    torch.manual_seed(0)
    layer = CycleConsistency(3, D, widths=WIDTHS, n_blocks=BLOCKS, shared=True, combine="sum",
                             kernel_size=kernel, bias=False).double()
    tr = layer.translator
    zl, za, zv = _z(3).unbind(0)  # (B, L, D) each
    z = torch.stack([zl, za, zv]).requires_grad_()
    with run_on(backend, "cycle_loss"):
        out = layer(z)
        out.loss.backward()
    got_grad = z.grad.clone()
    z.grad = None
    zl, za, zv = (x.transpose(1, 2) for x in z.unbind(0))  # official layout (N, D, L)
    LA, LV, AV = (lambda x, t=t: _official_rae(tr, t, x) for t in range(3))  # pairs (0,1),(0,2),(1,2)
    mse = F.mse_loss
    a_l, v_l = LA(za), LV(zv)
    l_a, v_a = LA(zl), AV(zv)
    l_v, a_v = LV(zl), AV(za)
    forward = (mse(a_l, zl) + mse(v_l, zl) + mse(a_l + v_l, zl) + mse(l_a, za) + mse(v_a, za)
               + mse(l_a + v_a, za) + mse(l_v, zv) + mse(a_v, zv) + mse(l_v + a_v, zv)) / 9
    a_l_r, v_l_r = LA(l_a), LV(l_v)
    l_a_r, v_a_r = LA(a_l), AV(a_v)
    l_v_r, a_v_r = LV(v_l), AV(v_a)
    cycle = (mse(a_l_r, zl) + mse(v_l_r, zl) + mse(a_l_r + v_l_r, zl) + mse(l_a_r, za)
             + mse(v_a_r, za) + mse(l_a_r + v_a_r, za) + mse(l_v_r, zv) + mse(a_v_r, zv)
             + mse(l_v_r + a_v_r, zv)) / 9
    want = forward + cycle
    torch.testing.assert_close(out.loss, want)
    torch.testing.assert_close(out.forward_term, forward.detach())
    torch.testing.assert_close(out.cycle_term, cycle.detach())
    want.backward()
    torch.testing.assert_close(got_grad, z.grad)


def test_temporal_kernel_sees_neighbours_and_respects_padding():
    """kernel_size 3: a token's translation depends on its neighbours (not with kernel 1); a
    sequence padded at the end (token mask) translates as the unpadded one, whatever the padding
    holds; parameters are Conv1d-shaped, no bias."""
    torch.manual_seed(0)
    tr = CycleTranslator(3, D, WIDTHS, BLOCKS, shared=True, kernel_size=3, bias=False).double()
    assert tr.bias is None and tr.transition_bias is None
    assert tr.weight[0].shape == (BLOCKS, 3, WIDTHS[0], D, 3) and tr.weight[-1].shape[-1] == 1
    dims = (D, *WIDTHS, *WIDTHS[-2::-1], D)
    taps = [3] * (len(dims) - 2) + [1]
    one = BLOCKS * sum(i * o * k for i, o, k in zip(dims, dims[1:], taps)) + 2 * D * D * 3
    assert sum(p.numel() for p in tr.parameters()) == 3 * one
    x = torch.randn(6, 2, 5, D, dtype=torch.float64)
    y = tr(x)
    x2 = x.clone()
    x2[:, :, 3] += 1.0  # change token 3: token 2 (a neighbour) moves, so does token 0 via depth
    assert not torch.allclose(tr(x2)[:, :, 2], y[:, :, 2])
    for p in range(6):
        torch.testing.assert_close(y[p], _manual_translate(tr, x[p], *tr.pairs[p]))
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    padded = x.clone()
    padded[:, 1, 3:] = float("nan")
    out = tr(padded, mask=mask)
    torch.testing.assert_close(out[:, 0], tr(x[:, :1])[:, 0])
    torch.testing.assert_close(out[:, 1, :3], tr(x[:, 1:2, :3])[:, 0])
    assert not out[:, 1, 3:].any()


@pytest.mark.parametrize("shared", (False, True), ids=("per-direction", "shared"))
def test_matches_manual_conv_translators(backend, shared):
    """The layer with CyIN's Conv1d translators (kernel 3, no bias) and a token mask equals the
    loop restatement (values and every gradient)."""
    z, present = _z(3), _present(3)
    token_mask = torch.ones(B, L, dtype=torch.bool)
    token_mask[1:3, -1] = False
    layer = _layer(3, shared=shared, kernel_size=3, bias=False)
    _check_against_manual(backend, layer, z, present, token_mask)
