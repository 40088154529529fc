"""MIM (models/mim.py): shapes and loss terms for M = 1, 2, 3, 6 on vector and padded sequence
data, absent/padded values inert (NaN included), the hard-concrete gate and the UPN restated,
the fusions restated, KGS (intra, alpha weights, teacher, inter) restated, the two optimizers'
gradient routing and step restated, the fused and reference backends agreeing on a training
step, the config round trip with the official-quirks flag, argument validation, and CLI smoke
trains on Handwritten and the MMSA format.

Fidelity to the official code (github.com/zengy268/MIM, issue 13), each restated from its source
with file:line: the MulT token encoder, the text's Conv1d-only path, the train script's loss_kd
(10 alpha_t)^2 inter loss and its Adjuster weights, the main losses reaching the gates and the
encoders through them, the two Adams (the main one over every parameter) and their step, the
unmasked padding, and the `mosi` preset's numbers against README.md's configuration."""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

import robustmm_fast
from robustmm_fast import _backend, cli
from robustmm_fast.models import MIM, MIMRecipe
from robustmm_fast.models.mim import (OFFICIAL_QUIRKS, OUR_QUIRKS, gate_loss, hard_concrete,
                                      kgs_alpha, main_loss)
from robustmm_fast.models.registry import default_config, get_method

from conftest import assert_inert, require_cpp
from test_cyin import HW6, make_data, present_mask
from test_data import mmsa_dict, write_pkl

# small widths, no dropout: every test model builds and steps in milliseconds
SMALL = {"hidden": 8, "heads": 2, "layers": 1, "dropout": 0.0}
DATA = {  # name: (shapes, padded, task)
    "vec1": ({"a": (1, 5)}, (), "classification"),
    "vec2": ({"a": (1, 5), "b": (1, 3)}, (), "classification"),
    "vec6": (HW6, (), "classification"),
    "seq2_padded": ({"a": (6, 4), "b": (5, 3)}, ("a", "b"), "classification"),
    "seq3_unequal": ({"text": (7, 8), "audio": (5, 4), "vision": (6, 5)},
                     ("text", "audio", "vision"), "regression"),
}


pytestmark = pytest.mark.usefixtures("one_thread")


def data(name: str):
    shapes, padded, task = DATA[name]
    return make_data(shapes, padded=padded, task=task)


def build(ds, **over) -> MIM:
    torch.manual_seed(0)
    return get_method("mim").build(ds, {**SMALL, **over})


def batch(ds, n=12, seed=1, dtype=None):
    b = ds.batch(torch.arange(n), present_mask(n, ds.num_modalities, seed=seed))
    if dtype is not None:
        b.inputs.update({m: x.to(dtype) for m, x in b.inputs.items()})
    return b


def run(model, b, seed=0, **kw):
    torch.manual_seed(seed)  # the gate noise (and dropout)
    return model(b.inputs, b.present, labels=b.labels, padding=b.padding, stage="main", **kw)


def valid_mask(b, i, m):
    L = b.inputs[m].shape[1]
    v = b.present[:, i, None].expand(-1, L)
    return v & ~b.padding[m] if m in b.padding else v


def uniform_noise(b, seed=7):
    g = torch.Generator().manual_seed(seed)
    return {m: torch.rand(x.shape[:2], generator=g, dtype=x.dtype) * 0.98 + 0.01
            for m, x in b.inputs.items()}


# ---------------------------------------------------------------- shapes and losses

@pytest.mark.parametrize("name", DATA)
def test_shapes_and_every_loss_term(name):
    ds = data(name)
    names = ds.modalities
    model = build(ds).train()
    b = batch(ds)
    out = run(model, b)
    if ds.task == "classification":
        assert out.logits.shape == (12, 3) and out.prediction is None
    else:
        assert out.prediction.shape == (12,) and out.logits is None
    want = (["task"] + [f"uni_{m}" for m in names] + ["intra", "inter", "gate_l0"]
            + [f"gate_uni_{m}" for m in names])
    assert list(out.losses) == want
    assert out.extras["gate_terms"] == ("gate_l0",) + tuple(f"gate_uni_{m}" for m in names)
    for k, v in out.losses.items():
        assert v.shape == () and torch.isfinite(v), k
    torch.testing.assert_close(out.loss, gate_loss(out.losses) + main_loss(out.losses))
    for i, m in enumerate(names):
        L = ds.seq_lens[m]
        assert out.extras["gates"][m].shape == out.extras["gate_logits"][m].shape == (12, L)
        assert out.extras["tokens"][m].shape == (12, L, 8)
        assert out.extras["purified"][m].shape == out.extras["ungated"][m].shape == (12, 8)
        g = out.extras["gates"][m]
        assert set(g.unique().tolist()) <= {0.0, 1.0}
        assert not g[~valid_mask(b, i, m)].any()      # padded steps and absent samples: 0
    assert out.extras["l0"].shape == (len(names),) and out.extras["alpha"].shape == (len(names),)
    model.zero_grad(set_to_none=True)
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    inference = model.eval()(b.inputs, b.present, padding=b.padding)
    assert inference.losses == {} and torch.isfinite(inference.output).all()


# ---------------------------------------------------------------- absent / padded values are inert

def _loss_output_grads(model, inputs, b, seed):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model(inputs, b.present, labels=b.labels, padding=b.padding, stage="main")
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.output.detach(), out.loss.detach(), grads


@pytest.mark.parametrize("name", ["vec6", "seq2_padded", "seq3_unequal"])
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("fusion,official", [("product", False), ("concat", False),
                                             ("product", True)])
def test_absent_and_padded_values_never_reach_output_or_gradients(name, mode, fusion, official):
    """Also official=True: padded steps are then processed as steps (mask_padding False), but
    their values are zeroed first, so their content stays inert."""
    ds = data(name)
    model = build(ds, fusion=fusion, conv_kernel=3, official=official).train(mode == "train")
    b = batch(ds)
    hidden = {}
    for i, m in enumerate(ds.modalities):
        hidden[m] = (~valid_mask(b, i, m))[..., None].expand_as(b.inputs[m])
    garbage = {m: torch.where(hidden[m], torch.full_like(x, 1e3), x) for m, x in b.inputs.items()}
    nans = {m: torch.where(hidden[m], torch.full_like(x, float("nan")), x)
            for m, x in b.inputs.items()}
    assert_inert(_loss_output_grads(model, garbage, b, seed=3),
                 _loss_output_grads(model, nans, b, seed=3))


@pytest.mark.parametrize("fusion", ["product", "add", "concat"])
@pytest.mark.parametrize("name", ["vec2", "seq3_unequal"])
def test_all_absent_batch_is_finite(name, fusion):
    ds = data(name)
    model = build(ds, fusion=fusion).train()
    b = ds.batch(torch.arange(4), torch.zeros(4, ds.num_modalities, dtype=torch.bool))
    b.inputs.update({m: torch.full_like(x, float("nan")) for m, x in b.inputs.items()})
    out = run(model, b)
    assert torch.isfinite(out.output).all() and torch.isfinite(out.loss)
    assert not out.extras["available"].any() and int(out.extras["teacher"]) == -1
    for k in ["intra", "inter", "gate_l0"] + [k for k in out.losses if "uni_" in k]:
        assert out.losses[k] == 0, k
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


# ---------------------------------------------------------------- the gate

def _restated_gate(a, u, T=1 / 3, gamma=-0.2, zeta=1.0, thr=0.6):
    """Hard concrete written out: (hard gate, stretched sb, d sb / d a)."""
    s = 1.0 / (1.0 + torch.exp(-(torch.log(u / (1 - u)) + a) / T)) if u is not None \
        else 1.0 / (1.0 + torch.exp(-a))
    stretched = s * (zeta - gamma) + gamma
    sb = torch.minimum(torch.maximum(stretched, torch.zeros_like(s)), torch.ones_like(s))
    inside = (stretched > 0) & (stretched < 1)
    ds_da = s * (1 - s) * (zeta - gamma) / (T if u is not None else 1.0)
    return (sb > thr).to(a.dtype), sb, torch.where(inside, ds_da, torch.zeros_like(ds_da))


@pytest.mark.parametrize("sample", [True, False])
def test_hard_concrete_values_gradient_and_l0(sample):
    g = torch.Generator().manual_seed(0)
    a = (torch.randn(5, 7, generator=g, dtype=torch.float64) * 2 + 1).requires_grad_()
    u = torch.rand(5, 7, generator=g, dtype=torch.float64) * 0.98 + 0.01
    valid = torch.rand(5, 7, generator=g) > 0.3
    valid[0] = False  # a row with no valid step
    gates, l0 = hard_concrete(a, valid, sample=sample, u=u if sample else None)
    hard, sb, ds_da = _restated_gate(a.detach(), u if sample else None)
    assert torch.equal(gates.detach(), torch.where(valid, hard, torch.zeros_like(hard)))
    assert 0 < hard[valid].mean() < 1  # both kinds of gate occur
    # straight-through: the value is the hard gate, the gradient d sb / d a (0 outside valid)
    w = torch.randn(5, 7, generator=g, dtype=torch.float64)
    (grad,) = torch.autograd.grad((w * gates).sum(), a)
    torch.testing.assert_close(grad, torch.where(valid, w * ds_da, torch.zeros_like(w)))
    # L0 = mean over the valid steps of P[gate != 0] = sigmoid(a - T log(-gamma / zeta))
    p = torch.sigmoid(a.detach() - (1 / 3) * math.log(0.2))
    torch.testing.assert_close(l0, p[valid].mean())
    # deterministic gates: open iff 1.2 sigmoid(a) - 0.2 > 0.6, i.e. a > log 2
    det, _ = hard_concrete(a, valid, sample=False)
    assert torch.equal(det.detach().bool(), valid & (a.detach() > math.log(2)))
    _, none = hard_concrete(a, torch.zeros_like(valid), sample=True)
    assert none == 0


def test_hard_concrete_draws_its_noise_from_torch_rng():
    a, valid = torch.zeros(64, 8), torch.ones(64, 8, dtype=torch.bool)
    torch.manual_seed(1)
    g1, _ = hard_concrete(a, valid, sample=True)
    torch.manual_seed(1)
    u = torch.rand(64, 8) * (1 - 2e-6) + 1e-6
    g2, _ = hard_concrete(a, valid, sample=True, u=u)
    assert torch.equal(g1, g2)
    # a = 0: P[open] = P[(logistic noise) / T > log 2] = sigmoid(-T log 2) ~ 0.44
    assert abs(g1.mean().item() - 1 / (1 + 2 ** (1 / 3))) < 0.08
    with pytest.raises(ValueError, match="noise"):
        hard_concrete(a, valid, sample=True, u=torch.rand(3))


@pytest.mark.parametrize("name", ["seq2_padded", "vec2"])
def test_model_gates_and_purified_vectors_restated(name):
    """Gate logits = bottleneck(score(BiLSTM(tokens)) zeroed off the valid steps) + 3; gates =
    hard concrete of them with the given noise; purified = mean_valid(g t), ungated =
    mean_valid(t); gate_l0 = 0.1 * sum of the per-modality L0."""
    ds = data(name)
    model = build(ds).train()
    b = batch(ds)
    noise = uniform_noise(b)
    out = run(model, b, gate_noise=noise)
    l0s = []
    for i, m in enumerate(ds.modalities):
        v = valid_mask(b, i, m)
        t = out.extras["tokens"][m]
        assert not t[~v].any()
        upn = model.upn[m]
        h, _ = upn.lstm(t)
        score = torch.where(v, upn.score(h).squeeze(-1), torch.zeros(()))
        a = upn.bottleneck(score) + 3.0
        torch.testing.assert_close(out.extras["gate_logits"][m], a)
        hard, _, _ = _restated_gate(a, noise[m])
        gates = torch.where(v, hard, torch.zeros(()))
        assert torch.equal(out.extras["gates"][m], gates)
        count = v.sum(1, keepdim=True).clamp(min=1)
        torch.testing.assert_close(out.extras["purified"][m], (gates[..., None] * t).sum(1) / count)
        torch.testing.assert_close(out.extras["ungated"][m], t.sum(1) / count)
        p = torch.sigmoid(a - (1 / 3) * math.log(0.2))
        l0s.append(p[v].mean() if v.any() else torch.zeros(()))
    torch.testing.assert_close(out.extras["l0"], torch.stack(l0s).detach())
    torch.testing.assert_close(out.losses["gate_l0"], 0.1 * torch.stack(l0s).sum())


def test_gates_are_deterministic_in_eval_unless_stochastic_test():
    ds = data("seq2_padded")
    b = batch(ds)
    det = build(ds).eval()
    o1 = det(b.inputs, b.present, padding=b.padding)
    o2 = det(b.inputs, b.present, padding=b.padding)
    assert torch.equal(o1.output, o2.output)
    for i, m in enumerate(ds.modalities):
        a = o1.extras["gate_logits"][m]
        want = valid_mask(b, i, m) & (1.2 * torch.sigmoid(a) - 0.2 > 0.6)
        assert torch.equal(o1.extras["gates"][m].bool(), want)
    sto = build(ds, stochastic_test=True, gate_bias=0.0).eval()
    s1, s2 = (sto(b.inputs, b.present, padding=b.padding) for _ in range(2))
    assert any(not torch.equal(s1.extras["gates"][m], s2.extras["gates"][m])
               for m in ds.modalities)
    noise = uniform_noise(b)
    s3 = sto(b.inputs, b.present, padding=b.padding, gate_noise=noise)
    for i, m in enumerate(ds.modalities):
        hard, _, _ = _restated_gate(s3.extras["gate_logits"][m], noise[m])
        assert torch.equal(s3.extras["gates"][m], torch.where(valid_mask(b, i, m), hard, 0.0))


# ---------------------------------------------------------------- fusion

@pytest.mark.parametrize("fusion", ["product", "add", "concat"])
def test_fusion_restated(fusion):
    """product: tanh(W prod_m v_m) with an unavailable m as 1; add: sum with 0; concat:
    tanh(W [v_1 .. v_M]) with 0 blocks; then the output layer. Rows 0 (nothing present) and
    the sample whose modality 'a' has no valid step (row 0 of the data) included."""
    ds = data("seq3_unequal")
    model = build(ds, fusion=fusion).eval()
    b = batch(ds)
    out = model(b.inputs, b.present, padding=b.padding)
    avail = out.extras["available"]
    assert torch.equal(avail, torch.stack([valid_mask(b, i, m).any(1)
                                           for i, m in enumerate(ds.modalities)], 1))
    vs = [out.extras["purified"][m] for m in ds.modalities]
    if fusion == "product":
        z = torch.ones_like(vs[0])
        for i, v in enumerate(vs):
            z = z * torch.where(avail[:, i, None], v, torch.ones_like(v))
        h = torch.tanh(model.fuse(z))
    elif fusion == "add":
        h = sum(torch.where(avail[:, i, None], v, torch.zeros_like(v)) for i, v in enumerate(vs))
        assert model.fuse is None
    else:
        h = torch.tanh(model.fuse(torch.cat([torch.where(avail[:, i, None], v, 0.0)
                                             for i, v in enumerate(vs)], -1)))
    torch.testing.assert_close(out.prediction, model.out_layer(h).squeeze(-1))


# ---------------------------------------------------------------- KGS

def test_kgs_alpha_on_hand_numbers():
    losses = torch.tensor([1.0, 2.0, 3.0])
    lam = losses / 6
    prods = torch.stack([(1 + lam[[1, 2]]).prod(), (1 + lam[[0, 2]]).prod(),
                         (1 + lam[[0, 1]]).prod()])                # 2, 7/4, 14/9
    want = 3 * prods / prods.sum()
    torch.testing.assert_close(kgs_alpha(losses, torch.ones(3, dtype=torch.bool)), want)
    torch.testing.assert_close(want, torch.tensor([1.130890, 0.989529, 0.879581]))
    assert want.argmax() == losses.argmin()  # the lowest loss gets the largest weight
    # an inactive modality: weight 0, the others over the active set, summing to S = 2
    active = torch.tensor([True, False, True])
    lam = torch.tensor([1 / 4, 0.0, 3 / 4])
    want = 2 * torch.stack([1 + lam[2], torch.tensor(0.0), 1 + lam[0]]) / (2 + lam[0] + lam[2])
    got = kgs_alpha(losses, active)
    torch.testing.assert_close(got, want)
    assert got.sum().item() == pytest.approx(2.0)
    torch.testing.assert_close(kgs_alpha(torch.zeros(3), torch.ones(3, dtype=torch.bool)),
                               torch.ones(3))
    assert kgs_alpha(torch.ones(3), torch.zeros(3, dtype=torch.bool)).eq(0).all()


def _ce(y, labels, keep):
    return F.cross_entropy(y[keep], labels[keep]) if keep.any() else torch.zeros(())


@pytest.mark.parametrize("weighting", ["student", "teacher"])
def test_intra_and_inter_losses_restated(weighting):
    ds = data("vec6")
    # gate_bias 0.6: some gates closed (deterministic gates open iff logit > log 2)
    model = build(ds, inter_weighting=weighting, intra_weight=0.5, inter_weight=2.0,
                  gate_bias=0.6).eval()
    b = batch(ds, n=16)
    out = model(b.inputs, b.present, labels=b.labels, padding=b.padding)
    names, avail = ds.modalities, out.extras["available"]
    assert 0 < torch.cat([g[avail[:, i]] for i, g in enumerate(out.extras["gates"].values())]) \
        .mean() < 1
    lg, intra = [], torch.zeros(())
    for i, m in enumerate(names):
        k = avail[:, i]
        yg = model.heads[m](out.extras["purified"][m])
        yu = model.heads[m](out.extras["ungated"][m])
        lg_m, lu_m = _ce(yg, b.labels, k), _ce(yu, b.labels, k)
        torch.testing.assert_close(out.losses[f"uni_{m}"], lu_m)
        torch.testing.assert_close(out.losses[f"gate_uni_{m}"], lg_m)
        mse = ((yg - yu) ** 2).mean(1)[k].mean() if k.any() else torch.zeros(())
        intra = intra + (mse if lg_m != lu_m else 0.0)  # the teacher side is detached
        lg.append(lg_m.detach())
    torch.testing.assert_close(out.losses["intra"], 0.5 * intra)
    active = avail.any(0)
    teacher = min((i for i in range(6) if active[i]), key=lambda i: lg[i].item())
    assert int(out.extras["teacher"]) == teacher and out.losses["intra"] > 0
    alpha = kgs_alpha(torch.stack(lg), active)
    torch.testing.assert_close(out.extras["alpha"], alpha)
    vt = out.extras["purified"][names[teacher]]
    kls = []
    for i, m in enumerate(names):
        if i == teacher or not active[i]:
            continue
        both = avail[:, i] & avail[:, teacher]
        kl = F.kl_div(F.log_softmax(out.extras["purified"][m][both], -1),
                      F.softmax(vt[both], -1), reduction="batchmean") if both.any() else 0.0
        kls.append((alpha[i], kl))
    if weighting == "student":
        want = sum(a * kl for a, kl in kls)
    else:  # the official loss_kd: (10 alpha_teacher)^2 times the mean of the students' KLs
        want = (10 * alpha[teacher]) ** 2 * sum(kl for _, kl in kls) / len(kls)
    torch.testing.assert_close(out.losses["inter"], 2.0 * want)


def test_intra_teacher_is_the_better_view_and_detached():
    """Only the worse view's output gets the intra gradient (checked on the head's input)."""
    ds = data("vec6")
    model = build(ds, inter_weight=0.0, gate_bias=0.6).eval()
    b = batch(ds)
    out = model(b.inputs, b.present, labels=b.labels)
    checked = 0
    for m in ds.modalities:
        vg, vu = out.extras["purified"][m], out.extras["ungated"][m]
        gg, gu = torch.autograd.grad(out.losses["intra"], [vg, vu], retain_graph=True,
                                     allow_unused=True)
        lg, lu = out.losses[f"gate_uni_{m}"], out.losses[f"uni_{m}"]
        if lg < lu:    # gated view teaches: no gradient into it
            assert gg is None or not gg.any()
            assert gu is not None and gu.abs().sum() > 0
        elif lg > lu:
            assert gu is None or not gu.any()
            assert gg is not None and gg.abs().sum() > 0
        checked += bool(lg != lu)
    assert checked >= 2


# ---------------------------------------------------------------- the two optimizers

def _groups(model):
    gate = model.gate_parameters()
    ids = {id(p) for p in gate}
    return [p for p in model.parameters() if id(p) not in ids], gate


def test_optimizers_partition_the_parameters():
    ds = data("seq2_padded")
    model = build(ds)
    opts = MIMRecipe({}).optimizers(model)
    assert set(opts) == {"main", "gate"}
    params = {n: {id(p) for g in o.param_groups for p in g["params"]} for n, o in opts.items()}
    assert not params["main"] & params["gate"]
    assert params["main"] | params["gate"] == {id(p) for p in model.parameters()}
    assert params["gate"] == {id(p) for p in model.upn.parameters()}
    r = MIMRecipe({"lr": 1e-3, "gate_lr": 5e-3})
    opts = r.optimizers(model)
    assert opts["main"].param_groups[0]["lr"] == 1e-3 and opts["gate"].param_groups[0]["lr"] == 5e-3
    assert MIMRecipe({"lr": 2e-3}).optimizers(model)["gate"].param_groups[0]["lr"] == 2e-3
    with pytest.raises(ValueError, match="gate_parameters"):
        r.optimizers(torch.nn.Linear(2, 2))
    # official (gates_from_main): train.py:62 Adam(self.model.parameters()) -- every parameter,
    # the UPN included; train.py:66-68 Adam over the l/a/v masks (the UPN)
    official = build(ds, official=True)
    opts = MIMRecipe({}).optimizers(official)
    params = {n: [id(p) for g in o.param_groups for p in g["params"]] for n, o in opts.items()}
    assert params["main"] == [id(p) for p in official.parameters()]
    assert params["gate"] == [id(p) for p in official.upn.parameters()]


@pytest.mark.parametrize("from_main", [False, True])
def test_each_loss_group_reaches_only_its_parameters(from_main):
    """Ours: gate terms -> UPN only; main terms -> every other parameter. gates_from_main
    (official): the main terms reach the UPN too; the gate terms may then reach the encoders
    through the UPN's live input, a gradient the recipe never takes (autograd.grad w.r.t. the
    UPN only), as the official optimizer_model.zero_grad() discards it (train.py:145)."""
    ds = data("seq2_padded")
    model = build(ds, gates_from_main=from_main).train()
    out = run(model, batch(ds))
    main, gate = _groups(model)
    g_gate_main = torch.autograd.grad(gate_loss(out.losses), main, retain_graph=True,
                                      allow_unused=True)
    if not from_main:
        assert all(g is None or not g.any() for g in g_gate_main)
    g_gate_gate = torch.autograd.grad(gate_loss(out.losses), gate, retain_graph=True,
                                      allow_unused=True)
    assert sum(g.abs().sum() for g in g_gate_gate if g is not None) > 0
    g_main_gate = torch.autograd.grad(main_loss(out.losses), gate, retain_graph=True,
                                      allow_unused=True)
    reached = sum(g.abs().sum() for g in g_main_gate if g is not None)
    assert (reached > 0) if from_main else (reached == 0)
    g_main_main = torch.autograd.grad(main_loss(out.losses), main, allow_unused=True)
    assert sum(g.abs().sum() for g in g_main_main if g is not None) > 0


def _adamw_first_step(p, g, lr, wd):
    """AdamW's first step written out: p (1 - lr wd) - lr g / (|g| + eps)."""
    return p * (1 - lr * wd) - lr * g / (g.abs() + 1e-8)


@pytest.mark.parametrize("official", [False, True])
def test_train_step_equals_per_group_gradients_and_adamw(official):
    """recipe.train_step == autograd.grad of each group's sum w.r.t. its own parameters (both
    computed on the same forward before any step), then each AdamW's first step written out.
    official (train.py:140-150): the main Adam steps EVERY parameter with the main terms'
    gradient (the UPN's included: it reaches them through the live gates), then the UPN Adam
    steps the UPN with the gate terms' gradient -- two updates of the UPN per step."""
    ds = data("seq3_unequal")
    model = build(ds, official=official).double().train()
    ref = copy.deepcopy(model)
    recipe = MIMRecipe({"lr": 1e-2, "gate_lr": 3e-2, "weight_decay": 0.1})
    opts = recipe.optimizers(model)
    b = batch(ds, dtype=torch.float64)
    torch.manual_seed(4)
    logged = recipe.train_step(model, b, opts, epoch=0, step=0, stage="main")
    out = run(ref, b, seed=4)
    assert logged["loss"] == pytest.approx(out.loss.item(), rel=1e-12)
    assert logged.keys() == {"loss", *out.losses}
    main, gate = _groups(ref)
    new_main, new_gate = _groups(model)
    gate_ids = {id(p) for p in gate}
    g_gate = torch.autograd.grad(gate_loss(out.losses), gate, retain_graph=True,
                                 allow_unused=True)
    assert sum(g is not None for g in g_gate) > 0
    if not official:
        g_main = torch.autograd.grad(main_loss(out.losses), main, allow_unused=True)
        for params, new, grads, lr in ((main, new_main, g_main, 1e-2),
                                       (gate, new_gate, g_gate, 3e-2)):
            for p, q, g in zip(params, new, grads):
                if g is None:
                    assert q.grad is None and torch.equal(q, p)
                    continue
                torch.testing.assert_close(q.grad, g, rtol=1e-10, atol=1e-12)
                want = _adamw_first_step(p.detach(), g, lr, 0.1)
                torch.testing.assert_close(q.detach(), want, rtol=1e-10, atol=1e-12)
        return
    every = list(ref.parameters())
    g_main = torch.autograd.grad(main_loss(out.losses), every, allow_unused=True)
    reached = [g for p, g in zip(every, g_main) if id(p) in gate_ids and g is not None]
    assert reached and sum(g.abs().sum() for g in reached) > 0   # the gates see the main losses
    gate_grad = {id(p): g for p, g in zip(gate, g_gate)}
    for p, q, g in zip(every, model.parameters(), g_main):
        want = p.detach() if g is None else _adamw_first_step(p.detach(), g, 1e-2, 0.1)
        if id(p) in gate_ids and gate_grad[id(p)] is not None:   # then the UPN Adam's step
            want = _adamw_first_step(want, gate_grad[id(p)], 3e-2, 0.1)
        torch.testing.assert_close(q.detach(), want, rtol=1e-10, atol=1e-12)


def test_zero_gate_terms_leave_the_gates_unchanged():
    """With every gate term weighted 0 (and no weight decay) a step changes no UPN parameter
    while the main parameters move: the UPN is updated only through the gate optimizer's
    terms. Several steps in a row: no in-place / stale-graph error."""
    ds = data("seq2_padded")
    model = build(ds, l0_weight=0.0, unimodal_weight=0.0).train()
    before = copy.deepcopy(model)
    recipe = MIMRecipe({"weight_decay": 0.0})
    opts = recipe.optimizers(model)
    b = batch(ds)
    for step in range(3):
        logged = recipe.train_step(model, b, opts, epoch=0, step=step, stage="main")
        assert math.isfinite(logged["loss"])
    main, gate = _groups(model)
    main0, gate0 = _groups(before)
    assert all(torch.equal(p, q) for p, q in zip(gate, gate0))
    assert any(not torch.equal(p, q) for p, q in zip(main, main0))
    model2 = build(ds).train()  # default weights: the gates move too
    gate0 = [p.detach().clone() for p in model2.gate_parameters()]
    MIMRecipe({}).train_step(model2, b, MIMRecipe({}).optimizers(model2), epoch=0, step=0,
                             stage="main")
    assert any(not torch.equal(p, q) for p, q in zip(model2.gate_parameters(), gate0))


def test_recipe_stage_and_arguments():
    r = MIMRecipe({"epochs": 3, "modality_dropout": 0.3})
    assert [r.stage(e) for e in range(3)] == ["main"] * 3 and all(r.selects(e) for e in range(3))
    g = torch.Generator().manual_seed(0)
    p = r.augment(torch.ones(64, 3, dtype=torch.bool), epoch=0, stage="main", generator=g)
    assert p.any(1).all() and not p.all()
    with pytest.raises(ValueError, match="stage"):
        r.train_step(None, None, {}, epoch=0, step=0, stage="warmup")
    for key, value in (("gate_lr", 0.0), ("lr", -1.0), ("weight_decay", -1.0),
                       ("grad_clip", -1.0), ("modality_dropout", 1.0), ("epochs", 0)):
        with pytest.raises(ValueError, match=key.split("_")[0] if key == "epochs" else key):
            MIMRecipe({key: value})


# ---------------------------------------------------------------- backends

@pytest.mark.parametrize("name", ["seq3_unequal", "seq2_padded"])
def test_fused_and_reference_backends_agree_on_a_training_step(name):
    """One recipe step (forward, backward, both AdamWs) in float64 on the cpp and reference
    backends from the same model and the same seed (the same gate noise): the same losses and
    parameters afterwards, and the fused masked attention really ran on cpp."""
    require_cpp("masked_attention")
    ds = data(name)
    base = build(ds, layers=2).double().train()
    b = batch(ds, dtype=torch.float64)
    results = {}
    for backend in ("reference", "cpp"):
        model = copy.deepcopy(base)
        recipe = MIMRecipe({"lr": 1e-3})
        opts = recipe.optimizers(model)
        calls = _backend.backend_calls[("masked_attention", backend)]
        with robustmm_fast.use_backend(backend):
            torch.manual_seed(5)
            logged = {k: float(v) for k, v in recipe.train_step(  # 0-d tensors -> floats
                model, b, opts, epoch=0, step=0, stage="main").items()}
        assert robustmm_fast.last_backend("masked_attention") == backend
        assert _backend.backend_calls[("masked_attention", backend)] > calls
        results[backend] = (logged, dict(model.named_parameters()))
    (lr, pr), (lc, pc) = results["reference"], results["cpp"]
    assert lr.keys() == lc.keys()
    for k in lr:
        assert lc[k] == pytest.approx(lr[k], rel=1e-9, abs=1e-12), k
    for n in pr:
        torch.testing.assert_close(pc[n], pr[n], rtol=1e-9, atol=1e-11,
                                   msg=lambda m, n=n: f"{n}: {m}")


# ---------------------------------------------------------------- config

def test_config_round_trip_and_official_flag():
    method = get_method("mim")
    ds = make_data(HW6)
    d = default_config("mim")
    assert (d["gate_bias"], d["temperature"], d["gamma"], d["zeta"], d["threshold"],
            d["l0_weight"], d["intra_weight"], d["inter_weight"], d["fusion"]) == \
        (3.0, 1 / 3, -0.2, 1.0, 0.6, 0.1, 1.0, 1.0, "product")
    ours = method.build(ds, SMALL)
    official = method.build(ds, {**SMALL, "official": True})
    got = lambda m: {k: getattr(m, k) for k in OFFICIAL_QUIRKS}  # noqa: E731
    assert got(ours) == OUR_QUIRKS and got(official) == OFFICIAL_QUIRKS
    mixed = method.build(ds, {**SMALL, "official": True, "inter_weighting": "student"})
    assert mixed.inter_weighting == "student" and mixed.stochastic_test  # explicit wins
    for bad in ({"no_such_key": 1},):
        with pytest.raises(ValueError, match="no_such_key"):
            method.build(ds, bad)
        with pytest.raises(ValueError, match="no_such_key"):
            method.recipe(bad)
    assert list(method.build(ds, {**SMALL, "gate_bottleneck": None}).upn["fac"].bottleneck[0]
                .weight.shape) == [1, 1]                       # max(1, L // 5) for L = 1
    seq = make_data({"a": (12, 3)})
    assert method.build(seq, SMALL).upn["a"].bottleneck[0].out_features == 2    # 12 // 5
    assert method.build(seq, {**SMALL, "gate_bottleneck": 4}).upn["a"].bottleneck[0] \
        .out_features == 4


@pytest.mark.parametrize("key,value", [
    ("hidden", 0), ("hidden", 6), ("layers", -1), ("heads", 0), ("conv_kernel", 2),
    ("gate_bottleneck", 0), ("dropout", 1.0), ("attn_dropout", -0.1), ("embed_dropout", 1.5),
    ("out_dropout", 1.0), ("temperature", 0.0), ("gamma", 0.1), ("zeta", 0.0),
    ("threshold", 1.0), ("gate_bias", float("nan")), ("fusion", "max"),
    ("pool_activation", "gelu"), ("l0_weight", -1.0), ("intra_weight", float("inf")),
    ("inter_weight", -0.5), ("unimodal_weight", -1.0), ("inter_weighting", "both"),
    ("stochastic_test", "yes"), ("gates_from_main", 1), ("mask_padding", "no"),
    ("mult_encoder", 0),
    ("official", "yes"), ("regression_loss", "huber"), ("conv_only", "fac"),
    ("conv_only", [1])])
def test_bad_arguments_raise_naming_them(key, value):
    ds = make_data(HW6)
    with pytest.raises(ValueError, match=key if key != "hidden" or value == 0 else "heads"):
        get_method("mim").build(ds, {**SMALL, "heads": 4 if key == "hidden" else SMALL["heads"],
                                     key: value})


def test_stage_and_gate_noise_arguments():
    ds = data("vec2")
    model = build(ds)
    b = batch(ds)
    with pytest.raises(ValueError, match="stage"):
        model(b.inputs, b.present, stage="warmup")
    with pytest.raises(ValueError, match="gate_noise"):
        model(b.inputs, b.present, gate_noise={"zzz": torch.rand(12, 1)})


def test_single_modality_and_pool_activation():
    ds = data("vec1")
    for act in ("tanh", "relu"):
        model = build(ds, pool_activation=act).eval()
        b = batch(ds)
        out = model(b.inputs, b.present, labels=b.labels)
        assert out.losses["inter"] == 0 and torch.isfinite(out.loss)
        v, t = out.extras["purified"]["a"], out.extras["tokens"]["a"]
        fn = torch.tanh if act == "tanh" else torch.relu
        torch.testing.assert_close(v, fn(out.extras["gates"]["a"][..., None] * t).sum(1))


# ---------------------------------------------------------------- fidelity to the official code
# Each expectation below is restated from github.com/zengy268/MIM (HEAD 08df574), file:line.

def test_mosi_preset_is_the_official_configuration():
    """The expected values are typed from the official sources, not from our registry."""
    want = {
        # README.md:37-41 (global_configs.DefaultConfigs): lr 1e-5, d_l 80, n_epochs 100,
        # train_batch_size 16
        "lr": 1e-5, "hidden": 80, "epochs": 100, "batch_size": 16,
        # train.py:62, 66-68: both optimizers Adam(..., lr=config.lr): one lr, no weight decay;
        # no clipping anywhere in train.py
        "gate_lr": None, "weight_decay": 0.0, "grad_clip": 0.0,
        # model.py:76, 106: nn.Conv1d(DIM, d_l, kernel_size=3, stride=1, padding=1, bias=False)
        "conv_kernel": 3,
        # model.py:82-88 and 112-118: TransformerEncoder(num_heads=5, layers=3, attn_dropout=0.5,
        # relu_dropout=0.3, res_dropout=0.3, embed_dropout=0.2)
        "heads": 5, "layers": 3, "attn_dropout": 0.5, "dropout": 0.3, "embed_dropout": 0.2,
        # model.py:65-69: the text is BERT's sequence output through proj_l only
        "conv_only": ["text"],
        # model.py:134: HardConcrete(beta=1/3, gamma=-0.2, zeta=1.0, fix_temp=True, loc_bias=3);
        # model.py:158: hard gate at clipped_s > 0.6
        "temperature": 1 / 3, "gamma": -0.2, "zeta": 1.0, "gate_bias": 3.0, "threshold": 0.6,
        # model.py:173, 187-189: Linear(L, L // 5), ReLU, Linear(L // 5, L)
        "gate_bottleneck": None,
        # model.py:227, 234, 239: 'multiplication' -> tanh(linear_mul(l * a * v)) -> Linear(d, 1)
        "fusion": "product", "out_dropout": 0.0,
        # train.py:75 self.weight = 1 on loss_unmasked/loss_masked/loss_inter (lines 119, 120,
        # 132), loss_intra unweighted (126), p_w = 0.1 on the penalty (98, 102)
        "unimodal_weight": 1.0, "intra_weight": 1.0, "inter_weight": 1.0, "l0_weight": 0.1,
        # utils/loss.py:16: nn.L1Loss() for every task loss
        "regression_loss": "l1",
        # train.py:82-95: every batch has all three modalities
        "modality_dropout": 0.0,
    }
    got = default_config("mim", "mosi")
    assert {k: got[k] for k in want} == want
    ds = make_data({"text": (6, 8), "audio": (6, 4), "vision": (6, 5)}, task="regression")
    model = get_method("mim").build(ds, {**got, "official": True})
    assert (model.stochastic_test, model.inter_weighting, model.gates_from_main,
            model.mask_padding, model.mult_encoder) == (True, "teacher", True, False, True)
    assert len(model.encoders["text"].layers) == 0 and len(model.encoders["audio"].layers) == 3
    assert model.upn["audio"].bottleneck[0].out_features == 6 // 5
    recipe = get_method("mim").recipe(got)
    assert (recipe.lr, recipe.gate_lr, recipe.weight_decay, recipe.epochs,
            recipe.batch_size) == (1e-5, 1e-5, 0.0, 100, 16)


def _official_token_encoder(enc, x):
    """A_Encoder.forward (model.py:91-99) with MulT's TransformerEncoder (transformer.py:49-90,
    133-165), MultiheadAttention (multihead_attention:53-137) and positions (position_embedding:
    8-27, 45-76) in eval mode, on our module's parameters, sequence-first as there.
    x (B, L, D) -> (B, L, H)."""
    x_in = F.conv1d(x.transpose(1, 2), enc.conv.weight, padding=1).permute(2, 0, 1)  # (L, B, H)
    L, B, H = x_in.shape
    half = H // 2
    emb = math.log(10000) / (half - 1)
    emb = torch.exp(torch.arange(half, dtype=torch.float) * -emb)
    emb = torch.arange(L + 1, dtype=torch.float).unsqueeze(1) * emb.unsqueeze(0)
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)
    emb[0, :] = 0                                            # padding_idx = 0
    first = x_in.transpose(0, 1)[:, :, 0]                    # make_positions' input (B, L)
    positions = torch.where(first != 0, torch.arange(1, L + 1).expand(B, L), 0)
    x = math.sqrt(H) * x_in + emb[positions].transpose(0, 1)
    for layer in enc.layers:
        residual = x
        h = layer.attn_norm(x)
        heads = layer.attn.num_heads
        d = H // heads
        q, k, v = F.linear(h, layer.attn.in_proj_weight, layer.attn.in_proj_bias).chunk(3, -1)
        q = (q * d ** -0.5).contiguous().view(L, B * heads, d).transpose(0, 1)
        k = k.contiguous().view(L, B * heads, d).transpose(0, 1)
        v = v.contiguous().view(L, B * heads, d).transpose(0, 1)
        w = F.softmax(torch.bmm(q, k.transpose(1, 2)), dim=-1)
        a = torch.bmm(w, v).transpose(0, 1).contiguous().view(L, B, H)
        x = residual + layer.attn.out_proj(a)
        residual = x
        x = residual + layer.fc2(F.relu(layer.fc1(layer.ffn_norm(x))))
    return enc.norm(x).transpose(0, 1)


def test_token_encoder_is_the_official_a_encoder():
    """mult_encoder (official): sqrt(H) scale, positions skipped where the first conv
    channel is exactly 0, pre-norm layers with a 4H FFN, final LayerNorm; MulT's xavier init
    of out_proj and the FFN (multihead_attention:42-51, transformer.py:190-195)."""
    g = torch.Generator().manual_seed(0)
    H = 80
    ds = make_data({"a": (7, 6), "b": (7, 3)}, padded=("a",), task="regression")
    model = build(ds, hidden=H, heads=5, layers=2, conv_kernel=3, official=True).eval()
    enc = model.encoders["a"]
    assert enc.layers[0].fc1.out_features == 4 * H
    bound = 1 / math.sqrt(H)                # nn.Linear's default init bound; xavier: sqrt(6/2H)
    assert enc.layers[0].attn.out_proj.weight.abs().max() > 1.3 * bound
    assert enc.layers[0].fc1.bias.eq(0).all()
    ours = build(ds, hidden=H, heads=5, layers=2, conv_kernel=3).encoders["a"]
    assert not ours.mult and ours.layers[0].fc1.out_features == 2 * H   # ours: mult_encoder False
    x = torch.randn(3, 7, 6, generator=g)
    x[0, 3:] = 0      # zero steps: step 3 still sees step 2 through the kernel, 4.. are 0
    with torch.no_grad():
        got = enc(x, None)
        want = _official_token_encoder(enc, x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # and inside the model (official: no padding mask, every step a step)
    b = ds.batch(torch.arange(3), torch.ones(3, 2, dtype=torch.bool))
    with torch.no_grad():
        out = model(b.inputs, b.present, padding=b.padding)
        zeroed = b.inputs["a"].masked_fill(b.padding["a"][..., None], 0)
        want = _official_token_encoder(enc, zeroed)
    torch.testing.assert_close(out.extras["tokens"]["a"], want, rtol=1e-5, atol=1e-5)


def test_conv_only_modality_is_the_official_text_path():
    """L_Encoder (model.py:65-69): proj_l(outputs) is the token sequence; pooled = mean act."""
    ds = data("seq3_unequal")
    model = build(ds, conv_only=["text"], conv_kernel=3, pool_activation="tanh",
                  official=True).eval()
    enc = model.encoders["text"]
    assert len(enc.layers) == 0 and enc.norm is None
    assert set(n for n, _ in enc.named_parameters()) == {"conv.weight"}
    assert build(ds, conv_only=["text", "no_such_modality"]).conv_only == ("text",)
    b = batch(ds)
    out = model(b.inputs, b.present, padding=b.padding)
    x = b.inputs["text"].masked_fill(b.padding["text"][..., None], 0)
    c = F.conv1d(x.transpose(1, 2), enc.conv.weight, padding=1).transpose(1, 2)
    c = torch.where(b.present[:, 0, None, None], c, 0.0)
    torch.testing.assert_close(out.extras["tokens"]["text"], c)
    torch.testing.assert_close(out.extras["ungated"]["text"], torch.tanh(c).mean(1))


def test_official_padding_is_processed_as_zero_steps():
    """utils/data_preparation.py:38-51 zero-pads to max_seq_length and nothing downstream
    masks it (attn_mask False, model.py:89; AdaptiveAvgPool1d over all steps, model.py:97, 200;
    penalty.mean() over all, model.py:153). mask_padding False (official): the model on padded
    data equals the model on the zero-filled inputs without any padding mask."""
    ds = data("seq3_unequal")
    model = build(ds, official=True).train()
    assert not model.mask_padding
    b = batch(ds)
    noise = uniform_noise(b)
    o1 = run(model, b, gate_noise=noise)
    zeroed = {m: x.masked_fill(b.padding[m][..., None], 0) for m, x in b.inputs.items()}
    torch.manual_seed(0)
    o2 = model(zeroed, b.present, labels=b.labels, padding=None, gate_noise=noise)
    assert torch.equal(o1.output, o2.output)
    assert all(torch.equal(o1.losses[k], o2.losses[k]) for k in o1.losses)
    pad_gates = torch.cat([o1.extras["gates"][m][b.present[:, i, None] & b.padding[m]]
                           for i, m in enumerate(ds.modalities)])
    assert pad_gates.numel() and pad_gates.any()           # padded steps are gated, not 0
    ours = build(ds).train()                               # ours: padded steps are excluded
    o3 = run(ours, b, gate_noise=noise)
    assert all(not o3.extras["gates"][m][b.padding[m]].any() for m in ds.modalities)


def test_official_inter_loss_is_the_train_scripts_loss_kd():
    """The official inter term for modalities l, a, v written out as train.py:45-50 (loss_kd),
    129-132 and utils/loss.py:41-54 (Adjuster's commented body) compute it: lambda_m = L_m^g /
    total, alpha_l = 3 (1 + lambda_a)(1 + lambda_v) / denominator (and cyclically), the teacher
    the modality whose gated loss is below both others', loss_kd(teacher.detach(), s1, s2,
    alpha_teacher) = 0.5 (10 alpha_teacher)^2 (KL(s1) + KL(s2)) with KLDivLoss(batchmean).
    Our default ("student", sum_s alpha_s KL_s) on the same forward is >= 50x weaker here: for
    M = 3, (10 a_t)^2 mean_s KL / sum_s a_s KL_s >= 50 a_t >= 50 (a_t the largest alpha >= 1)."""
    ds = make_data({"l": (1, 6), "a": (1, 4), "v": (1, 5)}, task="regression", n=16)
    model = build(ds, official=True).eval()   # no dropout; the official gates still sample
    b = ds.batch(torch.arange(16), torch.ones(16, 3, dtype=torch.bool))
    noise = uniform_noise(b)
    out = model(b.inputs, b.present, labels=b.labels, gate_noise=noise)
    masked_l, masked_a, masked_v = (out.extras["purified"][m] for m in "lav")
    loss_fct = torch.nn.L1Loss()                                   # utils/loss.py:16
    label_ids = b.labels
    loss_l_masked = loss_fct(model.heads["l"](masked_l).view(-1), label_ids.view(-1))
    loss_a_masked = loss_fct(model.heads["a"](masked_a).view(-1), label_ids.view(-1))
    loss_v_masked = loss_fct(model.heads["v"](masked_v).view(-1), label_ids.view(-1))
    total_loss = loss_a_masked.item() + loss_v_masked.item() + loss_l_masked.item()
    lambda_a = loss_a_masked.item() / total_loss
    lambda_l = loss_l_masked.item() / total_loss
    lambda_v = loss_v_masked.item() / total_loss
    denominator = (1 + lambda_a) * (1 + lambda_l) + (1 + lambda_v) * (1 + lambda_l) + \
        (1 + lambda_a) * (1 + lambda_v)
    alpha_l = 3 * ((1 + lambda_a) * (1 + lambda_v)) / denominator
    alpha_a = 3 * ((1 + lambda_l) * (1 + lambda_v)) / denominator
    alpha_v = 3 * ((1 + lambda_l) * (1 + lambda_a)) / denominator

    def loss_kd(teacher, student1, student2, alpha_l):
        soft_loss = torch.nn.KLDivLoss(reduction="batchmean")
        temp = 10
        temp = temp * alpha_l
        KD_loss = (soft_loss(F.log_softmax(student1, dim=1), F.softmax(teacher, dim=1))
                   + soft_loss(F.log_softmax(student2, dim=1), F.softmax(teacher, dim=1))) \
            * temp * temp
        return KD_loss * 0.5

    loss_l_inter = loss_kd(masked_l.detach(), masked_a, masked_v, alpha_l) * \
        (loss_l_masked < loss_a_masked) * (loss_l_masked < loss_v_masked)
    loss_a_inter = loss_kd(masked_a.detach(), masked_l, masked_v, alpha_a) * \
        (loss_a_masked < loss_l_masked) * (loss_a_masked < loss_v_masked)
    loss_v_inter = loss_kd(masked_v.detach(), masked_l, masked_a, alpha_v) * \
        (loss_v_masked < loss_l_masked) * (loss_v_masked < loss_a_masked)
    loss_inter = torch.mean(loss_l_inter + loss_a_inter + loss_v_inter) * 1   # self.weight = 1
    assert loss_inter > 0
    torch.testing.assert_close(out.losses["inter"], loss_inter)
    torch.testing.assert_close(out.extras["alpha"],
                               torch.tensor([alpha_l, alpha_a, alpha_v], dtype=torch.float32))
    vs = [masked_l, masked_a, masked_v]
    got = torch.autograd.grad(out.losses["inter"], vs, retain_graph=True, allow_unused=True)
    want = torch.autograd.grad(loss_inter, vs, retain_graph=True, allow_unused=True)
    for g, w in zip(got, want):
        if w is None:
            assert g is None or not g.any()
        else:
            torch.testing.assert_close(g, w)
    ours = build(ds, official=True, inter_weighting="student").eval()
    weaker = ours(b.inputs, b.present, labels=b.labels, gate_noise=noise).losses["inter"]
    assert out.losses["inter"] / weaker >= 50 * (1 - 1e-5)


def test_official_main_losses_reach_the_gates_and_through_them_the_encoders():
    """train.py:145-150: optimizer_model (every parameter) steps on loss_unmasked + loss_inter
    + loss_intra + loss_cls, computed from masked_* = act(x * gate) with the straight-through
    hard-concrete gate of a UPN whose input x is the encoder output, not detached
    (model.py:192-200). So the main losses' gradient reaches (a) the UPN's parameters and (b)
    the encoders also through the UPN's input. Ours by default: neither."""
    ds = data("seq3_unequal")
    b = batch(ds)
    for official in (True, False):
        model = build(ds, official=official).train()
        out = run(model, b)
        g = torch.autograd.grad(main_loss(out.losses), list(model.upn.parameters()),
                                allow_unused=True)
        reached = sum(x.abs().sum() for x in g if x is not None)
        assert (reached > 0) == official, official
    model = build(ds, official=True).train()
    enc = list(model.encoders.parameters())

    def encoder_grads(cut_upn_input):
        hooks = [u.register_forward_pre_hook(lambda mod, args: (args[0].detach(), args[1]))
                 for u in model.upn.values()] if cut_upn_input else []
        try:
            out = run(model, b)
            return torch.autograd.grad(main_loss(out.losses), enc, allow_unused=True)
        finally:
            for h in hooks:
                h.remove()

    live, cut = encoder_grads(False), encoder_grads(True)
    assert sum((x - y).abs().sum() for x, y in zip(live, cut) if x is not None) > 0


# ---------------------------------------------------------------- CLI smoke trains

def test_cli_train_on_handwritten(tmp_path):
    out = tmp_path / "hw"
    assert cli.main(["train", "--method", "mim", "--data", "handwritten", "--seeds", "1111",
                     "--out", str(out), "--no-progress", "--protocol", "complete+eta:0.5",
                     "--set", "epochs=2"]) == 0
    result = json.loads((out / "results.json").read_text())
    acc = result["per_seed"]["mim"]["1111"]
    assert acc["complete"]["accuracy"] > 0.5  # 2 epochs already learn most of it
    assert acc["eta:0.5"]["accuracy"] > 0.3


def test_cli_train_on_mmsa_format(tmp_path):
    path = write_pkl(tmp_path / "unaligned_50.pkl", mmsa_dict(aligned=False))
    out = tmp_path / "mmsa"
    args = ["train", "--method", "mim", "--data", f"mmsa:{path}", "--seeds", "1111",
            "--out", str(out), "--no-progress", "--protocol", "complete+eta:0.5",
            "--set", "epochs=2", "--set", "batch_size=2"]
    for k, v in {**SMALL, "conv_kernel": 3}.items():
        args += ["--set", f"{k}={json.dumps(v)}"]
    assert cli.main(args) == 0
    result = json.loads((out / "results.json").read_text())
    points = result["per_seed"]["mim"]["1111"]
    assert set(points) == {"complete", "eta:0.5"}
    assert all(v["MAE"] == v["MAE"] for v in points.values())  # finite, not NaN
