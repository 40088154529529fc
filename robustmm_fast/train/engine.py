"""The one training loop: a method's recipe, validation-based selection, checkpoints, DDP.

    result = fit(get_method("ume_mma"), dataset, seed=1111, out_dir="runs/ume/seed-1111")
    result.model          # the selected (best-validation) model, eval mode
    result.history        # per epoch: epoch, stage, train (mean terms), valid (metrics), ...

Per epoch e (0-based), with stage = recipe.stage(e):
  1. the "train" split in an order drawn from a generator seeded by (seed, e) -- an epoch's
     order does not depend on whether the run was resumed --, in global batches of
     recipe.batch_size rows;
  2. present = recipe.augment(batch.present, ...) on the *global* batch, with a generator
     seeded by (seed, e) too, so every DDP rank draws the same masks;
  3. under DDP, this rank's chunk of the global batch (distributed.shard);
  4. recipe.train_step(model, batch, optimizers, epoch=e, step=i, stage=stage); a non-finite
     loss raises NonFiniteLossError there (naming the term, epoch and step) and propagates
     untouched: the last checkpoint stays the last good epoch;
  5. recipe.on_epoch_end; the "valid" split scored with every modality present (config
     "select_on": "complete", or "random:<rate>" / "instance:<prob>" masks seeded by `seed`);
     if recipe.selects(e) and the primary metric (metrics.primary_metric) improved strictly,
     or stayed equal with a lower validation loss, the weights are kept as the best;
  6. out_dir/checkpoint.pt written atomically (rank 0), by a background thread while the next
     epoch trains (one write in flight; fit returns after the last one is on disk).
The test split is never read. Under torchrun, a rank that raises (a non-finite loss included)
ends the run: torchrun stops the other ranks, which would otherwise wait in an all-reduce. Dropout and other forward randomness use torch's global RNG,
whose state (CPU and CUDA, per rank) is checkpointed and restored, so a resumed run equals an
uninterrupted one bit for bit (same torch build, device and thread count).
"""
from __future__ import annotations

import copy
import hashlib
import math
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
from torch import nn

from . import distributed as dist_utils
from .checkpoint import (CHECKPOINT_FORMAT, MODEL_FORMAT, VERSION, BackgroundSaver, canonical,
                         data_facts, load_checkpoint, run_identity, save_atomic)
from .evaluate import evaluate
from ..contract import ENGINE_KEYS, Recipe

__all__ = ["fit", "FitResult", "ENGINE_KEYS"]



@dataclass
class FitResult:
    """model: the selected weights loaded, eval mode; best_epoch (0-based) and best_valid its
    validation metrics; history: one dict per epoch (epoch, stage, train {term: mean over
    samples}, valid {metric: value}, selected: whether it became the best, time: seconds);
    config: every key of the run (method's and engine's); seed; out_dir (None without)."""
    model: nn.Module
    best_epoch: int
    best_valid: dict
    history: list = field(default_factory=list)
    config: dict = field(default_factory=dict)
    seed: int = 1111
    out_dir: Optional[Path] = None


# ---------------------------------------------------------------- seeds and RNG state

def _derive_seed(seed: int, *parts) -> int:
    """A 63-bit seed from (seed, *parts): SHA-256, so nearby inputs give unrelated streams and
    the value never depends on PYTHONHASHSEED."""
    digest = hashlib.sha256(repr((int(seed),) + tuple(parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _generator(seed: int, *parts) -> torch.Generator:
    return torch.Generator().manual_seed(_derive_seed(seed, *parts))


def _rng_state(device: torch.device) -> dict:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return {"cpu": torch.get_rng_state(), "cuda": cuda}


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


def _snapshot(obj):
    """A copy of a state_dict-like tree that later steps cannot change: tensors cloned to the
    CPU, dicts / lists / tuples rebuilt, other leaves (numbers, strings, None) shared, since
    they are immutable; anything else is deep-copied. copy.deepcopy of an optimizer's state
    costs ~4x more (its memo bookkeeping per object): 90 ms an epoch for CyIN's 581 tensors."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return type(obj)((k, _snapshot(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)) and type(obj) in (list, tuple):
        return type(obj)(_snapshot(v) for v in obj)
    if obj is None or isinstance(obj, (bool, int, float, complex, str, bytes)):
        return obj
    return copy.deepcopy(obj)


def _cpu_state(model: nn.Module) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


# ---------------------------------------------------------------- what to train

def _resolve(method, dataset, config, model, recipe):
    """(name, build() -> model, recipe, method config, run config)."""
    config = dict(config or {})
    engine = {k: config.pop(k, default) for k, default in ENGINE_KEYS.items()}
    if model is not None or recipe is not None:
        if method is not None:
            raise ValueError("pass either a method or model= and recipe=, not both")
        if model is None or recipe is None:
            raise ValueError("model= and recipe= must be given together")
        if not isinstance(recipe, Recipe):
            raise TypeError(f"recipe must be a robustmm_fast.train.Recipe, got {type(recipe).__name__}")
        method_config = config if config else dict(recipe.config)
        if isinstance(model, nn.Module):
            build = lambda: model  # noqa: E731
        elif callable(model):
            build = lambda: model(dataset, method_config)  # noqa: E731
        else:
            raise TypeError(f"model must be an nn.Module or a callable (dataset, config) -> "
                            f"module, got {type(model).__name__}")
        return None, build, recipe, method_config, {**method_config, **engine}
    if method is None:
        raise ValueError("fit needs a method (a registry name or a Method), or model= and recipe=")
    if isinstance(method, str):  # name lookups live above train/ (run.py, cli.py)
        raise TypeError(f"fit takes a Method, not its name: fit(robustmm_fast.models."
                        f"get_method({method!r}), ...)")
    if hasattr(method, "config"):
        method_config = method.config(dataset.name, config)
    else:
        method_config = {**method.defaults, **method.presets.get(dataset.name, {}), **config}
    return (method.name, lambda: method.build(dataset, method_config), method.recipe(method_config),
            method_config, {**method_config, **engine})


def _valid_mask(select_on: str, dataset, seed: int) -> Optional[torch.Tensor]:
    """The (n_valid, M) present mask model selection scores with; None = complete."""
    if select_on == "complete":
        return None
    kind, _, value = str(select_on).partition(":")
    try:
        rate = float(value)
    except ValueError:
        rate = None
    n, M = dataset.split_size("valid"), dataset.num_modalities
    from .. import missing
    if kind == "random" and rate is not None:
        return missing.random_missing(n, M, rate, seed)
    if kind == "instance" and rate is not None:
        return missing.instance_missing(n, M, rate, seed)
    raise ValueError(f"select_on must be 'complete', 'random:<rate>' or 'instance:<prob>', got "
                     f"{select_on!r}")


def _check_data(dataset) -> None:
    for split in ("train", "valid"):
        if split not in dataset.splits or dataset.split_size(split) == 0:
            raise ValueError(f"fit needs a non-empty {split!r} split; {dataset.name} has "
                             f"{ {s: int(i.numel()) for s, i in dataset.splits.items()} }")


def _better(valid: dict, best: dict, key: str, higher: bool) -> bool:
    """Strict improvement of the primary metric `key`, or the same value with a lower
    validation loss (a saturated accuracy would otherwise keep the first epoch that reached
    it); NaN never wins and anything beats a NaN best."""
    value, incumbent = valid[key], best[key]
    if math.isnan(value):
        return False
    if math.isnan(incumbent):
        return True
    if value == incumbent:
        return valid.get("loss", math.inf) < best.get("loss", math.inf)
    return value > incumbent if higher else value < incumbent


def _mean_terms(sums: dict, counts: dict, ctx) -> dict:
    """Sample-weighted means of the logged terms over the epoch (all ranks' rows)."""
    gathered = dist_utils.all_gather_object((sums, counts), ctx)
    total_s: dict[str, float] = {}
    total_n: dict[str, int] = {}
    for s, c in gathered:
        for k in s:
            total_s[k] = total_s.get(k, 0.0) + s[k]
            total_n[k] = total_n.get(k, 0) + c[k]
    return {k: total_s[k] / total_n[k] for k in total_s if total_n[k] > 0}


# ---------------------------------------------------------------- the loop

def fit(method: Union[str, Any, None], dataset, *, config: Optional[dict] = None,
        seed: int = 1111, out_dir=None, device="cpu", progress: bool = True,
        resume: bool = True, model: Union[nn.Module, Callable, None] = None,
        recipe: Optional[Recipe] = None, distributed: bool = True) -> FitResult:
    """Train `method` on `dataset` and select the best epoch on the validation split.

    Args:
        method: a registry name ("ume_mma"), a registry Method, or None with model=/recipe=.
        config: overrides of the method's defaults + the dataset's preset (Method.config);
            with model=/recipe=, the run's config (default: recipe.config). The engine's own
            keys (ENGINE_KEYS: select_on) are taken out before the method sees it.
        seed: torch.manual_seed(seed) before the model is built; data order and augmentation
            draw from generators derived from (seed, epoch).
        out_dir: where checkpoint.pt (every epoch) and best.pt (at the end) go; None: none.
            Under torchrun only rank 0 writes, and every rank reads checkpoint.pt to resume,
            so it must be a directory all ranks see.
        device: "cpu" / "cuda" / "cuda:i" (under torchrun, each rank uses cuda:LOCAL_RANK).
        resume: continue from out_dir/checkpoint.pt when it exists; it must come from the same
            method, config, seed and dataset (else ValueError: nothing is overwritten).
            resume=False starts afresh and overwrites it (with a warning).
        model, recipe: train this model (an nn.Module, or a callable (dataset, config) ->
            module, called after the seed is set) with this recipe instead of a method.
        distributed: False trains in this process alone even under torchrun (the grid of
            `robustmm run` spreads whole fits over the ranks instead of sharding batches).
    """
    ctx = dist_utils.setup(device) if distributed else dist_utils.DistContext(
        device=torch.device(device))
    device = ctx.device
    _check_data(dataset)
    name, build, recipe, _, run_config = _resolve(method, dataset, config, model, recipe)
    epochs = recipe.epochs
    if not any(recipe.selects(e) for e in range(epochs)):
        raise ValueError(f"{type(recipe).__name__} selects no epoch in 0..{epochs - 1}; model "
                         "selection needs at least one")
    from ..metrics import primary_metric
    key, higher = primary_metric(dataset.task)
    valid_mask = _valid_mask(run_config["select_on"], dataset, seed)

    torch.manual_seed(seed)
    net = build()
    if not isinstance(net, nn.Module):
        raise TypeError(f"the model builder returned {type(net).__name__}, not an nn.Module")
    net = net.to(device)
    name = name or f"custom:{type(net).__name__}"
    identity = run_identity(name, run_config, seed, dataset)
    optimizers = recipe.optimizers(net)

    out_dir = Path(out_dir) if out_dir is not None else None
    ckpt_path = out_dir / "checkpoint.pt" if out_dir is not None else None
    start, history, best, saved_rng = 0, [], None, None
    if ckpt_path is not None and ckpt_path.exists():
        if resume:
            ckpt = load_checkpoint(ckpt_path, expect=identity)
            start, history, best, saved_rng = _restore(ckpt, ckpt_path, net, optimizers, recipe,
                                                       epochs)
            if ckpt["world_size"] != ctx.world_size:
                warnings.warn(f"{ckpt_path} was written by {ckpt['world_size']} process(es), this "
                              f"run has {ctx.world_size}: it continues, but not bit-identically",
                              stacklevel=2)
        elif ctx.is_main:
            warnings.warn(f"resume=False: {ckpt_path} will be overwritten", stacklevel=2)

    train_model, shard_weight = dist_utils.wrap(net, ctx)
    if saved_rng is not None:
        _set_rng_state(saved_rng[ctx.rank] if ctx.rank < len(saved_rng) else saved_rng[0], device)
    else:  # each rank its own forward-randomness stream (dropout)
        torch.manual_seed(_derive_seed(seed, "forward", ctx.rank))

    from tqdm.auto import tqdm
    bar = tqdm(total=epochs, initial=start, desc=f"{name} seed {seed}", unit="epoch",
               disable=not progress or not ctx.is_main, dynamic_ncols=True)
    saver = BackgroundSaver()  # checkpoint.pt written while the next epoch trains
    try:
        for epoch in range(start, epochs):
            t0 = time.perf_counter()
            stage = recipe.stage(epoch)
            train = _train_epoch(train_model, recipe, optimizers, dataset, ctx, shard_weight,
                                 seed=seed, epoch=epoch, stage=stage)
            recipe.on_epoch_end(net, epoch, stage)
            valid = None
            if ctx.is_main:
                valid = evaluate(net, dataset, "valid", present=valid_mask, device=device)
            valid = dist_utils.broadcast_object(valid, ctx)
            selected = bool(recipe.selects(epoch)) and (
                best is None or _better(valid, best["valid"], key, higher))
            if selected:
                best = {"epoch": epoch, "valid": valid, "state": _cpu_state(net)}
            history.append({"epoch": epoch, "stage": stage, "train": train, "valid": valid,
                            "selected": selected, "time": time.perf_counter() - t0})
            rngs = dist_utils.all_gather_object(_rng_state(device), ctx)
            if ctx.is_main and ckpt_path is not None:  # a snapshot: the next steps go on
                saver.submit(ckpt_path, {
                    "format": CHECKPOINT_FORMAT, "version": VERSION, "identity": identity,
                    "epoch": epoch, "epochs": epochs, "model": _cpu_state(net),
                    "optimizers": {k: _snapshot(o.state_dict()) for k, o in optimizers.items()},
                    "recipe": _snapshot(recipe.state_dict()), "rng": rngs,
                    "world_size": ctx.world_size, "best": dict(best) if best else None, "history": list(history),
                    "torch": str(torch.__version__)})
            bar.update(1)
            bar.set_postfix({"stage": stage, "loss": f"{train.get('loss', float('nan')):.4f}",
                             key: f"{valid[key]:.4f}", "best": f"{best['valid'][key]:.4f}"
                             if best else "-"})
    except BaseException:
        try:  # the last checkpoint completes; the training error is the one raised
            saver.wait()
        except Exception:
            pass
        raise
    finally:
        bar.close()
    saver.wait()

    net.load_state_dict(best["state"])
    net.eval()
    if ctx.is_main and out_dir is not None:
        save_atomic(out_dir / "best.pt", {
            "format": MODEL_FORMAT, "version": VERSION, "method": name,
            "config": canonical(run_config), "seed": int(seed), "data": data_facts(dataset),
            "model": best["state"], "best_epoch": best["epoch"], "best_valid": best["valid"],
            "history": history})
    dist_utils.barrier(ctx)
    return FitResult(net, best["epoch"], best["valid"], history, run_config, int(seed), out_dir)


def _restore(ckpt: dict, path: Path, net, optimizers: dict, recipe, epochs: int):
    """Load a checkpoint's state into the fresh model / optimizers / recipe; (first epoch to
    run, history, best, per-rank RNG states)."""
    if ckpt["epochs"] != epochs:
        raise ValueError(f"{path} planned {ckpt['epochs']} epochs, this run plans {epochs}")
    if set(ckpt["optimizers"]) != set(optimizers):
        raise ValueError(f"{path} has optimizers {sorted(ckpt['optimizers'])}, the recipe makes "
                         f"{sorted(optimizers)}")
    net.load_state_dict(ckpt["model"])
    for k, opt in optimizers.items():
        opt.load_state_dict(ckpt["optimizers"][k])
    recipe.load_state_dict(ckpt["recipe"])
    if ckpt["best"] is None:
        raise ValueError(f"{path} is corrupt: epoch {ckpt['epoch']} finished without a best model")
    return ckpt["epoch"] + 1, list(ckpt["history"]), ckpt["best"], ckpt["rng"]


def _train_epoch(model, recipe: Recipe, optimizers: dict, dataset, ctx, shard_weight, *,
                 seed: int, epoch: int, stage: str) -> dict:
    """One pass over the training split; the sample-weighted means of the logged terms."""
    model.train()
    order = _generator(seed, "order", epoch)
    augment = _generator(seed, "augment", epoch)
    steps: list[tuple[dict, int]] = []  # (logged terms, rows) per step
    for step, batch in enumerate(dataset.batches("train", recipe.batch_size, shuffle=True,
                                                 generator=order)):
        present = recipe.augment(batch.present, epoch=epoch, stage=stage, generator=augment)
        if present.shape != batch.present.shape or present.dtype != torch.bool:
            raise ValueError(f"{type(recipe).__name__}.augment must return a bool mask "
                             f"{tuple(batch.present.shape)}, got {present.dtype} "
                             f"{tuple(present.shape)}")
        local, n, factor = dist_utils.shard(replace(batch, present=present), ctx)
        if shard_weight is not None:
            shard_weight.factor = factor
        logged = recipe.train_step(model, local.to(ctx.device), optimizers, epoch=epoch,
                                   step=step, stage=stage)
        steps.append((logged, n))
    return _mean_terms(*_epoch_sums(steps), ctx)


def _epoch_sums(steps: list[tuple[dict, int]]) -> tuple[dict, dict]:
    """Per logged term: the sum over steps of value * rows, and the rows. Recipes return the
    terms as detached 0-d tensors (a float() per term and step would wait for a GPU at every
    step); they are stacked and copied to the host once, here, at the end of the epoch.
    Python floats are accepted too. float32 -> float64 is exact, so the means are those a
    float() per step would give."""
    tensors = [v for logged, _ in steps for v in logged.values() if isinstance(v, torch.Tensor)]
    host = iter(())
    if tensors:
        where = tensors[0].device
        host = iter(torch.stack([t.detach().reshape(()).to(where, torch.float64)
                                 for t in tensors]).cpu().tolist())
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for logged, n in steps:
        for k, v in logged.items():
            value = next(host) if isinstance(v, torch.Tensor) else float(v)
            sums[k] = sums.get(k, 0.0) + value * n
            counts[k] = counts.get(k, 0) + n
    return sums, counts
