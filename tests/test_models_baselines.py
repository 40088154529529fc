"""EarlyFusion, LateFusion, UME-MMA, the encoders and the method registry.

Two small datasets built by hand: a Handwritten-like classification (6 vector views, L = 1) and
a MOSI-like regression (3 padded sequences, L = 7/5/6). The transformer encoder runs on the
fused masked attention op (checked with the backend counters)."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import robustmm_fast
from robustmm_fast import _backend
from robustmm_fast.data.dataset import MultimodalDataset
from robustmm_fast.models import EarlyFusion, LateFusion, make_encoder
from robustmm_fast.models.encoders import MLPEncoder, TransformerEncoder, masked_mean
from robustmm_fast.models.registry import METHODS, default_config, get_method
from robustmm_fast.models.ume_mma import UMEMMA, UMEMMARecipe

from conftest import assert_inert

SMALL = {"hidden": 16, "heads": 2, "layers": 1, "dropout": 0.0}


pytestmark = pytest.mark.usefixtures("one_thread")


def _splits(n):
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    return {"train": idx[: n // 2], "valid": idx[n // 2: 3 * n // 4], "test": idx[3 * n // 4:]}


def handwritten_like(n=40, seed=0) -> MultimodalDataset:
    g = torch.Generator().manual_seed(seed)
    dims = {"fac": 5, "fou": 7, "kar": 3, "mor": 2, "pix": 6, "zer": 4}
    inputs = {m: torch.randn(n, 1, d, generator=g) for m, d in dims.items()}
    labels = torch.randint(0, 3, (n,), generator=g)
    return MultimodalDataset("hw_like", "classification", inputs, labels, _splits(n), num_classes=3)


def mosi_like(n=24, seed=0) -> MultimodalDataset:
    g = torch.Generator().manual_seed(seed)
    shapes = {"text": (7, 8), "audio": (5, 4), "vision": (6, 5)}
    inputs = {m: torch.randn(n, L, D, generator=g) for m, (L, D) in shapes.items()}
    lengths = {m: torch.randint(1, L + 1, (n,), generator=g) for m, (L, _) in shapes.items()}
    lengths["audio"][0] = 0  # a sample whose audio has no valid token
    labels = torch.rand(n, generator=g) * 6 - 3
    return MultimodalDataset("mosi_like", "regression", inputs, labels, _splits(n), lengths=lengths)


DATASETS = {"hw": handwritten_like, "mosi": mosi_like}


def _build(method, ds, **over):
    torch.manual_seed(0)
    cfg = {k: v for k, v in SMALL.items() if k in get_method(method).defaults}
    return get_method(method).build(ds, {**cfg, **over})


def _present(n, m, seed=1):
    """Random masks with one all-absent row, one all-present row and one single-present row."""
    p = torch.rand(n, m, generator=torch.Generator().manual_seed(seed)) > 0.4
    p[0], p[1], p[2] = False, True, False
    p[2, m - 1] = True
    return p


# ---------------------------------------------------------------- shapes and losses

@pytest.mark.parametrize("data", DATASETS)
@pytest.mark.parametrize("method", ["early_fusion", "late_fusion", "ume_mma"])
def test_output_shapes_and_named_finite_losses(method, data):
    ds = DATASETS[data]()
    model = _build(method, ds)
    b = ds.batch(torch.arange(10), _present(10, ds.num_modalities))
    out = model(b.inputs, b.present, labels=b.labels, padding=b.padding)
    if ds.task == "classification":
        assert out.logits.shape == (10, 3) and out.prediction is None
    else:
        assert out.prediction.shape == (10,) and out.logits is None
    assert list(out.losses) == ["task"]
    assert torch.isfinite(out.loss) and torch.isfinite(out.output).all()
    if method != "early_fusion":
        uni = model(b.inputs, b.present, labels=b.labels, padding=b.padding, stage="unimodal")
        assert list(uni.losses) == [f"uni_{m}" for m in ds.modalities]
        assert all(torch.isfinite(v) for v in uni.losses.values())


# ---------------------------------------------------------------- absent / padded values are inert

def _loss_and_grads(model, inputs, present, labels, padding, stage=None):
    model.zero_grad(set_to_none=True)
    out = model(inputs, present, labels=labels, padding=padding, stage=stage)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.output.detach(), out.loss.detach(), grads


@pytest.mark.parametrize("data", DATASETS)
@pytest.mark.parametrize("method,stage", [("early_fusion", None), ("late_fusion", None),
                                          ("ume_mma", "unimodal"), ("ume_mma", "finetune")])
def test_absent_and_padded_values_never_reach_output_or_gradients(method, stage, data):
    ds = DATASETS[data]()
    model = _build(method, ds).eval()  # eval: no dropout, so both runs compute the same thing
    b = ds.batch(torch.arange(12), _present(12, ds.num_modalities))
    hidden = {}
    for i, m in enumerate(ds.modalities):
        mask = ~b.present[:, i, None, None]                              # absent samples
        if m in b.padding:
            mask = mask | b.padding[m][..., None]                        # padded tokens
        hidden[m] = mask.expand_as(b.inputs[m])
    assert any(h.any() for h in hidden.values())
    other = {m: torch.where(hidden[m], torch.full_like(x, 1e3), x) for m, x in b.inputs.items()}
    nans = {m: torch.where(hidden[m], torch.full_like(x, float("nan")), x)
            for m, x in b.inputs.items()}
    assert_inert(_loss_and_grads(model, other, b.present, b.labels, b.padding, stage),
                 _loss_and_grads(model, nans, b.present, b.labels, b.padding, stage))


@pytest.mark.parametrize("data", DATASETS)
@pytest.mark.parametrize("method", ["early_fusion", "late_fusion", "ume_mma"])
def test_all_absent_sample_gives_finite_output(method, data):
    ds = DATASETS[data]()
    model = _build(method, ds).eval()
    b = ds.batch(torch.arange(4), torch.zeros(4, ds.num_modalities, dtype=torch.bool))
    out = model(b.inputs, b.present, labels=b.labels, padding=b.padding)
    assert torch.isfinite(out.output).all() and torch.isfinite(out.loss)
    if method != "early_fusion":  # late fusion: nothing present, nothing summed
        assert torch.equal(out.output, torch.zeros_like(out.output))


def test_early_fusion_tells_absent_from_zero_features():
    """The presence mask is an input: 'absent' and 'present with all-zero features' differ."""
    ds = handwritten_like()
    model = _build("early_fusion", ds).eval()
    with torch.no_grad():  # zero features then embed to 0 exactly as an absent modality does
        for lin in model.embed.values():
            lin.bias.zero_()
    b = ds.batch(torch.arange(3))
    zeros = {m: torch.zeros_like(x) for m, x in b.inputs.items()}
    absent = b.present.clone()
    absent[:, 0] = False
    assert not torch.allclose(model(zeros, b.present).logits, model(zeros, absent).logits)


# ---------------------------------------------------------------- late fusion by hand

@pytest.mark.parametrize("combine", ["sum", "mean"])
@pytest.mark.parametrize("data", DATASETS)
def test_late_fusion_combines_the_present_branches(data, combine):
    ds = DATASETS[data]()
    model = _build("late_fusion", ds, combine=combine).eval()
    b = ds.batch(torch.arange(12), _present(12, ds.num_modalities))
    out = model(b.inputs, b.present, labels=b.labels, padding=b.padding)
    uni = model(b.inputs, b.present, labels=b.labels, padding=b.padding, stage="unimodal").losses
    with torch.no_grad():
        expected = torch.zeros(12, model.out_dim)
        for i, m in enumerate(ds.modalities):
            pad = b.padding.get(m)
            rows = b.present[:, i].nonzero().squeeze(1).tolist()
            for r in rows:  # each present sample through its branch on its own
                x = b.inputs[m][r:r + 1]
                z = model.heads[m](model.encoders[m](x, None if pad is None else pad[r:r + 1]))
                expected[r] += z[0]
            zs = torch.stack([model.heads[m](model.encoders[m](b.inputs[m][r:r + 1], None if pad
                              is None else pad[r:r + 1]))[0] for r in rows])
            zs = zs if ds.task == "classification" else zs.squeeze(-1)
            want = (F.cross_entropy(zs, b.labels[rows]) if ds.task == "classification"
                    else F.l1_loss(zs, b.labels[rows]))
            torch.testing.assert_close(uni[f"uni_{m}"], want, rtol=1e-5, atol=1e-6)
        if combine == "mean":
            expected /= b.present.sum(1, keepdim=True).clamp(min=1)
    got = out.logits if ds.task == "classification" else out.prediction[:, None]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_late_fusion_unimodal_loss_of_a_modality_absent_from_the_batch_is_zero():
    ds = handwritten_like()
    model = _build("late_fusion", ds)
    b = ds.batch(torch.arange(6))
    b.present[:, 2] = False
    losses = model(b.inputs, b.present, labels=b.labels, stage="unimodal").losses
    assert float(losses["uni_kar"].detach()) == 0.0 and losses["uni_kar"].requires_grad


def test_model_arguments_are_checked():
    mods = {"a": (1, 3)}
    with pytest.raises(ValueError, match="combine"):
        LateFusion(mods, "classification", 2, combine="max")
    with pytest.raises(ValueError, match="regression_loss"):
        EarlyFusion(mods, "regression", regression_loss="huber")
    with pytest.raises(ValueError, match="heads"):
        LateFusion({"a": (4, 3)}, "regression", hidden=10, heads=4)
    model = LateFusion(mods, "classification", 2)
    with pytest.raises(ValueError, match="modalities"):
        model({"b": torch.zeros(2, 1, 3)}, torch.ones(2, 1, dtype=torch.bool))


# ---------------------------------------------------------------- encoders

def test_make_encoder_kinds_and_checks():
    assert isinstance(make_encoder(1, 5, 8), MLPEncoder)
    assert isinstance(make_encoder(4, 5, 8, heads=2), TransformerEncoder)
    assert isinstance(make_encoder(4, 5, 8, kind="mlp"), MLPEncoder)
    for kw, match in ((dict(kind="lstm"), "kind"), (dict(layers=0), "layers"),
                      (dict(dropout=1.0), "dropout"), (dict(heads=3), "multiple of heads")):
        with pytest.raises(ValueError, match=match):
            make_encoder(4, 5, 8, **kw)
    x = torch.arange(12.0).view(2, 3, 2)
    pad = torch.tensor([[False, False, True], [True, True, True]])
    torch.testing.assert_close(masked_mean(x, pad), torch.tensor([[1.0, 2.0], [0.0, 0.0]]))


def test_transformer_encoder_runs_the_fused_attention_and_ignores_padding():
    """A padded sample encodes as its valid prefix alone; the masked attention op really ran
    (on the C++ kernel when the extension is built, as `auto` chooses)."""
    torch.manual_seed(0)
    enc = make_encoder(6, 5, 8, heads=2, layers=2).eval()
    x = torch.randn(3, 6, 5)
    lengths = torch.tensor([6, 4, 1])
    pad = torch.arange(6) >= lengths[:, None]
    x_nan = torch.where(pad[..., None], float("nan"), x)
    before = sum(n for (op, _), n in _backend.backend_calls.items() if op == "masked_attention")
    x_nan.requires_grad_(True)
    h = enc(x_nan, pad)                                                    # (3, 8)
    h.sum().backward()
    after = sum(n for (op, _), n in _backend.backend_calls.items() if op == "masked_attention")
    assert after >= before + 4  # 2 layers, forward and backward
    if robustmm_fast.backends()["cpp"]["available"]:
        assert robustmm_fast.last_backend("masked_attention") == "cpp"
    assert torch.isfinite(x_nan.grad).all() and (x_nan.grad[pad] == 0).all()
    with torch.no_grad():
        for b, n in enumerate(lengths.tolist()):
            torch.testing.assert_close(h[b], enc(x[b:b + 1, :n])[0], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- UME-MMA recipe

def test_ume_mma_stages_selection_and_augmentation():
    recipe = UMEMMARecipe({"unimodal_epochs": 2, "finetune_epochs": 3, "modality_dropout": 0.5})
    assert recipe.epochs == 5
    assert [recipe.stage(e) for e in range(5)] == ["unimodal"] * 2 + ["finetune"] * 3
    assert [recipe.selects(e) for e in range(5)] == [False, False, True, True, True]
    present = torch.ones(200, 4, dtype=torch.bool)
    present[:20, 1:] = False                                              # single-present rows
    g = torch.Generator().manual_seed(0)
    assert torch.equal(recipe.augment(present, epoch=1, stage="unimodal", generator=g), present)
    aug = recipe.augment(present, epoch=2, stage="finetune", generator=g)
    assert not (aug & ~present).any()                                     # only drops
    assert aug.any(1).all()                                               # every row keeps one
    assert 0.3 < 1 - aug[20:].float().mean() < 0.6                        # ~ p of the entries
    with pytest.raises(ValueError, match="stage"):
        recipe.augment(present, epoch=0, stage="main", generator=g)
    with pytest.raises(ValueError, match="unimodal_epochs"):
        UMEMMARecipe({"epochs": 5})


def test_ume_mma_unimodal_step_trains_branches_alone_with_its_own_optimizer():
    ds = handwritten_like()
    model = _build("ume_mma", ds)
    recipe = get_method("ume_mma").recipe({"unimodal_epochs": 1, "finetune_epochs": 1, "lr": 1e-2})
    opts = recipe.optimizers(model)
    b = ds.batch(torch.arange(16), _present(16, ds.num_modalities))
    with torch.no_grad():
        uni = model(b.inputs, b.present, labels=b.labels, stage="unimodal").losses
    logged = recipe.train_step(model, b, opts, epoch=0, step=0, stage="unimodal")
    assert set(logged) == {"loss"} | {f"uni_{m}" for m in ds.modalities}
    assert logged["loss"] == pytest.approx(sum(float(v) for v in uni.values()), rel=1e-6)
    assert opts["unimodal"].state and not opts["finetune"].state     # fresh state for finetune
    logged = recipe.train_step(model, b, opts, epoch=1, step=0, stage="finetune")
    assert set(logged) == {"loss", "task"} and opts["finetune"].state


def test_ume_mma_is_late_fusion_with_sum():
    ds = handwritten_like()
    model = _build("ume_mma", ds)
    assert isinstance(model, UMEMMA) and isinstance(model, LateFusion) and model.combine == "sum"


# ---------------------------------------------------------------- training reduces the loss

def _easy(n=96) -> MultimodalDataset:
    """Labels a linear function of two views' features (the rest is noise)."""
    g = torch.Generator().manual_seed(3)
    inputs = {"a": torch.randn(n, 1, 4, generator=g), "b": torch.randn(n, 1, 3, generator=g),
              "c": torch.randn(n, 1, 2, generator=g)}
    labels = ((inputs["a"][:, 0, 0] + inputs["b"][:, 0, 1]) > 0).long()
    return MultimodalDataset("easy", "classification", inputs, labels,
                             {"train": torch.arange(n)}, num_classes=2)


@pytest.mark.parametrize("method", ["early_fusion", "late_fusion", "ume_mma"])
def test_a_few_recipe_steps_reduce_the_loss(method):
    ds = _easy()
    over = {"unimodal_epochs": 1, "finetune_epochs": 1} if method == "ume_mma" else {"epochs": 2}
    m = get_method(method)
    cfg = m.config(None, {**{k: v for k, v in SMALL.items() if k in m.defaults}, **over,
                          "lr": 1e-2, "modality_dropout": 0.3})
    torch.manual_seed(0)
    model, recipe = m.build(ds, cfg), m.recipe(cfg)
    opts, g = recipe.optimizers(model), torch.Generator().manual_seed(0)
    full = ds.batch(ds.splits["train"])

    def loss():
        with torch.no_grad():
            return float(model.eval()(full.inputs, full.present, labels=full.labels).loss)

    start = loss()
    step = 0
    for epoch in range(recipe.epochs):
        stage = recipe.stage(epoch)
        model.train()
        for _ in range(15):
            for b in ds.batches("train", 32, shuffle=True, generator=g):
                b.present = recipe.augment(b.present, epoch=epoch, stage=stage, generator=g)
                recipe.train_step(model, b, opts, epoch=epoch, step=step, stage=stage)
                step += 1
    assert loss() < 0.5 * start


# ---------------------------------------------------------------- registry

@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_preset_round_trips_through_json_and_builds(name):
    """Each method's defaults and presets: a JSON round trip gives the same config, and the
    same model (parameter shapes) and a recipe are built from either (the MOSI/MOSEI presets on
    text/audio/vision data: CyIN's name its modalities' attention dropouts)."""
    method = METHODS[name]
    for preset in (None, *method.presets):
        ds = mosi_like() if preset in ("mosi", "mosei") else handwritten_like()
        cfg = method.config(preset)
        again = json.loads(json.dumps(cfg))
        assert again == cfg, preset
        a, b = method.build(ds, cfg), method.build(ds, again)
        assert {k: v.shape for k, v in a.state_dict().items()} == \
            {k: v.shape for k, v in b.state_dict().items()}
        method.recipe(again)


def test_registry_lookup_configs_and_build():
    assert {"early_fusion", "late_fusion", "ume_mma"} <= set(METHODS)
    with pytest.raises(ValueError, match="early_fusion"):
        get_method("nope")
    for name, method in METHODS.items():
        json.dumps(method.defaults)
        assert method.paper
        assert default_config(name) == method.defaults
        assert default_config(name, "no-such-dataset") == method.defaults
        hw = default_config(name, "handwritten")
        assert hw != method.defaults and set(hw) == set(method.defaults)
        with pytest.raises(ValueError, match="bogus"):
            method.build(handwritten_like(), {"bogus": 1})
        with pytest.raises(ValueError, match="bogus"):
            method.recipe({"bogus": 1})
        with pytest.raises(ValueError, match="bogus"):
            method.config("handwritten", {"bogus": 1})
    assert "2310.06383" in METHODS["ume_mma"].paper
    assert {"cyin", "dmrnet", "mim"} <= set(METHODS)
    ds = mosi_like()
    model = get_method("late_fusion").build(ds, {"hidden": 8, "heads": 2})
    assert model.modalities == {"text": (7, 8), "audio": (5, 4), "vision": (6, 5)}
    assert model.task == "regression" and model.out_dim == 1
    recipe = get_method("ume_mma").recipe(default_config("ume_mma", "handwritten"))
    hw = default_config("ume_mma", "handwritten")
    assert recipe.epochs == hw["unimodal_epochs"] + hw["finetune_epochs"]
