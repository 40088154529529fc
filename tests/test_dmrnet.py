"""DMRNet (models/dmrnet.py): shapes and finite loss terms, absent inputs (NaN) inert, fused vs
reference backend on one eval-mode step (z = mu), the recipe's combination sampling, warm-up
accumulation and hard set, the variance mechanism on synthetic data with a weak and a strong
modality, and a CLI smoke train on Handwritten."""
from __future__ import annotations

import json

import pytest
import torch

from robustmm_fast import cli
from robustmm_fast.data import make_synthetic
from robustmm_fast.models import DMRNet, DMRNetRecipe
from robustmm_fast.models.dmrnet import combination_codes
from robustmm_fast.models.registry import default_config, get_method
from robustmm_fast.train import fit

from conftest import assert_steps_agree, forward_backward_on, require_cpp
from test_cyin import present_mask
from test_data import mmsa_dict, write_pkl

SMALL = {"hidden": 16, "latent_dim": 8, "dropout": 0.0}


pytestmark = pytest.mark.usefixtures("one_thread")


def data(M=3, task="classification", n=48, seq=False):
    shapes = {m: ((4 if seq else 1), 6) for m in "abc"[:M]}
    return make_synthetic(num_samples=n, modalities=shapes, task=task, num_classes=3,
                          random_lengths=seq, seed=0)


def build(ds, **over) -> DMRNet:
    torch.manual_seed(0)
    return get_method("dmrnet").build(ds, {**SMALL, **over})


def run(model, b, seed=0, **kw):
    torch.manual_seed(seed)
    return model(b.inputs, b.present, labels=b.labels, padding=b.padding, **kw)


@pytest.mark.parametrize("task,seq", [("classification", False), ("regression", True)])
def test_shapes_and_finite_losses(task, seq):
    ds = data(3, task, seq=seq)
    model = build(ds).train()
    b = ds.batch(torch.arange(16), present_mask(16, 3))
    hard = torch.zeros(8, dtype=torch.bool)
    hard[[1, 6]] = True
    out = run(model, b, stage="hard", hard=hard)
    assert out.output.shape == ((16, 3) if task == "classification" else (16,))
    assert list(out.losses) == ["task", "kl", "hard"]
    assert all(torch.isfinite(v) for v in out.losses.values())
    assert out.losses["kl"] > 0 and out.losses["hard"] > 0
    assert torch.equal(out.extras["combination"], combination_codes(b.present))
    assert out.extras["variance"].shape == (16,) and (out.extras["variance"] > 0).all()
    out.loss.backward()
    # no hard sample in the batch: the hard term is exactly 0
    none = run(model, b, stage="hard", hard=torch.zeros(8, dtype=torch.bool))
    assert none.losses["hard"] == 0
    assert "hard" not in run(model, b, stage="warmup").losses
    with pytest.raises(ValueError, match="hard"):
        run(model, b, hard=torch.zeros(4, dtype=torch.bool))


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_absent_inputs_never_reach_output_or_gradients(mode):
    ds = data(3, seq=True)
    model = build(ds).train(mode == "train")
    p = present_mask(16, 3)
    results = []
    for fill in (0.0, float("nan")):
        b = ds.batch(torch.arange(16), p)
        for i, m in enumerate(b.inputs):
            x = b.inputs[m].clone()
            x[~p[:, i]] = fill
            b.inputs[m] = x
        model.zero_grad(set_to_none=True)
        out = run(model, b, seed=3, stage="hard", hard=torch.ones(8, dtype=torch.bool))
        out.loss.backward()
        results.append((out.output.detach(), out.loss.detach(),
                        {k: q.grad.clone() for k, q in model.named_parameters()
                         if q.grad is not None}))
    (o0, l0, g0), (o1, l1, g1) = results
    assert torch.isfinite(o1).all() and torch.equal(o0, o1) and torch.equal(l0, l1)
    assert g0.keys() == g1.keys() and all(torch.equal(g0[k], g1[k]) for k in g0)


def test_losses_restated():
    """task, kl and hard recomputed from the model's own mu/logvar/output: the KL summed over
    dims and averaged over the rows with a modality, and the hard term beta * (sum of the hard
    rows' task loss) / (rows with a modality) -- the official normalisation."""
    ds = data(3)
    model = build(ds, beta=0.3, kl_weight=0.01).train()
    b = ds.batch(torch.arange(16), present_mask(16, 3))
    hard = torch.zeros(8, dtype=torch.bool)
    hard[[1, 6]] = True                                  # {a} and {b, c}
    out = run(model, b, stage="hard", hard=hard)
    mu, logvar = out.extras["mu"].double(), out.extras["logvar"].double()
    rows = b.present.any(1)
    kl = 0.5 * (mu.pow(2) + logvar.exp() - logvar - 1).sum(1)
    torch.testing.assert_close(out.losses["kl"].double(), 0.01 * kl[rows].mean(), rtol=1e-5, atol=1e-7)
    ce = torch.nn.functional.cross_entropy(out.logits.double(), b.labels, reduction="none")
    torch.testing.assert_close(out.losses["task"].double(), ce.mean(), rtol=1e-5, atol=1e-7)
    codes = (b.present.long() * torch.tensor([1, 2, 4])).sum(1)
    is_hard = (codes == 1) | (codes == 6)
    assert is_hard.any() and not is_hard.all()
    want = 0.3 * ce[is_hard].sum() / rows.sum()
    torch.testing.assert_close(out.losses["hard"].double(), want, rtol=1e-5, atol=1e-7)
    assert torch.equal(out.extras["combination"], codes)
    torch.testing.assert_close(out.extras["variance"], out.extras["logvar"].exp().mean(1))
    # no hard row in the batch: the term is 0 (and still part of the graph)
    none = run(model, b, stage="hard", hard=torch.zeros(8, dtype=torch.bool))
    assert float(none.losses["hard"].detach()) == 0.0 and none.losses["hard"].requires_grad


def test_latent_dim_defaults_to_the_concatenated_width():
    ds = data(3)
    model = get_method("dmrnet").build(ds, {"hidden": 16})
    z = model(**{"inputs": ds.batch(torch.arange(4)).inputs,
                 "present": torch.ones(4, 3, dtype=torch.bool)}).extras["mu"]
    assert z.shape == (4, 48)                           # M * hidden, the official code's


def _step(model, b, backend, ops):
    return forward_backward_on(model, backend, ops, lambda: run(
        model, b, seed=5, stage="hard", hard=torch.ones(8, dtype=torch.bool)))


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("seq", [False, True], ids=["vectors", "sequences"])
def test_fused_and_reference_backends_agree_on_a_training_step(seq, mode):
    """Forward + backward in float64 on the cpp and reference backends with the same seed:
    values, every loss and every parameter gradient. eval (z = mu): float64 rounding only.
    train: the sampled noise is the same Philox stream on both backends but its normals are
    float32 with Box-Muller rounded differently (C++ vs torch math): ~1e-7 relative, as in
    test_reparam_kl. Sequences run the transformer encoders, so masked_attention runs too."""
    ops = ("reparam_kl", "masked_attention") if seq else ("reparam_kl",)
    for op in ops:
        require_cpp(op)
    ds = data(3, seq=seq)
    model = build(ds, heads=2).double().train(mode == "train")
    b = ds.batch(torch.arange(16), present_mask(16, 3))
    b.inputs.update({m: x.double() for m, x in b.inputs.items()})
    ref, g_ref = _step(model, b, "reference", ops)
    cpp, g_cpp = _step(model, b, "cpp", ops)
    tol = dict(rtol=1e-9, atol=1e-11) if mode == "eval" else dict(rtol=1e-5, atol=1e-7)
    assert list(ref.losses) == ["task", "kl", "hard"]
    assert_steps_agree(ref, g_ref, cpp, g_cpp, **tol)


def test_official_flag_uses_sgd_with_momentum():
    ds = data(2)
    model = build(ds)
    cfg = get_method("dmrnet").config(None, {"official": True})
    opt = get_method("dmrnet").recipe(cfg).optimizers(model)["main"]
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["momentum"] == 0.9
    plain = get_method("dmrnet").recipe(get_method("dmrnet").config()).optimizers(model)["main"]
    assert isinstance(plain, torch.optim.AdamW)


def test_augment_draws_uniform_nonempty_combinations():
    r = DMRNetRecipe({"epochs": 2})
    g = torch.Generator().manual_seed(0)
    full = torch.ones(7000, 3, dtype=torch.bool)
    out = r.augment(full, epoch=0, stage="warmup", generator=g)
    counts = torch.bincount(combination_codes(out), minlength=8)
    assert counts[0] == 0 and ((counts[1:] - 1000).abs() < 150).all()    # 1000 +- ~4.5 sigma
    part = present_mask(200, 3)
    out = r.augment(part, epoch=0, stage="warmup", generator=g)
    assert not (out & ~part).any()                       # never adds a modality
    assert torch.equal(out.any(1), part.any(1))          # keeps >= 1 where any was present
    off = DMRNetRecipe({"sample_combinations": False})
    assert torch.equal(off.augment(part, epoch=0, stage="warmup", generator=g), part)


def test_recipe_warmup_then_hard_set():
    r = DMRNetRecipe({"epochs": 5, "warmup_epochs": 2, "hard_k": 1})
    assert [r.stage(e) for e in range(5)] == ["warmup"] * 2 + ["hard"] * 3
    ds = data(2, n=64)
    model = build(ds)
    opts = r.optimizers(model)
    for epoch in range(3):
        stage = r.stage(epoch)
        for step in range(2):
            b = ds.batch(torch.arange(16 * step, 16 * step + 16), ds.batch(torch.arange(16)).present)
            b.present = r.augment(b.present, epoch=epoch, stage=stage,
                                  generator=torch.Generator().manual_seed(epoch * 10 + step))
            logged = r.train_step(model, b, opts, epoch=epoch, step=step, stage=stage)
            assert ("hard" in logged) == (stage == "hard")
        if epoch == 0:
            r.on_epoch_end(model, epoch, stage)
            assert r.hard is None and r.var_count.sum() == 32
        else:
            r.on_epoch_end(model, epoch, stage)
    assert r.var_count.sum() == 64                       # the hard epoch adds nothing
    mean = r.mean_variance()
    assert r.hard.shape == (4,) and r.hard.sum() == 1
    assert int(r.hard.nonzero()) == (1 if mean[1] > mean[2] else 2)   # unimodal candidates
    state = r.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    r2 = DMRNetRecipe({"epochs": 5, "warmup_epochs": 2})
    r2.load_state_dict(state)
    assert torch.equal(r2.hard, r.hard)
    # "all" candidates and top-k
    s, c = torch.tensor([0.0, 1.0, 4.0, 9.0]), torch.tensor([0.0, 1.0, 2.0, 3.0])
    assert DMRNetRecipe.hard_set(s, c, 1, unimodal=False).tolist() == [False, False, False, True]
    assert DMRNetRecipe.hard_set(s, c, 1).tolist() == [False, False, True, False]
    assert DMRNetRecipe.hard_set(s, c, 5).tolist() == [False, True, True, False]
    with pytest.raises(ValueError, match="hard_candidates"):
        DMRNetRecipe({"hard_candidates": "some"})
    with pytest.raises(ValueError, match="stage"):
        r.train_step(model, b, opts, epoch=0, step=0, stage="main")


def test_config_round_trip():
    cfg = default_config("dmrnet", "handwritten")
    assert cfg["kl_weight"] == 1e-3 and cfg["beta"] == 0.2 and cfg["warmup_epochs"] == 5
    assert cfg["hard_k"] == 1
    with pytest.raises(ValueError, match="unknown"):
        get_method("dmrnet").config(None, {"gamma": 1})


# ---------------------------------------------------------------- mechanism
# One strong view (noise std 0.1) and one weak view (noise std 3.0) of the same label factor
# (make_synthetic, specific=0: either view alone determines the label up to its noise), 10
# classes, 800 samples, the default DMRNet config (kl 1e-3, 5 warm-up epochs, latent = M *
# hidden, top-1 unimodal hard set) with small widths, lr 1e-3, no dropout.
#
# Observed weak/strong ratio of the warm-up mean variance, seeds 0-7: 1.60 1.33 1.12 1.29 1.29
# 1.16 1.21 1.42 (weak larger in 8/8). The claim holds only in this regime, which is the one the
# official code measures in (the first epochs): the weak view's noisier features spread its
# predicted log-variance more, and exp turns spread into a larger mean. Trained longer the task
# loss erodes it (2.5x the warm-up steps: weak larger in 5/8 seeds), and with each view
# standardised (so the noise no longer inflates the weak view's scale) it was weak larger in 2/4
# seeds (10 classes) and 0/4 (2 classes): the task loss shrinks the variance most where the
# prediction is least confident (the expected CE of a noisy z grows with the softmax curvature).
# Threshold: ratio > 1 (the ordering) on the 4 seeds tested; the smallest seen is 1.12.
MECH_SEEDS = (0, 1, 2, 3)
MECH_CONFIG = {"epochs": 6, "warmup_epochs": 5, "hidden": 32, "batch_size": 64, "lr": 1e-3,
               "dropout": 0.0}


@pytest.mark.parametrize("seed", MECH_SEEDS)
def test_weak_modality_has_the_larger_variance_and_is_hard(seed):
    mods = {"strong": (1, 16), "weak": (1, 16)}
    ds = make_synthetic(num_samples=800, modalities=mods, noise={"strong": 0.1, "weak": 3.0},
                        specific=0.0, task="classification", num_classes=10, seed=seed)
    method = get_method("dmrnet")
    cfg = method.config(None, MECH_CONFIG)
    assert cfg["kl_weight"] == 1e-3 and cfg["latent_dim"] is None and cfg["hard_k"] == 1
    recipe = method.recipe(cfg)
    fit(None, ds, config=cfg, seed=seed, progress=False,
        model=lambda d, c: method.build(d, cfg), recipe=recipe)
    mean = recipe.mean_variance()                        # codes: 1 = {strong}, 2 = {weak}
    strong, weak = float(mean[1]), float(mean[2])
    assert weak > strong, (strong, weak)
    assert recipe.hard.nonzero().flatten().tolist() == [2]


# ---------------------------------------------------------------- CLI smoke train

def test_cli_train_on_handwritten(tmp_path):
    out = tmp_path / "hw"
    assert cli.main(["train", "--method", "dmrnet", "--seeds", "1111", "--out", str(out),
                     "--no-progress", "--protocol", "complete+eta:0.5", "--set", "epochs=2",
                     "--set", "warmup_epochs=1"]) == 0
    result = json.loads((out / "results.json").read_text())
    acc = result["per_seed"]["dmrnet"]["1111"]
    assert acc["complete"]["accuracy"] > 0.5
    from robustmm_fast.train.checkpoint import load_best
    history = load_best(out / "dmrnet" / "seed-1111" / "best.pt")["history"]
    assert [h["stage"] for h in history] == ["warmup", "hard"]
    assert "hard" not in history[0]["train"] and "hard" in history[1]["train"]


def test_cli_train_on_mmsa_format(tmp_path):
    path = write_pkl(tmp_path / "unaligned_50.pkl", mmsa_dict(aligned=False))
    out = tmp_path / "mmsa"
    args = ["train", "--method", "dmrnet", "--data", f"mmsa:{path}", "--seeds", "1111",
            "--out", str(out), "--no-progress", "--protocol", "complete+eta:0.5",
            "--set", "epochs=2", "--set", "warmup_epochs=1", "--set", "batch_size=2",
            "--set", "hidden=8", "--set", "heads=2", "--set", "layers=1"]
    assert cli.main(args) == 0
    result = json.loads((out / "results.json").read_text())
    points = result["per_seed"]["dmrnet"]["1111"]
    assert set(points) == {"complete", "eta:0.5"}
    assert all(v["MAE"] == v["MAE"] for v in points.values())  # finite, not NaN
