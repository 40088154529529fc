"""CyIN's mechanisms on synthetic data where the truth is known (issue #6, item 4).

Data (make_synthetic, regression): three vector modalities a, b, c (L = 1, D = 16), a shared
factor s (4 dims) seen by every modality and one specific dim u_m per modality, label weights
shared 1.0 / specific 0.2 (so every modality alone carries most of the label), observation
noise 0.5 (signal variance 1 per feature), 2,000 samples (1,400 / 200 / 400 train / valid /
test). 4/5 of each modality's latent factors are shared with the others, so a modality's
latent is largely -- not wholly -- predictable from the other two: the ground truth the
translators should find.

Model and recipe: CyIN through robustmm_fast.train.fit (stage 1 for 4 epochs, then 16 epochs
of stage 2: translation loss + latent substitution), at the Handwritten preset's small widths
(spelled out below, so the thresholds do not move with the preset), trained on complete data
as the official code does (modality_dropout 0), model selection on the validation split at
eta = 0.5 (select_on "random:0.5", the same for both arms: the ablation gets its best epoch
for the missing protocol). Each seed trains the model with translation (translate=True) and
the ablation (translate=False: absent latents zero-filled and masked out of fusion); the two
checks share these models (3 seeds x ~7 s + ~4.5 s on one thread: ~35-40 s).

Re-run on the faithful model (issue 13: the IB reads the raw features, MulT fusion, the 9 + 9
translation objective; `python tools/cyin_mechanism_numbers.py`, seeds 0-2):
- MSE(translation)/MSE(mean fill) 0.435..0.568, over the zero fill 0.414..0.554 (still < 0.6);
  cosine(translation, z_n) 0.487..0.643 against the mean fill's 0.169..0.287 (gap >= 0.27):
  the cosine > 0.5 check no longer holds on seed 0 (modality b 0.496, c 0.487) -- kept, as an
  expected failure with these numbers, not retuned.
- test MAE at eta = 0.5 with / without translation: 0.407 / 0.566, 0.371 / 0.562,
  0.422 / 0.529 (gaps 0.159, 0.191, 0.107; mean 0.152): still holds.
Before issue 13 (a learned input projection as the IB target, joint fusion), observed over
seeds 0..7 (scratch runs of exactly this setup; the test uses seeds 0, 1, 2):
- translation vs fills, per (seed, modality), 24 pairs: MSE(translation, z_n) / MSE(mean fill,
  z_n) in 0.20..0.45 (seeds 0-2: 0.25..0.39); the same over the zero fill in 0.19..0.43;
  mean cosine(translation, z_n) in 0.61..0.78 vs cosine(mean fill, z_n) 0.24..0.42 (the gap
  >= 0.26 in every pair).
- test MAE at eta = 0.5: with translation 0.35..0.45, without 0.51..0.60; the gap (without -
  with) 0.12..0.21 per seed (seeds 0, 1, 2: 0.136, 0.210, 0.122; mean 0.156;
  0.138, 0.212, 0.132 with ROBUSTMM_BACKEND=reference, whose float sums differ).
  Not a claim of this test: with modality dropout 0.3 in training (the Handwritten preset's)
  the ablation also learns the missing patterns and the gap shrinks to ~0.01 (seeds 0-2).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from robustmm_fast.data.synthetic import make_synthetic
from robustmm_fast.missing import random_missing
from robustmm_fast.models.registry import get_method
from robustmm_fast.train.engine import fit
from robustmm_fast.train.evaluate import evaluate

SEEDS = (0, 1, 2)
ETA = 0.5
DATA = dict(task="regression", num_samples=2000,
            modalities={"a": (1, 16), "b": (1, 16), "c": (1, 16)},
            shared=1.0, specific=0.2, noise=0.5, shared_dim=4, specific_dim=1)
# the Handwritten preset's small CyIN (registry._CYIN_HANDWRITTEN), spelled out, with the
# official complete-data training (modality_dropout 0) and selection at eta = 0.5
CONFIG = {"epochs": 20, "stage_divide": 0.2, "batch_size": 128, "lr": 2e-3,
          "weight_decay": 1e-4, "grad_clip": 0.0, "modality_dropout": 0.0, "ib_inter_dim": 64,
          "ib_dim": 32, "eta": 16.0, "common_dim": 32, "fusion": "mult", "fusion_kernel": 1,
          "translator_kernel": 1, "mult_layers": 1, "mult_heads": 4, "memory_layers": 1,
          "attn_dropout": 0.0, "memory_attn_dropout": 0.0, "embed_dropout": 0.0,
          "out_dropout": 0.1, "translator_widths": [32, 16], "translator_blocks": 2, "lam": 1.0,
          "select_on": f"random:{ETA}"}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained():
    """{seed: (dataset, fit result with translation, fit result without)}."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # module-scoped: the autouse fixture is not active yet
    try:
        out = {}
        for seed in SEEDS:
            ds = make_synthetic(seed=seed, **DATA)
            with_t = fit(get_method("cyin"), ds, config={**CONFIG, "translate": True}, seed=seed,
                         progress=False)
            without = fit(get_method("cyin"), ds, config={**CONFIG, "translate": False}, seed=seed,
                          progress=False)
            out[seed] = (ds, with_t, without)
        return out
    finally:
        torch.set_num_threads(n)


def _stage2_selected(result):
    assert result.history[-1]["stage"] == "stage2"
    assert result.history[result.best_epoch]["stage"] == "stage2"


@torch.no_grad()
def reconstruction_stats(model, ds) -> dict:
    """{modality n: (mse, cos)} for the test split with n absent and the others present:
    mse {"translation", "zero", "mean"} of the rebuilt z_n, the zero fill and the mean fill
    (z_n averaged over the training split) against the true z_n (every modality present);
    cos {"translation", "mean"} their mean cosine with it. (tools/cyin_mechanism_numbers.py
    prints the same.)"""
    train, test = ds.batch(ds.splits["train"]), ds.batch(ds.splits["test"])
    z_train = model(train.inputs, train.present).extras["latents"]
    z_test = model(test.inputs, test.present).extras["latents"]
    stats = {}
    for i, m in enumerate(ds.modalities):
        present = torch.ones_like(test.present)
        present[:, i] = False
        out = model(test.inputs, present)
        assert out.extras["available"][:, i].all()  # n enters fusion, reconstructed
        rec, z = out.extras["reconstructed"][i], z_test[m]          # (B, 1, D)
        assert rec.shape == z.shape
        mean_fill = z_train[m].mean(0, keepdim=True).expand_as(z)
        mse = {"translation": (rec - z).pow(2).mean().item(),
               "zero": z.pow(2).mean().item(),
               "mean": (mean_fill - z).pow(2).mean().item()}
        cos = {"translation": F.cosine_similarity(rec, z, dim=-1).mean().item(),
               "mean": F.cosine_similarity(mean_fill, z, dim=-1).mean().item()}
        stats[m] = (mse, cos)
    return stats


@torch.no_grad()
def test_translation_is_closer_to_the_true_latent_than_zero_or_mean_fill(trained):
    """For every test sample and modality n: make n absent (the others present) and compare
    CyIN's reconstruction of z_n (extras["reconstructed"][n]: the mean of the translations from
    the two present modalities) with the true latent z_n (extras["latents"][n] of the same
    model with every modality present; in eval z = mu, the IB mean, as stochastic_test is off).

    Baselines: the zero fill (0) and the mean fill (z_n averaged over the training split, the
    best constant in MSE; a fill that knows nothing about the sample scores a ratio >= ~1).
    Thresholds, per (seed, modality): MSE(translation) < 0.6 x MSE(mean fill) and
    < 0.6 x MSE(zero fill) -- the translation explains > 40% of z_n's variance (observed
    0.20..0.45 over seeds 0-7; ~0.2 is the ideal here, the 1/5 specific part of the latent
    being unpredictable; 0.41..0.57 on the faithful model); mean cosine(translation, z_n) >
    cosine(mean fill, z_n) + 0.1 (observed gap >= 0.26; >= 0.27 on the faithful model). The
    cosine > 0.5 check is test_translation_cosine_above_half."""
    for seed, (ds, result, _) in trained.items():
        _stage2_selected(result)
        model = result.model
        assert not model.training and not model.stochastic_test
        for m, (mse, cos) in reconstruction_stats(model, ds).items():
            what = f"seed {seed}, modality {m}: MSE {mse}, cosine {cos}"
            assert mse["translation"] < 0.6 * mse["mean"], what
            assert mse["translation"] < 0.6 * mse["zero"], what
            assert cos["translation"] > cos["mean"] + 0.1, what


@pytest.mark.xfail(strict=False, reason="on the faithful model (issue 13) seed 0's translations "
                   "of b and c have mean cosine 0.496 and 0.487 with the true latent (seeds 1-2: "
                   "0.600..0.643) with MulTFusion's per-block loop; with its grouped forward "
                   "(same math, another floating-point order) it passes: the outcome sits at the "
                   "threshold 0.5, which was set on the earlier model and is not retuned")
@torch.no_grad()
def test_translation_cosine_above_half(trained):
    """mean cosine(translation, z_n) > 0.5 for every (seed, modality) (the zero fill's is 0)."""
    for seed, (ds, result, _) in trained.items():
        for m, (_, cos) in reconstruction_stats(result.model, ds).items():
            cos = cos["translation"]
            assert cos > 0.5, f"seed {seed}, modality {m}: cosine {cos}"


def test_translation_beats_zero_filled_ablation_at_eta_half(trained):
    """Test MAE at eta = 0.5 (random_missing masks, seeded per seed, the same for both arms,
    400 test samples): CyIN with translation vs translate=False (absent latents zero-filled
    and masked), both trained on complete data with the same seed, config and selection.

    Observed gaps (MAE without - MAE with; labels in (-3, 3)): 0.12..0.21 over seeds 0-7,
    0.136 / 0.210 / 0.122 on seeds 0 / 1 / 2 (MAE with ~0.37-0.41, without ~0.54-0.60).
    Thresholds: the mean gap over the 3 seeds > 0.06 (under half the observed mean 0.156;
    the per-seed spread is ~0.03, so ~4 standard errors of the 3-seed mean below it) and the
    ablation worse on every seed (gap > 0.02)."""
    gaps = []
    for seed, (ds, with_t, without) in trained.items():
        _stage2_selected(with_t)
        mask = random_missing(ds.split_size("test"), ds.num_modalities, ETA, seed)
        mae_t = evaluate(with_t.model, ds, "test", present=mask)["MAE"]
        mae_f = evaluate(without.model, ds, "test", present=mask)["MAE"]
        gaps.append(mae_f - mae_t)
        assert mae_f - mae_t > 0.02, f"seed {seed}: MAE with {mae_t}, without {mae_f}"
    mean_gap = sum(gaps) / len(gaps)
    assert mean_gap > 0.06, f"gaps {gaps}"
