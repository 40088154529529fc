"""DMRNet (models/dmrnet.py): shapes and finite loss terms, absent inputs (NaN) inert, fused vs
reference backend on one eval-mode step (z = mu), the recipe's combination sampling, warm-up
accumulation and hard set, the official code restated by hand (its loss, warm-up bounds, warm-up
statistic, optimizer and StepLR, no classifier dropout, xavier init; file:line in
shicaiwei123/ECCV2024-DMRNet "audio-visual classification/" at 8472850), the variance mechanism
on synthetic data with a weak and a strong modality, and a CLI smoke train on Handwritten."""
from __future__ import annotations

import json

import pytest
import torch

from robustmm_fast import cli
from robustmm_fast.data import make_synthetic
from robustmm_fast.models import DMRNet, DMRNetRecipe
from robustmm_fast.models.dmrnet import OFFICIAL_QUIRKS, OUR_QUIRKS, combination_codes
from robustmm_fast.models.registry import _DMRNET_CREMAD, _DMRNET_KINETICS_SOUNDS, \
    default_config, get_method
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
    """official main.py:298: optim.SGD(lr, momentum=0.9, weight_decay=1e-4) (no nesterov)."""
    ds = data(2)
    model = build(ds)
    cfg = get_method("dmrnet").config(None, {"official": True})
    opt = get_method("dmrnet").recipe(cfg).optimizers(model)["main"]
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["momentum"] == 0.9
    assert opt.defaults["weight_decay"] == 1e-4 and opt.defaults["lr"] == 1e-3
    assert not opt.defaults["nesterov"] and opt.defaults["dampening"] == 0
    plain = get_method("dmrnet").recipe(get_method("dmrnet").config()).optimizers(model)["main"]
    assert isinstance(plain, torch.optim.AdamW)
    # the named option, either way round
    sgd = DMRNetRecipe({"optimizer": "sgd"}).optimizers(model)["main"]
    assert isinstance(sgd, torch.optim.SGD)
    adamw = DMRNetRecipe({"official": True, "optimizer": "adamw"}).optimizers(model)["main"]
    assert isinstance(adamw, torch.optim.AdamW)
    with pytest.raises(ValueError, match="optimizer"):
        DMRNetRecipe({"optimizer": "adam"})
    with pytest.raises(ValueError, match="official"):
        DMRNetRecipe({"official": "yes"})


def test_official_lr_schedule_is_steplr_70_by_0_1():
    """official main.py:299: StepLR(optimizer, lr_decay_step=70, lr_decay_ratio=0.1)
    (main.py:42-43), stepped once at the end of every epoch (main.py:196): our lr of epoch e
    must be the lr torch's own StepLR gives epoch e, for the official 100 epochs (main.py:38)."""
    ds = data(2, n=32)
    model = build(ds)
    r = DMRNetRecipe({"official": True, "epochs": 100})
    assert r.lr_decay_step == 70 and r.lr_decay_ratio == 0.1
    ref_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(ref_opt, 70, 0.1)
    for epoch in range(100):
        assert r.lr_at(epoch) == pytest.approx(ref_opt.param_groups[0]["lr"], rel=1e-12), epoch
        ref_opt.step()
        sched.step()
    assert r.lr_at(69) == 1e-3 and r.lr_at(70) == pytest.approx(1e-4)
    # ours: constant; train_step sets the epoch's lr on the optimizer
    assert all(DMRNetRecipe({}).lr_at(e) == 1e-3 for e in (0, 70, 200))
    opts = r.optimizers(model)
    b = ds.batch(torch.arange(16))
    r.train_step(model, b, opts, epoch=75, step=0, stage="hard")
    assert opts["main"].param_groups[0]["lr"] == pytest.approx(1e-4)
    r.train_step(model, b, opts, epoch=3, step=0, stage="warmup")
    assert opts["main"].param_groups[0]["lr"] == 1e-3
    with pytest.raises(ValueError, match="lr_decay_step"):
        DMRNetRecipe({"lr_decay_step": -1})


def test_official_warmup_is_epochs_0_to_5():
    """official main.py:145 `if epoch <= 5:` accumulates the variances and trains without the
    hard term (main.py:160 x_auxi = 0), main.py:161-169 adds it in every later epoch, and
    main.py:374 `if epoch == 5:` fixes the weak modality after epoch 5 -- for epochs in
    range(args.epochs), main.py:330, args.epochs = 100 (main.py:38)."""
    official_warmup = [e for e in range(100) if e <= 5]          # main.py:330, 145
    official_decision_epoch = 5                                   # main.py:374
    for cfg in ({}, {"official": True}, dict(_DMRNET_CREMAD)):
        r = DMRNetRecipe(cfg)
        assert [e for e in range(100) if r.stage(e) == "warmup"] == official_warmup, cfg
    assert default_config("dmrnet")["warmup_epochs"] == len(official_warmup)
    assert default_config("dmrnet", "handwritten")["warmup_epochs"] == len(official_warmup)
    # the hard set is fixed at the end of epoch 5, not before, and used from epoch 6 on
    ds = data(2, n=32)
    model = build(ds)
    r = DMRNetRecipe({"epochs": 8, "batch_size": 16})
    opts = r.optimizers(model)
    for epoch in range(8):
        stage = r.stage(epoch)
        b = ds.batch(torch.arange(16))
        b.present = r.augment(b.present, epoch=epoch, stage=stage,
                              generator=torch.Generator().manual_seed(epoch))
        logged = r.train_step(model, b, opts, epoch=epoch, step=0, stage=stage)
        assert ("hard" in logged) == (epoch > official_decision_epoch)
        r.on_epoch_end(model, epoch, stage)
        assert (r.hard is not None) == (epoch >= official_decision_epoch), epoch
    assert r.var_count.sum() == 6 * 16


def test_official_warmup_statistic_restated():
    """official main.py:141-159: per batch, std_s = mean over dims of std**2 (= exp(logvar)),
    std_a = sum(std_s * index_a) / sum(index_a) over the audio-only rows (likewise visual),
    summed over the batches of an epoch (main.py:158-159, divided by the constant `step`,
    main.py:200/210) and over epochs 0-5 (main.py:371-372, every epoch since 8d05ccb); weak =
    audio if std_a_sum > std_v_sum else visual (main.py:375-378). batch_mean reproduces that
    ranking (the sum / number of batches); pooled averages over the samples instead."""
    g = torch.Generator().manual_seed(0)
    batches = []
    for size in (64, 64, 64, 9):                 # a short last batch, as a DataLoader's
        p = torch.randint(0, 3, (size,), generator=g)
        p[:3] = torch.arange(3)                  # each combination in each batch (else NaN)
        p = torch.tensor([[1, 0], [0, 1], [1, 1]])[p]                # basic_model.py:11-25
        std_s = torch.rand(size, generator=g, dtype=torch.float64) * (1 + p[:, 0])
        batches.append((p, std_s))
    std_a_sum = std_v_sum = 0.0
    for p, std_s in batches:                     # main.py:146-159, restated
        index_a = p[:, 0] * (1 - p[:, 1])
        index_v = (1 - p[:, 0]) * p[:, 1]
        std_a_sum += float(torch.sum(std_s * index_a) / torch.sum(index_a))
        std_v_sum += float(torch.sum(std_s * index_v) / torch.sum(index_v))
    weak = 1 if std_a_sum > std_v_sum else 2    # codes: 1 = {audio}, 2 = {visual}
    for cfg in ({"variance_statistic": "batch_mean"}, {"official": True}):
        r = DMRNetRecipe({"warmup_epochs": 1, **cfg})
        assert r.variance_statistic == "batch_mean"
        for p, std_s in batches:
            r._accumulate(std_s, combination_codes(p.bool()), 4)
        r.on_epoch_end(torch.nn.Module(), 0, "warmup")
        assert r.var_count[1:].tolist() == [4, 4, 4]
        mean = r.mean_variance()
        assert float(mean[1]) * 4 == pytest.approx(std_a_sum, rel=1e-12)
        assert float(mean[2]) * 4 == pytest.approx(std_v_sum, rel=1e-12)
        assert r.hard.nonzero().flatten().tolist() == [weak]
    pooled = DMRNetRecipe({"warmup_epochs": 1})
    assert pooled.variance_statistic == "pooled"
    for p, std_s in batches:
        pooled._accumulate(std_s, combination_codes(p.bool()), 4)
    pooled.on_epoch_end(torch.nn.Module(), 0, "warmup")
    all_p, all_s = torch.cat([p for p, _ in batches]), torch.cat([s for _, s in batches])
    codes = combination_codes(all_p.bool())
    torch.testing.assert_close(pooled.mean_variance()[1], all_s[codes == 1].mean())
    assert float(pooled.mean_variance()[1]) * 4 != pytest.approx(std_a_sum, rel=1e-6)
    with pytest.raises(ValueError, match="variance_statistic"):
        DMRNetRecipe({"variance_statistic": "median"})


def test_official_loss_restated_two_modalities():
    """The official loss (main.py:163-185), restated with its own names for M = 2 (audio,
    visual) and weak modality audio: loss = CE(out) + alpha * mean_b sum_d 0.5 (std^2 + mul^2
    - log std^2 - 1) + beta * sum(CE_b(auxi_out) * p_a (1 - p_v)) / B, where auxi_out =
    fc_out(output) is the same logits (fusion_modules.py:48-49) and std = exp(logvar / 2)
    (fusion_modules.py:39)."""
    ds = data(2)
    model = build(ds, beta=0.2, kl_weight=1e-3, official=True).train()
    # the official combinations only (every row has >= 1 modality): basic_model.py:11
    p = torch.tensor([[1, 0], [0, 1], [1, 1]])[torch.arange(16) % 3]
    b = ds.batch(torch.arange(16), p.bool())
    hard = torch.tensor([False, True, False, False])             # {audio} = code 1
    out = run(model, b, stage="hard", hard=hard)
    out_logits, mul = out.logits.double(), out.extras["mu"].double()
    std = (out.extras["logvar"].double() * 0.5).exp()
    p = p.double()
    loss_cls = torch.nn.functional.cross_entropy(out_logits, b.labels)       # main.py:173
    variance_dul = std ** 2                                                  # main.py:175-180
    loss_kl = torch.mean(torch.sum((variance_dul + mul ** 2 - torch.log(variance_dul) - 1) * 0.5,
                                   dim=1))
    auxi_loss = torch.nn.functional.cross_entropy(out_logits, b.labels, reduction="none")
    x_audio = torch.sum(auxi_loss * (p[:, 0] * (1 - p[:, 1]))) / p.shape[0]  # main.py:165
    loss = loss_cls + loss_kl * 1e-3 + x_audio * 0.2                         # main.py:185
    torch.testing.assert_close(out.loss.double(), loss, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out.losses["hard"].double(), 0.2 * x_audio, rtol=1e-5, atol=1e-7)
    # warm-up (main.py:160): no hard term
    warm = run(model, b, stage="warmup")
    assert list(warm.losses) == ["task", "kl"]


def _classifier_input(model, b):
    """(z from the bottleneck, what the classifier received) in one training forward."""
    seen = {}
    h1 = model.bottleneck.register_forward_hook(lambda m, i, o: seen.__setitem__("z", o[0]))
    h2 = model.classifier.register_forward_hook(lambda m, i, o: seen.__setitem__("in", i[0]))
    try:
        run(model, b, stage="warmup")
    finally:
        h1.remove(), h2.remove()
    return seen["z"], seen["in"]


def test_official_classifier_has_no_dropout():
    """official fusion_modules.py:43-48: out = fc_out(mu + eps * std) -- no dropout on z (none
    anywhere in the official model). Ours puts `dropout` there unless classifier_dropout says
    otherwise."""
    ds = data(3)
    b = ds.batch(torch.arange(16), present_mask(16, 3))
    official = build(ds, dropout=0.3, official=True).train()
    assert official.classifier_dropout == 0.0
    z, seen = _classifier_input(official, b)
    assert torch.equal(z, seen)
    ours = build(ds, dropout=0.3).train()
    assert ours.classifier_dropout == 0.3
    z, seen = _classifier_input(ours, b)
    assert not torch.equal(z, seen) and ((seen == 0) | torch.isclose(seen, z / 0.7)).all()
    assert build(ds, dropout=0.3, classifier_dropout=0.0).classifier_dropout == 0.0
    assert build(ds, dropout=0.3, official=True, classifier_dropout=0.1).classifier_dropout == 0.1
    with pytest.raises(ValueError, match="classifier_dropout"):
        build(ds, classifier_dropout=1.0)


def test_official_init_is_xavier_normal_with_zero_bias():
    """official utils.py:15-18 (applied to the whole model, main.py:291): every nn.Linear gets
    xavier_normal_ weights (std sqrt(2 / (fan_in + fan_out))) and zero biases."""
    ds = data(3)
    model = build(ds, hidden=64, latent_dim=192, official=True)
    assert model.init == "xavier"
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) >= 6
    for lin in linears:
        assert torch.equal(lin.bias, torch.zeros_like(lin.bias))
    w = model.bottleneck.mu.weight.detach()                              # 192 x 192
    assert abs(float(w.std()) - (2 / (192 + 192)) ** 0.5) < 0.05 * (2 / 384) ** 0.5
    ours = build(ds)
    assert ours.init == "torch" and ours.classifier.bias.abs().sum() > 0
    assert build(ds, init="xavier").classifier.bias.abs().sum() == 0
    with pytest.raises(ValueError, match="init"):
        build(ds, init="kaiming")


def test_quirks_resolve_as_official_says():
    assert set(OFFICIAL_QUIRKS) == set(OUR_QUIRKS)
    defaults = get_method("dmrnet").defaults
    assert all(defaults[k] is None for k in OFFICIAL_QUIRKS) and defaults["official"] is False
    ds = data(2)
    for official, quirks in ((False, OUR_QUIRKS), (True, OFFICIAL_QUIRKS)):
        cfg = get_method("dmrnet").config(None, {"official": official, "dropout": 0.2})
        model, r = get_method("dmrnet").build(ds, cfg), get_method("dmrnet").recipe(cfg)
        assert model.official is official and r.official is official
        want_drop = 0.2 if quirks["classifier_dropout"] is None else quirks["classifier_dropout"]
        assert (model.classifier_dropout, model.init) == (want_drop, quirks["init"])
        assert (r.optimizer, r.lr_decay_step, r.variance_statistic) == (
            quirks["optimizer"], quirks["lr_decay_step"], quirks["variance_statistic"])


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
    assert cfg["kl_weight"] == 1e-3 and cfg["beta"] == 0.2 and cfg["warmup_epochs"] == 6
    assert cfg["hard_k"] == 1 and cfg["official"] is False
    with pytest.raises(ValueError, match="unknown"):
        get_method("dmrnet").config(None, {"gamma": 1})


def test_official_script_configurations():
    """_DMRNET_CREMAD / _DMRNET_KINETICS_SOUNDS against the official scripts: cramed.sh:8
    `--alpha 1e-3 --beta 0.20 --pme 1`, ks.sh:4 `--alpha 1e-3 --beta 0.3`, and main.py's
    defaults: batch 64 (:37), 100 epochs (:38), lr 1e-3 (:41), StepLR 70 x 0.1 (:42-43),
    weight decay 1e-4 (:298); no dropout in the official model."""
    method = get_method("dmrnet")
    for preset, beta in ((_DMRNET_CREMAD, 0.2), (_DMRNET_KINETICS_SOUNDS, 0.3)):
        cfg = method.config(None, preset)
        assert cfg["official"] is True and cfg["kl_weight"] == 1e-3 and cfg["beta"] == beta
        assert (cfg["batch_size"], cfg["epochs"], cfg["lr"], cfg["weight_decay"]) == \
            (64, 100, 1e-3, 1e-4)
        assert (cfg["lr_decay_step"], cfg["lr_decay_ratio"]) == (70, 0.1)
        assert cfg["warmup_epochs"] == 6 and cfg["hard_k"] == 1 and cfg["dropout"] == 0.0
        r = method.recipe(cfg)
        assert (r.optimizer, r.variance_statistic) == ("sgd", "batch_mean")
        model = method.build(data(2), cfg)
        assert model.classifier_dropout == 0.0 and model.init == "xavier"


# ---------------------------------------------------------------- mechanism
# One strong view (noise std 0.1) and one weak view (noise std 3.0) of the same label factor
# (make_synthetic, specific=0: either view alone determines the label up to its noise), 10
# classes, 800 samples, the default DMRNet config (kl 1e-3, the official 6 warm-up epochs, latent
# = M * hidden, top-1 unimodal hard set) with small widths, lr 1e-3, no dropout; and the same
# with official=True (SGD momentum 0.9, xavier init, no classifier dropout, per-batch-mean
# statistic).
#
# Observed weak/strong ratio of the warm-up mean variance, seeds 0-7 (tools/measure_dmrnet_
# departures.py --mechanism reruns this):
#   defaults, 6 warm-up epochs:  1.58 1.31 1.10 1.27 1.26 1.14 1.19 1.38 (weak larger in 8/8)
#   official=True:               1.43 1.56 1.21 1.54 1.53 1.47 1.42 1.05 (8/8)
#   (before issue 13, 5 warm-up epochs: 1.60 1.33 1.12 1.29 1.29 1.16 1.21 1.42, 8/8)
# The claim holds only in this regime, which is the one the official code measures in (the
# first epochs): the weak view's noisier features spread its predicted log-variance more, and
# exp turns spread into a larger mean. Trained longer the task loss erodes it (2.5x the warm-up
# steps: weak larger in 5/8 seeds), and with each view standardised (so the noise no longer
# inflates the weak view's scale) it was weak larger in 2/4 seeds (10 classes) and 0/4 (2
# classes): the task loss shrinks the variance most where the prediction is least confident
# (the expected CE of a noisy z grows with the softmax curvature).
# Threshold: ratio > 1 (the ordering) on the 4 seeds tested; the smallest seen on seeds
# 0-3 is 1.10 (defaults) and 1.21 (official).
MECH_SEEDS = (0, 1, 2, 3)
MECH_CONFIG = {"epochs": 7, "hidden": 32, "batch_size": 64, "lr": 1e-3, "dropout": 0.0}


@pytest.mark.parametrize("official", [False, True], ids=["defaults", "official"])
@pytest.mark.parametrize("seed", MECH_SEEDS)
def test_weak_modality_has_the_larger_variance_and_is_hard(seed, official):
    mods = {"strong": (1, 16), "weak": (1, 16)}
    ds = make_synthetic(num_samples=800, modalities=mods, noise={"strong": 0.1, "weak": 3.0},
                        specific=0.0, task="classification", num_classes=10, seed=seed)
    method = get_method("dmrnet")
    cfg = method.config(None, {**MECH_CONFIG, "official": official})
    assert cfg["kl_weight"] == 1e-3 and cfg["latent_dim"] is None and cfg["hard_k"] == 1
    assert cfg["warmup_epochs"] == 6
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
