"""Benchmark cases of whole methods: one training step (forward + backward + optimizer steps, the
"fwd+bwd" column) and one inference forward (eval mode, no grad, the "fwd" column) of a model
on MOSI-like synthetic data, with the fused backends beside the reference backend, and each
under torch.compile of the model (when it compiles).

CyIN: B = 32, L = 50, text 768, audio 74, vision 35 (MOSEI's feature widths at MOSI's aligned
length), its `mosi` preset = the official MOSI configuration (official=True; MulT width 256,
IB 256/128, MulT fusion of 2 layers x 8 heads with 3-layer memories of width 512, Conv1d
translators [64, 32, 16] x 8 blocks), in stage 2 (translation and latent substitution on), so
all three fused ops run: masked_cross_attention, reparameterize_kl, cycle_reconstruction_loss.
"cyin_joint": the same with fusion="joint" (ours: one cross-modal transformer per target over
both sources, memory of width 256; one attention dropout, 0.1).

DMRNet: the same data, the default configuration (transformer encoders of width 128, 2 layers x
4 heads per modality; latent = 3 x 128), a step of the "hard" stage (after the warm-up): the
fused ops are masked_cross_attention (encoders) and reparameterize_kl (the bottleneck).

MIM: the same data, its `mosi` preset (the official configuration, official=True: Conv1d kernel
3, MulT encoders of 3 layers x 5 heads, width 80, the text Conv1d-only), a step of both its
optimizers: the fused op is masked_cross_attention (the audio and vision encoders).
"""
from __future__ import annotations

import torch

from .. import _backend
from .runner import Case, Impl

MODALITIES = {"text": (50, 768), "audio": (50, 74), "vision": (50, 35)}
BATCH = 32
# case -> (dataset preset whose config is used (None: the defaults), the stage of the timed
# training step (None: the recipe's last), the fused ops the step must run, the registry
# method, config overrides)
_CYIN_OPS = ("masked_attention", "reparam_kl", "cycle_loss")
METHODS = {"cyin": ("mosi", "stage2", _CYIN_OPS, "cyin", {}),
           "cyin_joint": ("mosi", "stage2", _CYIN_OPS, "cyin",
                          {"fusion": "joint", "attn_dropout": 0.1}),
           "dmrnet": (None, "hard", ("masked_attention", "reparam_kl"), "dmrnet", {}),
           "mim": ("mosi", None, ("masked_attention",), "mim", {})}


def cases(methods=tuple(METHODS), dtype=torch.float32) -> list[Case]:
    if dtype != torch.float32:
        raise ValueError("robustmm bench models runs float32 (the models train in float32)")
    return [Case(f"{m} train step B{BATCH} L50 text768 audio74 vision35", {"method": m})
            for m in methods]


def _batch(device):
    from ..data import make_synthetic
    data = make_synthetic(modalities=MODALITIES, num_samples=4 * BATCH, task="regression", seed=0)
    idx = data.splits["train"][:BATCH]
    return data, data.batch(idx).to(device)


def _step_closures(case: Case, device, backend: str, compiled: bool):
    from ..models.registry import get_method
    name = case.params["method"]
    preset, stage, ops, registered, overrides = METHODS[name]
    method = get_method(registered)
    data, batch = _batch(device)
    config = method.config(preset, overrides)
    torch.manual_seed(0)
    model = method.build(data, config).to(device)
    recipe = method.recipe(config)
    optimizers = recipe.optimizers(model)
    net = torch.compile(model) if compiled else model
    stage = stage or recipe.stage(recipe.epochs - 1)

    def forward():
        net.eval()
        with torch.no_grad(), _backend.use_backend(backend):
            out = net(batch.inputs, batch.present, padding=batch.padding)
        net.train()
        return out

    def train_step():
        with _backend.use_backend(backend):
            recipe.train_step(net, batch, optimizers, epoch=recipe.epochs - 1, step=0, stage=stage)

    try:  # compile (and any failure of it) happens here, outside the timing
        train_step()
        forward()
    except Exception as exc:  # noqa: BLE001 -- the bench reports the failure and goes on
        if not compiled:
            raise
        print(f"  compile({name}[{backend}]) does not run: {type(exc).__name__}: "
              f"{str(exc).splitlines()[0][:200]}")
        return None
    for op in ops:  # every fused op ran, and on the kind of backend asked for
        ran = _backend.last_backend(op)
        if ran is None or (ran == "reference") != (backend == "reference"):
            raise RuntimeError(f"{name}[{backend}]: {op} ran on {ran}")
    return forward, train_step


def implementations(device: torch.device) -> tuple[list[Impl], str, tuple[str, ...]]:
    # "auto" picks each op's fastest backend: cpp on CPU; cuda (or triton) on GPU
    label = "fused [cpp]" if device.type == "cpu" else "fused [cuda/triton]"
    impls = [
        Impl(label, lambda c: _step_closures(c, device, "auto", False)),
        Impl("reference", lambda c: _step_closures(c, device, "reference", False)),
        Impl(f"compile({label})", lambda c: _step_closures(c, device, "auto", True)),
        Impl("compile(reference)", lambda c: _step_closures(c, device, "reference", True)),
    ]
    return impls, label, ("reference", "compile(reference)", f"compile({label})")
