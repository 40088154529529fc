"""The methods the harness can train, by name: how to build the model for a dataset, its
recipe, its default hyperparameters and per-dataset presets.

    method = get_method("ume_mma")
    config = default_config("ume_mma", dataset.name)      # defaults + the dataset's preset
    model, recipe = method.build(dataset, config), method.recipe(config)

A config is a plain JSON-able dict; keys a method does not know raise ValueError naming them.
build/recipe fill keys missing from `config` with the method's defaults (not the presets).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

from torch import nn

from ..train.recipe import Recipe
from .cyin import CyIN, CyINRecipe
from .dmrnet import DMRNet, DMRNetRecipe
from .early_fusion import EarlyFusion
from .late_fusion import LateFusion
from .mim import MIM, MIMRecipe
from .ume_mma import UMEMMA, UMEMMARecipe

__all__ = ["Method", "METHODS", "get_method", "default_config", "check_config"]

# Keys every Recipe reads (train/recipe.py).
_RECIPE = {"epochs": 30, "batch_size": 64, "lr": 1e-3, "weight_decay": 1e-4, "grad_clip": 0.0,
           "modality_dropout": 0.0}
_MODEL = {"hidden": 128, "dropout": 0.1, "regression_loss": "l1"}
_ENCODER = {"encoder": "auto", "layers": 2, "heads": 4}

# Handwritten (1,440 training samples, 6 vector views): small MLPs that train in seconds on
# 2 CPU cores; inputs are standardized per view, so a plain AdamW at 1e-3 is stable.
_HANDWRITTEN = {"epochs": 40, "batch_size": 64, "lr": 1e-3, "hidden": 128, "dropout": 0.2}


@dataclass(frozen=True)
class Method:
    """name; build(dataset, config) -> model; recipe(config) -> Recipe; defaults: every key the
    method accepts with its default; presets: {dataset name: keys overriding the defaults};
    paper: the citation."""
    name: str
    build: Callable[..., nn.Module]
    recipe: Callable[[dict], Recipe]
    defaults: dict
    presets: dict = field(default_factory=dict)
    paper: str = ""

    def config(self, dataset_name: Optional[str] = None, overrides: Optional[dict] = None) -> dict:
        """defaults, then the preset for `dataset_name` (if any), then overrides (checked)."""
        out = {**self.defaults, **self.presets.get(dataset_name, {}), **(overrides or {})}
        check_config(self.name, out, self.defaults)
        return out


def check_config(name: str, config: dict, defaults: dict) -> dict:
    """{**defaults, **config}; ValueError naming the keys `name` does not know."""
    if not isinstance(config, dict):
        raise TypeError(f"{name}: config must be a dict, got {type(config).__name__}")
    unknown = sorted(set(config) - set(defaults))
    if unknown:
        raise ValueError(f"{name}: unknown config key(s) {unknown}; known keys: {sorted(defaults)}")
    return {**defaults, **config}


def _modalities(dataset) -> dict[str, tuple[int, int]]:
    return {m: (dataset.seq_lens[m], dataset.dims[m]) for m in dataset.modalities}


def _model_builder(name: str, cls, keys: tuple[str, ...], defaults: dict):
    def build(dataset, config: Optional[dict] = None) -> nn.Module:
        cfg = check_config(name, config or {}, defaults)
        return cls(_modalities(dataset), dataset.task, dataset.num_classes,
                   **{k: cfg[k] for k in keys})
    build.__name__ = build.__qualname__ = f"build_{name}"
    return build


def _recipe_builder(name: str, cls, keys: tuple[str, ...], defaults: dict):
    def recipe(config: Optional[dict] = None) -> Recipe:
        cfg = check_config(name, config or {}, defaults)
        return cls({k: cfg[k] for k in keys})
    recipe.__name__ = recipe.__qualname__ = f"recipe_{name}"
    return recipe


def _method(name, model_cls, model_defaults, recipe_cls, recipe_defaults, presets, paper):
    defaults = {**model_defaults, **recipe_defaults}
    return Method(name, _model_builder(name, model_cls, tuple(model_defaults), defaults),
                  _recipe_builder(name, recipe_cls, tuple(recipe_defaults), defaults),
                  defaults, presets, paper)


_UME_RECIPE = {k: v for k, v in _RECIPE.items() if k != "epochs"}
_UME_RECIPE.update(unimodal_epochs=10, finetune_epochs=20, finetune_lr=None, modality_dropout=0.5)
_UME_HANDWRITTEN = {k: v for k, v in _HANDWRITTEN.items() if k != "epochs"}
_UME_HANDWRITTEN.update(unimodal_epochs=20, finetune_epochs=20, finetune_lr=5e-4)

# CyIN (issue 6). Defaults: the official code's MOSI settings (the three quirk options are None:
# "as `official` says", i.e. ours unless official=True; see models/cyin.py). fusion_dim and the
# MulT dropouts/memory layers are MulT's choices, not given by the official CyIN settings.
_CYIN_MODEL = {"common_dim": 256, "ib_inter_dim": 256, "ib_dim": 128, "eta": 16.0,
               "decoder_sigmoid": None, "combine": None, "stochastic_test": None,
               "official": False, "fusion_dim": 32, "mult_layers": 2, "mult_heads": 8,
               "memory_layers": 3, "attn_dropout": 0.1, "relu_dropout": 0.1, "res_dropout": 0.1,
               "embed_dropout": 0.25, "out_dropout": 0.0, "translator_widths": [64, 32, 16],
               "translator_blocks": 8, "lam": 10.0, "translate": True, "label_weight": 1.0,
               "regression_loss": "l1"}
_CYIN_RECIPE = {**_RECIPE, "epochs": 30, "stage_divide": 0.1, "batch_size": 128, "lr": 5e-4}
# The official MOSI configuration (issue 6), spelled out so it does not move with the defaults.
_CYIN_MOSI = {"epochs": 30, "stage_divide": 0.1, "batch_size": 128, "lr": 5e-4,
              "common_dim": 256, "ib_inter_dim": 256, "ib_dim": 128, "eta": 16.0,
              "translator_widths": [64, 32, 16], "translator_blocks": 8, "lam": 10.0,
              "mult_layers": 2, "mult_heads": 8}
# Handwritten (6 vector views, L = 1): small widths that train in ~15-20 s per seed on 2 CPU
# cores (attention over one-token segments, so no memory stack and no attention dropout), and
# modality dropout so fusion also meets reconstructed latents of absent views.
_CYIN_HANDWRITTEN = {"epochs": 20, "stage_divide": 0.2, "batch_size": 128, "lr": 2e-3,
                     "modality_dropout": 0.3, "common_dim": 64, "ib_inter_dim": 64, "ib_dim": 32,
                     "eta": 16.0, "fusion_dim": 32, "mult_layers": 1, "mult_heads": 4,
                     "memory_layers": 0, "attn_dropout": 0.0, "relu_dropout": 0.0,
                     "res_dropout": 0.0, "embed_dropout": 0.0, "out_dropout": 0.1,
                     "translator_widths": [32, 16], "translator_blocks": 2, "lam": 1.0}

# DMRNet (issues 7, 13). Defaults: the official code's loss and schedule settings (KL weight
# 1e-3, 6 warm-up epochs = its epochs 0-5, top-1 unimodal hard combination, latent =
# concatenated width, beta 0.2 = its CREMA-D script's); encoder widths are ours. The quirk
# options are None: "as `official` says" (official=False: ours -- classifier dropout, PyTorch
# init, AdamW, no lr decay, pooled warm-up statistic; official=True: none, xavier, SGD momentum
# 0.9, StepLR 70 x 0.1, per-batch means; see models/dmrnet.py and docs/_fidelity_dmrnet.md).
_DMRNET_MODEL = {**_MODEL, **_ENCODER, "latent_dim": None, "kl_weight": 1e-3, "beta": 0.2,
                 "classifier_dropout": None, "init": None, "official": False}
_DMRNET_RECIPE = {**_RECIPE, "warmup_epochs": 6, "hard_k": 1, "hard_candidates": "unimodal",
                  "sample_combinations": True, "optimizer": None, "lr_decay_step": None,
                  "lr_decay_ratio": 0.1, "variance_statistic": None, "official": False}
# The official scripts' configurations ("audio-visual classification/cramed.sh:8", ks.sh:4, with
# main.py's defaults), spelled out so they do not move with the defaults. The harness does not
# load CREMA-D or Kinetics-Sounds, so they are not registered as presets: pass one as overrides,
# method.config(None, _DMRNET_CREMAD).
_DMRNET_CREMAD = {"official": True, "epochs": 100, "batch_size": 64, "lr": 1e-3,
                  "weight_decay": 1e-4, "lr_decay_step": 70, "lr_decay_ratio": 0.1,
                  "warmup_epochs": 6, "kl_weight": 1e-3, "beta": 0.2, "dropout": 0.0,
                  "hard_k": 1, "hard_candidates": "unimodal", "sample_combinations": True}
_DMRNET_KINETICS_SOUNDS = {**_DMRNET_CREMAD, "beta": 0.3}
# Handwritten: small MLPs, ~10-20 s per seed on 2 CPU cores.
_DMRNET_HANDWRITTEN = {**_HANDWRITTEN, "epochs": 30, "hidden": 64}

# MIM (issue 7, 13). Defaults: the official code's gate and loss settings (HardConcrete beta 1/3,
# gamma -0.2, zeta 1.0, bias +3, threshold 0.6; L0 weight 0.1, every KGS weight 1; product
# fusion; the UPN's bottleneck L // 5); widths, lr and epochs are ours (the official ones are in
# _MIM_MOSI). The five departure options (stochastic_test, inter_weighting, gates_from_main,
# mask_padding, mult_encoder) are None: "as `official` says" (models/mim.py,
# docs/_fidelity_mim.md).
# pool_activation: the official `activate` is published nowhere (README.md:32-56 omits it).
_MIM_MODEL = {"hidden": 64, "layers": 2, "heads": 4, "conv_kernel": 1, "dropout": 0.1,
              "attn_dropout": 0.0, "embed_dropout": 0.0, "conv_only": [],
              "gate_bottleneck": None, "gate_bias": 3.0, "temperature": 1 / 3, "gamma": -0.2,
              "zeta": 1.0, "threshold": 0.6, "fusion": "product", "out_dropout": 0.0,
              "pool_activation": "none", "unimodal_weight": 1.0, "intra_weight": 1.0,
              "inter_weight": 1.0, "l0_weight": 0.1, "stochastic_test": None,
              "inter_weighting": None, "gates_from_main": None, "mask_padding": None,
              "mult_encoder": None, "official": False, "regression_loss": "l1"}
_MIM_RECIPE = {**_RECIPE, "gate_lr": None}
# MOSI: the official configuration, spelled out so it does not move with the defaults.
# zengy268/MIM README.md:37-41: max_seq_length 50, lr 1e-5, d_l 80, n_epochs 100,
# train_batch_size 16 (MOSEI, README.md:51-54: only the feature dims change, read from the data);
# model.py:76, 82-89: Conv1d kernel 3, MulT encoder 3 layers x 5 heads, attention dropout 0.5,
# relu = residual dropout 0.3, embedding dropout 0.2; model.py:65-69: the text gets the Conv1d
# alone (after its BERT); model.py:134, 157, 173: the gate; train.py:75, 98: loss weights;
# utils/loss.py:16: L1; train.py:62-68: Adam (AdamW, weight decay 0) at one lr for both
# optimizers, no clipping; no missing modalities in training. With official=True this is the
# official code (docs/_fidelity_mim.md lists what remains different).
_MIM_MOSI = {"epochs": 100, "batch_size": 16, "lr": 1e-5, "gate_lr": None, "weight_decay": 0.0,
             "grad_clip": 0.0, "modality_dropout": 0.0, "hidden": 80, "layers": 3, "heads": 5,
             "conv_kernel": 3, "dropout": 0.3, "attn_dropout": 0.5, "embed_dropout": 0.2,
             "conv_only": ["text"], "gate_bottleneck": None, "gate_bias": 3.0,
             "temperature": 1 / 3, "gamma": -0.2, "zeta": 1.0, "threshold": 0.6,
             "fusion": "product", "out_dropout": 0.0, "unimodal_weight": 1.0,
             "intra_weight": 1.0, "inter_weight": 1.0, "l0_weight": 0.1, "regression_loss": "l1"}
# Handwritten (6 vector views, L = 1: one gate per view and sample): small widths, one layer,
# ~15 s per seed on 2 CPU cores; modality dropout so fusion meets missing views in training.
_MIM_HANDWRITTEN = {"epochs": 20, "batch_size": 128, "lr": 2e-3, "hidden": 64, "layers": 1,
                    "heads": 4, "dropout": 0.1, "modality_dropout": 0.3}

METHODS: dict[str, Method] = {m.name: m for m in (
    _method("early_fusion", EarlyFusion, _MODEL, Recipe, _RECIPE,
            {"handwritten": _HANDWRITTEN},
            "Early (feature-level) fusion baseline: concatenated modality embeddings + MLP"),
    _method("late_fusion", LateFusion, {**_MODEL, **_ENCODER, "combine": "sum"}, Recipe, _RECIPE,
            {"handwritten": _HANDWRITTEN},
            "Late (decision-level) fusion baseline: sum of the present modalities' logits"),
    _method("ume_mma", UMEMMA, {**_MODEL, **_ENCODER, "combine": "sum"}, UMEMMARecipe, _UME_RECIPE,
            {"handwritten": _UME_HANDWRITTEN},
            "S. Li, C. Du, Y. Zhao, Y. Huang, H. Zhao. What Makes for Robust Multi-Modal Models in "
            "the Face of Missing Modalities? arXiv:2310.06383, 2023 (UME-MMA)"),
    _method("cyin", CyIN, _CYIN_MODEL, CyINRecipe, _CYIN_RECIPE,
            {"mosi": _CYIN_MOSI, "handwritten": _CYIN_HANDWRITTEN},
            "Lin et al. CyIN: Cyclic Informative Latent Space for Bridging Complete and "
            "Incomplete Multimodal Learning. NeurIPS 2025 (CyIN)"),
    _method("dmrnet", DMRNet, _DMRNET_MODEL, DMRNetRecipe, _DMRNET_RECIPE,
            {"handwritten": _DMRNET_HANDWRITTEN},
            "Wei et al. Robust Multimodal Learning via Representation Decoupling. ECCV 2024 "
            "(DMRNet)"),
    _method("mim", MIM, _MIM_MODEL, MIMRecipe, _MIM_RECIPE,
            {"mosi": _MIM_MOSI, "handwritten": _MIM_HANDWRITTEN},
            "Zeng et al. Multimodal Reaction: Information Modulation for Cross-Modal "
            "Representation Learning. IEEE TMM 2023 (MIM)"),
)}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known methods: {sorted(METHODS)}")
    return METHODS[name]


def default_config(name: str, dataset_name: Optional[str] = None) -> dict:
    """The method's defaults merged with its preset for `dataset_name` (when it has one)."""
    return get_method(name).config(dataset_name)
