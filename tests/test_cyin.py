"""CyIN (models/cyin.py): shapes and loss terms for M = 2, 3, 6 on vector and sequence data
(equal and unequal lengths, padded), absent/padded values inert (NaN included), the fused and
reference backends agreeing on one training step, the two-stage recipe and its stage-2 latent
substitution, the config round trip with the official-quirks flag, and CLI smoke trains on the
MMSA format and on Handwritten."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from robustmm_fast import cli
from robustmm_fast.data.dataset import MultimodalDataset
from robustmm_fast.models import CyIN, CyINRecipe
from robustmm_fast.models.cyin import OFFICIAL_QUIRKS
from robustmm_fast.models.registry import default_config, get_method
from robustmm_fast.train.checkpoint import load_best

from conftest import assert_inert, assert_steps_agree, forward_backward_on, require_cpp
from test_data import mmsa_dict, write_pkl

# small widths: every test model builds and steps in milliseconds
SMALL = {"common_dim": 8, "ib_inter_dim": 16, "ib_dim": 8, "mult_heads": 2,
         "mult_layers": 1, "memory_layers": 1, "translator_widths": [8, 4],
         "translator_blocks": 2, "fusion_kernel": 1}
NO_DROPOUT = {"attn_dropout": 0.0, "memory_attn_dropout": 0.0, "relu_dropout": 0.0,
              "res_dropout": 0.0, "embed_dropout": 0.0, "out_dropout": 0.0}


pytestmark = pytest.mark.usefixtures("one_thread")


def _splits(n):
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    return {"train": idx[: n // 2], "valid": idx[n // 2: 3 * n // 4], "test": idx[3 * n // 4:]}


def make_data(shapes: dict, *, padded=(), task="classification", n=24, seed=0,
              shared_lengths=False) -> MultimodalDataset:
    """shapes {m: (L, D)}; modalities in `padded` get random valid lengths (one sample with
    none, unless shared_lengths: every padded modality then shares one length per sample,
    as aligned data do)."""
    g = torch.Generator().manual_seed(seed)
    inputs = {m: torch.randn(n, L, D, generator=g) for m, (L, D) in shapes.items()}
    lengths, common = {}, None
    for m in padded:
        L = shapes[m][0]
        if shared_lengths:
            common = torch.randint(1, L + 1, (n,), generator=g) if common is None else common
            lengths[m] = common.clone()
        else:
            lengths[m] = torch.randint(1, L + 1, (n,), generator=g)
            lengths[m][0] = 0  # a present sample whose modality has no valid token
    if task == "classification":
        return MultimodalDataset("cyin_test", task, inputs, torch.randint(0, 3, (n,), generator=g),
                                 _splits(n), num_classes=3, lengths=lengths)
    return MultimodalDataset("cyin_test", task, inputs, torch.rand(n, generator=g) * 6 - 3,
                             _splits(n), lengths=lengths)


HW6 = {"fac": (1, 5), "fou": (1, 7), "kar": (1, 3), "mor": (1, 2), "pix": (1, 6), "zer": (1, 4)}
DATA = {  # name: (shapes, padded, task, shared lengths)
    "vec2": ({"a": (1, 5), "b": (1, 3)}, (), "classification", False),
    "vec6": (HW6, (), "classification", False),
    "seq3_unequal": ({"text": (7, 8), "audio": (5, 4), "vision": (6, 5)},
                     ("text", "audio", "vision"), "regression", False),
    "seq3_aligned": ({"text": (6, 8), "audio": (6, 4), "vision": (6, 5)},
                     ("text", "audio", "vision"), "regression", True),
    "seq2_equal_padded": ({"a": (5, 4), "b": (5, 3)}, ("a",), "classification", False),
}


def data(name: str) -> MultimodalDataset:
    shapes, padded, task, shared = DATA[name]
    return make_data(shapes, padded=padded, task=task, shared_lengths=shared)


def build(ds, **over) -> CyIN:
    torch.manual_seed(0)
    return get_method("cyin").build(ds, {**SMALL, **over})


def present_mask(n, m, seed=1):
    """Random masks with an all-absent row, an all-present row and a single-present row."""
    p = torch.rand(n, m, generator=torch.Generator().manual_seed(seed)) > 0.4
    p[0], p[1], p[2] = False, True, False
    p[2, m - 1] = True
    return p


def run(model, b, stage=None, seed=0, **kw):
    torch.manual_seed(seed)  # the sampling noise, dropout and stage-2 draws
    return model(b.inputs, b.present, labels=b.labels, padding=b.padding, stage=stage, **kw)


# ---------------------------------------------------------------- shapes and losses

@pytest.mark.parametrize("name", DATA)
def test_shapes_and_every_loss_term(name):
    ds = data(name)
    M = ds.num_modalities
    model = build(ds).train()
    b = ds.batch(torch.arange(12), present_mask(12, M))
    assert model.tokenwise == (len({L for L, _ in model.modalities.values()}) == 1)
    for stage in ("stage1", "stage2"):
        out = run(model, b, stage)
        if ds.task == "classification":
            assert out.logits.shape == (12, 3) and out.prediction is None
        else:
            assert out.prediction.shape == (12,) and out.logits is None
        want = ["task", "label_ib", "ib"] + (["translation"] if stage == "stage2" else [])
        assert list(out.losses) == want
        for k, v in out.losses.items():
            assert v.shape == () and torch.isfinite(v), k
            assert v > 0, k  # every term is really computed (none a constant 0)
        T = next(iter(ds.seq_lens.values())) if model.tokenwise else 1
        assert out.extras["reconstructed"].shape == (M, 12, T, 8)
        assert set(out.extras["latents"]) == set(ds.modalities)
        for m, (L, _) in model.modalities.items():
            assert out.extras["latents"][m].shape == (12, L, 8)
        model.zero_grad(set_to_none=True)
        out.loss.backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)
        # stage 2 trains the translators through the translation loss
        tr = model.cycle.translator.weight[0].grad
        assert tr is not None and tr.abs().sum() > 0
    inference = model.eval()(b.inputs, b.present, padding=b.padding)
    assert inference.losses == {} and torch.isfinite(inference.output).all()


def test_loss_weights_are_as_documented():
    """ib = (1/eta) L_IB, translation = lam * CycleConsistency's loss, label_ib scales with
    label_weight (same seed: the same draws)."""
    ds = data("vec6")
    b = ds.batch(torch.arange(10), present_mask(10, 6))
    base = run(build(ds).train(), b, "stage2").losses
    scaled = run(build(ds, eta=32.0, lam=5.0, label_weight=0.5).train(), b, "stage2").losses
    # (eta also weighs the MSE inside L_IB, so "ib" is no plain multiple: checked below)
    torch.testing.assert_close(scaled["translation"], base["translation"] / 2)
    torch.testing.assert_close(scaled["label_ib"], base["label_ib"] / 2)
    torch.testing.assert_close(scaled["task"], base["task"])
    # ib = (1/eta) mean[KL + eta MSE] = mean[KL]/eta + mean[MSE]: linear in 1/eta
    at = {e: run(build(ds, eta=e).train(), b, "stage2").losses["ib"] for e in (1.0, 2.0, 4.0)}
    torch.testing.assert_close(at[2.0] - at[4.0], (at[1.0] - at[2.0]) / 2)


# ---------------------------------------------------------------- absent / padded values are inert

def _loss_output_grads(model, inputs, b, stage, seed):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model(inputs, b.present, labels=b.labels, padding=b.padding, stage=stage)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.output.detach(), out.loss.detach(), grads


@pytest.mark.parametrize("name", ["vec6", "seq3_unequal", "seq3_aligned"])
@pytest.mark.parametrize("mode,stage", [("eval", None), ("train", "stage1"), ("train", "stage2")])
def test_absent_and_padded_values_never_reach_output_or_gradients(name, mode, stage):
    ds = data(name)
    model = build(ds).train(mode == "train")
    b = ds.batch(torch.arange(12), present_mask(12, ds.num_modalities))
    hidden = {}
    for i, m in enumerate(ds.modalities):
        mask = ~b.present[:, i, None, None]
        if m in b.padding:
            mask = mask | b.padding[m][..., None]
        hidden[m] = mask.expand_as(b.inputs[m])
    garbage = {m: torch.where(hidden[m], torch.full_like(x, 1e3), x) for m, x in b.inputs.items()}
    nans = {m: torch.where(hidden[m], torch.full_like(x, float("nan")), x)
            for m, x in b.inputs.items()}
    assert_inert(_loss_output_grads(model, garbage, b, stage, seed=3),
                 _loss_output_grads(model, nans, b, stage, seed=3))


@pytest.mark.parametrize("name", ["vec2", "seq3_unequal", "seq3_aligned"])
def test_all_absent_batch_is_finite(name):
    ds = data(name)
    model = build(ds).train()
    b = ds.batch(torch.arange(4), torch.zeros(4, ds.num_modalities, dtype=torch.bool))
    b.inputs.update({m: torch.full_like(x, float("nan")) for m, x in b.inputs.items()})
    out = run(model, b, "stage2")
    assert torch.isfinite(out.output).all() and torch.isfinite(out.loss)
    assert not out.extras["available"].any()
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


# ---------------------------------------------------------------- translation wiring

@pytest.mark.parametrize("combine", ["mean", "sum"])
def test_absent_latent_is_the_combination_of_translations(combine):
    """At test time an absent modality's latent is the sum/mean of the translations from the
    present ones (time-pooled latents for unaligned data)."""
    ds = data("seq3_unequal")
    model = build(ds, combine=combine).eval()
    b = ds.batch(torch.arange(6), torch.tensor([[1, 1, 0]] * 3 + [[1, 0, 0]] * 3, dtype=torch.bool))
    with torch.no_grad():
        out = model(b.inputs, b.present, padding=b.padding)
        rec = out.extras["reconstructed"]                               # (3, B, 1, D)
        pooled = []
        for i, m in enumerate(ds.modalities):
            z, pad = out.extras["latents"][m], b.padding[m] | ~b.present[:, i, None]
            pooled.append((z * ~pad[..., None]).sum(1, keepdim=True)
                          / (~pad).sum(1).clamp(min=1)[:, None, None])
        tr = model.cycle.translator
        want = tr.translate(pooled[0], 0, 2) + torch.where(
            b.present[:, 1, None, None], tr.translate(pooled[1], 1, 2), 0.0)
        if combine == "mean":
            want = want / b.present[:, :2].sum(1)[:, None, None]
        torch.testing.assert_close(rec[2], want)
    assert out.extras["available"].all()  # vision rebuilt from text (and audio)


def test_translate_false_is_the_zero_fill_ablation():
    ds = data("vec6")
    model = build(ds, translate=False).train()
    assert model.cycle is None
    b = ds.batch(torch.arange(10), present_mask(10, 6))
    out = run(model, b, "stage2")
    assert list(out.losses) == ["task", "label_ib", "ib"]
    assert torch.equal(out.extras["available"], b.present)
    assert out.extras["reconstructed"] is None and out.extras["substitution"] is None


# ---------------------------------------------------------------- backends

def _step(model, b, backend):
    return forward_backward_on(model, backend, ("masked_attention", "reparam_kl", "cycle_loss"),
                               lambda: run(model, b, "stage2", seed=5))


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", ["vec6", "seq3_unequal", "seq3_aligned"])
def test_fused_and_reference_backends_agree_on_a_training_step(name, mode):
    """One stage-2 step (forward + backward) in float64 on the cpp and reference backends, the
    same seed on both. eval: z = mu, the same computation up to float64 rounding (tight
    tolerances). train: sampled latents and the stage-2 draws; the in-kernel noise is the same
    Philox stream on both backends (keyed by a seed drawn from torch's generator), but its
    normals are float32 on both, with Box-Muller rounded differently (C++ vs torch math), so
    eps agrees to float32 precision (~1e-7 relative, as test_reparam_kl's 1e-5 tolerance)."""
    require_cpp("masked_attention")
    ds = data(name)
    model = build(ds, **NO_DROPOUT).double().train(mode == "train")
    b = ds.batch(torch.arange(12), present_mask(12, ds.num_modalities))
    b.inputs.update({m: x.double() for m, x in b.inputs.items()})
    ref, g_ref = _step(model, b, "reference")
    cpp, g_cpp = _step(model, b, "cpp")
    tol = dict(rtol=1e-9, atol=1e-11) if mode == "eval" else dict(rtol=1e-5, atol=1e-7)
    if mode == "train":
        assert torch.equal(ref.extras["substitution"], cpp.extras["substitution"])
    else:
        assert ref.extras["substitution"] is None and cpp.extras["substitution"] is None
    assert list(ref.losses) == ["task", "label_ib", "ib", "translation"]
    assert_steps_agree(ref, g_ref, cpp, g_cpp, **tol)


# ---------------------------------------------------------------- stages

def test_recipe_stages_and_selection():
    r = CyINRecipe({"epochs": 30, "stage_divide": 0.1})
    assert r.stage1_epochs == 3
    assert [r.stage(e) for e in (0, 2, 3, 29)] == ["stage1", "stage1", "stage2", "stage2"]
    assert [r.selects(e) for e in (0, 2, 3, 29)] == [False, False, True, True]
    assert CyINRecipe({"epochs": 2, "stage_divide": 0.9}).stage1_epochs == 1  # floor(1.8)
    assert CyINRecipe({"epochs": 4, "stage_divide": 1.0}).stage1_epochs == 3  # >= 1 stage-2 epoch
    # official: the count of 1-based epochs e <= epochs * stage_divide, no stage 2 guaranteed,
    # and only the last epoch's model (the official code saves it; no validation selection)
    official = CyINRecipe({"epochs": 4, "stage_divide": 1.0, "official": True})
    assert official.stage1_epochs == 4 and [official.selects(e) for e in range(4)] == \
        [False, False, False, True]
    assert CyINRecipe({"epochs": 10, "stage_divide": 0.25}).stage1_epochs == 2  # e <= 2.5
    assert CyINRecipe({"epochs": 1, "stage_divide": 0.5}).stage(0) == "stage2"
    assert CyINRecipe({"epochs": 5, "stage_divide": 0.0}).stage(0) == "stage2"
    with pytest.raises(ValueError, match="stage_divide"):
        CyINRecipe({"stage_divide": 1.5})
    with pytest.raises(ValueError, match="stage"):
        r.train_step(None, None, {}, epoch=0, step=0, stage="unimodal")


def test_recipe_step_passes_the_stage():
    ds = data("vec6")
    model = build(ds).train()
    recipe = get_method("cyin").recipe({"epochs": 4, "stage_divide": 0.5})
    opts = recipe.optimizers(model)
    b = ds.batch(torch.arange(10), present_mask(10, 6))
    # the logged terms are detached 0-d tensors (read by the engine once per epoch)
    s1 = {k: float(v) for k, v in recipe.train_step(model, b, opts, epoch=0, step=0,
                                                    stage=recipe.stage(0)).items()}
    s2 = {k: float(v) for k, v in recipe.train_step(model, b, opts, epoch=2, step=0,
                                                    stage=recipe.stage(2)).items()}
    assert "translation" not in s1 and s2["translation"] > 0
    assert s2["loss"] == pytest.approx(sum(v for k, v in s2.items() if k != "loss"), rel=1e-5)


@pytest.mark.parametrize("combine", ["mean", "sum"])
def test_substituted_latents_are_the_drawn_translations(combine):
    """_substitute against a per-modality restatement: draw 0 keeps the real latent, 1 takes
    the combination of the present others' translations, 2 + j the translation from the j-th
    other modality where it is present (else the combination)."""
    ds = data("vec6")
    model = build(ds, combine=combine).eval()
    M = ds.num_modalities
    present = present_mask(10, M)
    zt = torch.randn(M, 10, 1, model.ib_dim)
    for seed in range(8):
        torch.manual_seed(seed)
        with torch.no_grad():
            z = torch.where(present.t().view(M, -1, 1, 1), zt, 0)
            fwd = model.cycle.translator(z[model.cycle.src])
            count = torch.stack([sum(present[:, k].float() for k in range(M) if k != n)
                                 for n in range(M)])
            total = model._combination(fwd, present, count, zt)
            draws, latents, use = model._substitute(fwd, present, count, total)
            for n in range(M):
                others = [k for k in range(M) if k != n]
                trans = {k: model.cycle.translator.translate(z[k], k, n) for k in others}
                on = [present[:, k].view(-1, 1, 1) for k in others]
                comb = sum(torch.where(o, trans[k], 0) for k, o in zip(others, on))
                if combine == "mean":
                    comb = comb / count[n].clamp_min(1).view(-1, 1, 1)
                torch.testing.assert_close(total[n], comb)
                d = int(draws[n])
                assert torch.equal(use[n], (d > 0) & present[:, n] & (count[n] > 0))
                if d == 1:
                    torch.testing.assert_close(latents[n], comb)
                elif d >= 2:
                    k = others[d - 2]
                    want = torch.where(present[:, k].view(-1, 1, 1), trans[k], comb)
                    torch.testing.assert_close(latents[n], want)


def test_stage2_substitution_draws():
    ds = data("vec6")
    model = build(ds).train()
    b = ds.batch(torch.arange(10))  # complete: every draw can take effect
    names = lambda out: model.describe_substitution(out.extras["substitution"])  # noqa: E731
    draws = [tuple(names(run(model, b, "stage2", seed=s)).items()) for s in range(6)]
    assert all(dict(d).keys() == set(ds.modalities) for d in draws)
    options = {"real", "combination", *ds.modalities}
    assert all(v in options and v != m for d in draws for m, v in d if v not in ("real",))
    assert len(set(draws)) > 1  # they differ across calls
    assert torch.equal(run(model, b, "stage2", seed=1).extras["substitution"],
                       run(model, b, "stage2", seed=1).extras["substitution"])  # global RNG
    # no substitution in stage 1, nor at test time
    assert run(model, b, "stage1").extras["substitution"] is None
    assert model.eval()(b.inputs, b.present, stage="stage2").extras["substitution"] is None
    # a substituted latent changes the output (all present, so only the draws differ)
    model.train()
    outs = [run(model, b, "stage2", seed=s).output for s in range(3)]
    assert not torch.equal(outs[0], outs[1]) or not torch.equal(outs[0], outs[2])


def test_stochastic_test_option():
    ds = data("vec2")
    b = ds.batch(torch.arange(8))
    det = build(ds).eval()
    assert torch.equal(det(b.inputs, b.present).output, det(b.inputs, b.present).output)
    sto = build(ds, stochastic_test=True).eval()
    assert not torch.equal(sto(b.inputs, b.present).output, sto(b.inputs, b.present).output)


# ---------------------------------------------------------------- config

# RH-Lin/CyIN @ da04a3d, config/config_regression.json, "cyin" -> "datasetParams" -> "mosi"
# (lines 53-80), written here from the official file (not from our registry), with the
# official names mapped to ours.
OFFICIAL_MOSI = {"stage_divide": 0.1, "batch_size": 128, "lr": 5e-4, "weight_decay": 1e-3,
                 "grad_clip": 5.0, "epochs": 30, "common_dim": 256, "ib_inter_dim": 256,
                 "ib_dim": 128, "eta": 16, "translator_widths": (64, 32, 16),
                 "translator_blocks": 8, "lam": 10, "mult_layers": 2,
                 "mult_heads": 8, "attn_dropout": {"text": 0.1, "audio": 0.3, "vision": 0.0},
                 "memory_attn_dropout": 0.4, "embed_dropout": 0.0, "out_dropout": 0.3,
                 "causal": True}
# ... "mosei" (lines 81-108)
OFFICIAL_MOSEI = {**OFFICIAL_MOSI, "stage_divide": 0.3, "weight_decay": 1e-5, "grad_clip": 1.0,
                  "common_dim": 16, "ib_inter_dim": 16, "ib_dim": 256, "eta": 32,
                  "translator_widths": (128, 64, 32), "translator_blocks": 4, "lam": 5,
                  "mult_layers": 8, "mult_heads": 2,
                  "attn_dropout": {"text": 0.1, "audio": 0.0, "vision": 0.3},
                  "memory_attn_dropout": 0.2, "embed_dropout": 0.5, "out_dropout": 0.5}
# models/generationBased/CyIN.py: hard-coded in the model (RAE_kernel_size = 3, bias=False;
# get_network: relu_dropout=0.0, res_dropout=0.0, layers=max(nlevels, 3) for the memories);
# trains/generationBased/CyIN.py: clip_grad_value_, stage 1 while epochs <= max_epoch *
# stage_divide, the model saved after the last epoch (no validation selection).
# conv1d_kernel_size 3: fusion_kernel None resolves to 3 on these sequences (checked below)
OFFICIAL_FIXED = {"translator_kernel": 3, "translator_bias": False, "relu_dropout": 0.0,
                  "res_dropout": 0.0, "memory_layers": None, "grad_clip_mode": "value",
                  "fusion": "mult", "objective": "cyin", "official": True,
                  "modality_dropout": 0.0}


@pytest.mark.parametrize("preset,official", [("mosi", OFFICIAL_MOSI), ("mosei", OFFICIAL_MOSEI)])
def test_official_presets_are_the_official_configuration(preset, official):
    """Every value of the official config file, and the official code's fixed choices."""
    cfg = default_config("cyin", preset)
    want = {**official, **OFFICIAL_FIXED}
    assert {k: tuple(cfg[k]) if isinstance(cfg[k], list) else cfg[k] for k in want} == want
    ds = make_data({"text": (6, 8), "audio": (6, 4), "vision": (6, 5)}, task="regression")
    small = {**cfg, "common_dim": 16, "mult_heads": 2, "ib_dim": 8, "ib_inter_dim": 8,
             "translator_widths": [4, 2], "translator_blocks": 2}
    model = get_method("cyin").build(ds, small)
    recipe = get_method("cyin").recipe(cfg)
    assert recipe.stage1_epochs == {"mosi": 3, "mosei": 9}[preset]  # epochs <= 30 * 0.1 / 0.3
    assert [e for e in range(30) if recipe.selects(e)] == [29]       # the last epoch
    assert recipe.grad_clip_mode == "value" and recipe.grad_clip == official["grad_clip"]
    # the MulT structure: 6 cross-modal transformers, memories of width 2 d with
    # max(nlevels, 3) layers, attention dropout of the *source* modality (get_network)
    fusion = model.fusion
    assert len(fusion.cross) == 3 and all(len(c) == 2 for c in fusion.cross)
    assert [len(m.layers) for m in fusion.memory] == [max(official["mult_layers"], 3)] * 3
    assert fusion.memory[0].layers[0].attn.embed_dim == 2 * 16
    drops = official["attn_dropout"]
    names = ["text", "audio", "vision"]
    for n, row in enumerate(fusion.cross):
        sources = [m for m in names if m != names[n]]
        assert [c.cross.layers[0].attn.dropout for c in row] == [drops[m] for m in sources]
    assert model.fusion_proj["text"].kernel_size == (3,) and model.fusion_proj["text"].bias is None
    assert model.cycle.translator.kernel_size == 3 and model.cycle.translator.bias is None
    assert (model.decoder_sigmoid, model.combine, model.stochastic_test, model.ib_samples) == \
        (True, "sum", True, "per_pair")


def test_config_round_trip_and_official_flag():
    method = get_method("cyin")
    ds = make_data(HW6)
    cfg = default_config("cyin", "mosi")
    assert json.loads(json.dumps(cfg)) == cfg
    assert method.config(None, json.loads(json.dumps(cfg))) == cfg
    ours = method.build(ds, SMALL)
    official = method.build(ds, {**SMALL, "official": True})
    assert (ours.decoder_sigmoid, ours.combine, ours.stochastic_test, ours.ib_samples) == \
        (False, "mean", False, "shared")
    assert (official.decoder_sigmoid, official.combine, official.stochastic_test,
            official.ib_samples) == tuple(OFFICIAL_QUIRKS[k] for k in (
                "decoder_sigmoid", "combine", "stochastic_test", "ib_samples"))
    assert isinstance(official.decoders["fac"][-1], torch.nn.Sigmoid)
    assert official.cycle.combine == "sum" and official.ib["fac"].sample_in_eval
    assert not ours.ib["fac"].sample_in_eval and ours.cycle.combine == "mean"
    mixed = method.build(ds, {**SMALL, "official": True, "combine": "mean"})  # explicit wins
    assert mixed.combine == "mean" and mixed.decoder_sigmoid
    with pytest.raises(ValueError, match="no_such_key"):
        method.build(ds, {"no_such_key": 1})
    with pytest.raises(ValueError, match="no_such_key"):
        method.recipe({"no_such_key": 1})
    with pytest.raises(ValueError, match="combine"):
        method.build(ds, {**SMALL, "combine": "max"})
    with pytest.raises(ValueError, match="at least 2"):
        CyIN({"a": (1, 3)}, "classification", 3, **SMALL)
    with pytest.raises(ValueError, match="fusion_kernel"):
        method.build(ds, {**SMALL, "fusion_kernel": 3})  # vectors: L = 1 < 3
    with pytest.raises(ValueError, match="attn_dropout"):
        method.build(ds, {**SMALL, "attn_dropout": {"fac": 0.1}})  # not one per modality
    with pytest.raises(ValueError, match="grad_clip_mode"):
        method.recipe({"grad_clip_mode": "max"})


# ---------------------------------------------------------------- CLI smoke trains

def test_cli_train_on_mmsa_format(tmp_path):
    path = write_pkl(tmp_path / "unaligned_50.pkl", mmsa_dict(aligned=False))
    out = tmp_path / "mmsa"
    sets = [f"{k}={json.dumps(v)}" for k, v in SMALL.items()]
    args = ["train", "--method", "cyin", "--data", f"mmsa:{path}", "--seeds", "1111",
            "--out", str(out), "--no-progress", "--protocol", "complete+eta:0.5",
            "--set", "epochs=2", "--set", "batch_size=2", "--set", "stage_divide=0.5"]
    for s in sets:
        args += ["--set", s]
    assert cli.main(args) == 0
    result = json.loads((out / "results.json").read_text())
    points = result["per_seed"]["cyin"]["1111"]
    assert set(points) == {"complete", "eta:0.5"}
    assert all(v["MAE"] == v["MAE"] for v in points.values())  # finite, not NaN


def test_cli_train_on_handwritten(tmp_path):
    out = tmp_path / "hw"
    assert cli.main(["train", "--method", "cyin", "--seeds", "1111", "--out", str(out),
                     "--no-progress", "--protocol", "complete+eta:0.5", "--set", "epochs=2",
                     "--set", "stage_divide=0.5"]) == 0
    result = json.loads((out / "results.json").read_text())
    acc = result["per_seed"]["cyin"]["1111"]
    assert acc["complete"]["accuracy"] > 0.5  # 2 epochs already learn most of it
    best = load_best(out / "cyin" / "seed-1111" / "best.pt")
    history = best["history"]
    assert [h["stage"] for h in history] == ["stage1", "stage2"]
    assert "translation" not in history[0]["train"] and history[1]["train"]["translation"] > 0
    assert not history[0]["selected"] and history[1]["selected"]  # stage 1 is never selected


# ---------------------------------------------------------------- the IB terms (issue 13)

def _official_ib(model, inputs, present_all=True):
    """CyIN's IB_loss for complete inputs restated from the official IB_translate (z = mu:
    the model in eval mode without sampling): (1/M^2) sum over (m, n) of
    mean(-0.5 mean_D(1 + lv - mu^2 - e^lv)) + eta nn.MSELoss(Dec_n(z_m), x_n), x_n the RAW
    input features."""
    total = 0.0
    names = list(inputs)
    for m in names:
        enc = model.ib[m].head
        h = enc(inputs[m])
        mu, lv = h.chunk(2, dim=-1)
        kl = (-0.5 * torch.mean(1 + lv - mu.pow(2) - lv.exp(), dim=-1)).mean()
        for n in names:
            total = total + kl + model.eta * F.mse_loss(model.decoders[n](mu), inputs[n])
    return total / len(names) ** 2


@pytest.mark.parametrize("name", ["vec6", "seq3_aligned"])
def test_ib_target_is_the_raw_input(name):
    """The IB term equals the official formula with the raw features as every decoder's
    target (no trainable tensor between the input and the target)."""
    ds = data(name)
    model = build(ds, **NO_DROPOUT).eval()
    b = ds.batch(torch.arange(12))
    b.padding = {}  # complete, unpadded: the official setting
    with torch.no_grad():
        out = model(b.inputs, torch.ones_like(b.present), labels=b.labels)
        want = _official_ib(model, b.inputs) / model.eta
    torch.testing.assert_close(out.losses["ib"], want)


def test_ib_term_is_invariant_to_rescaling_the_encoder():
    """Issue 13's degenerate-target check: rescaling a layer and compensating in the next
    (ReLU is positively homogeneous) leaves every output and the KL unchanged -- and, as the
    target is the fixed input, the IB term too. (With the earlier learned input projection as
    the target, scaling it by 0.1 took the IB term from 5.66 to 0.08.)"""
    ds = data("seq3_aligned")
    model = build(ds, **NO_DROPOUT).eval()
    b = ds.batch(torch.arange(12))
    with torch.no_grad():
        before = model(b.inputs, b.present, labels=b.labels, padding=b.padding)
        for m in model.names:
            first, second = model.ib[m].head[0], model.ib[m].head[2]
            first.weight.mul_(0.1), first.bias.mul_(0.1), second.weight.mul_(10.0)
            dec_first, dec_last = model.decoders[m][0], model.decoders[m][2]
            dec_first.weight.mul_(0.1), dec_first.bias.mul_(0.1), dec_last.weight.mul_(10.0)
        after = model(b.inputs, b.present, labels=b.labels, padding=b.padding)
    torch.testing.assert_close(after.output, before.output, rtol=1e-5, atol=1e-6)
    for k in before.losses:
        torch.testing.assert_close(after.losses[k], before.losses[k], rtol=1e-5, atol=1e-6)
    assert before.losses["ib"] > 0.1  # the reconstruction term is not emptied
    # and no parameter is upstream of the target: scaling every IB/decoder parameter by any
    # factor cannot make the eta MSE part vanish; the target stays the input
    xs, zs, kls, valid, dec_in = model.encode(b.inputs, b.present, b.padding)
    for i, m in enumerate(model.names):
        assert not xs[m].requires_grad
        keep = valid[m].unsqueeze(-1)
        assert torch.equal(torch.where(keep, xs[m], 0), torch.where(keep, b.inputs[m], 0))


def test_ib_samples_per_pair_draws_one_sample_per_term():
    """ib_samples="per_pair" (official): each decoder reads its own draw, z_m is the last; the
    shared default reads one draw for all. At z = mu (eval, no sampling) both are the same."""
    ds = data("seq3_aligned")
    b = ds.batch(torch.arange(12))
    per_pair = build(ds, ib_samples="per_pair").train()
    torch.manual_seed(0)
    _, zs, _, _, dec_in = per_pair.encode(b.inputs, b.present, b.padding)
    for m in per_pair.names:
        draws = dec_in[m]
        assert draws[-1] is zs[m]
        assert not torch.equal(draws[0], draws[1]) and not torch.equal(draws[1], draws[2])
    shared = build(ds).train()
    _, zs, _, _, dec_in = shared.encode(b.inputs, b.present, b.padding)
    assert all(d is zs[m] for m in shared.names for d in dec_in[m])
    shared.load_state_dict(per_pair.state_dict())
    per_pair.eval(), shared.eval()
    with torch.no_grad():
        a = per_pair(b.inputs, b.present, labels=b.labels, padding=b.padding)
        c = shared(b.inputs, b.present, labels=b.labels, padding=b.padding)
    for k in a.losses:
        torch.testing.assert_close(a.losses[k], c.losses[k])


@pytest.mark.parametrize("fusion", ["mult", "joint"])
def test_fusion_kernel_3_on_sequences(fusion):
    """The official 3-tap input projections (no padding: L - 2 tokens) with both fusions, on
    aligned padded sequences: finite losses, gradients reach every projection, absent and
    padded values inert."""
    ds = data("seq3_aligned")
    model = build(ds, fusion=fusion, fusion_kernel=3, translator_kernel=3,
                  translator_bias=False).train()
    assert model.fusion_proj["text"].kernel_size == (3,)
    b = ds.batch(torch.arange(12), present_mask(12, 3))
    out = run(model, b, "stage2")
    out.loss.backward()
    assert all(torch.isfinite(v) for v in out.losses.values())
    for m in model.names:
        assert model.fusion_proj[m].weight.grad.abs().sum() > 0
    hidden = {m: (~b.present[:, i, None, None] | b.padding[m][..., None]).expand_as(b.inputs[m])
              for i, m in enumerate(ds.modalities)}
    fills = [{m: torch.where(hidden[m], torch.full_like(x, v), x) for m, x in b.inputs.items()}
             for v in (1e3, float("nan"))]
    assert_inert(*(_loss_output_grads(model, f, b, "stage2", seed=3) for f in fills))
