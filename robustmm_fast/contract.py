"""The method contract, in one leaf module that models/ and train/ both import (and that
imports neither): what a model returns (ModelOutput), the task losses, a method's typed config
(TrainConfig, subclassed once per method), its training schedule (Recipe) and the keys the
engine reads itself (ENGINE_KEYS).

    @dataclass(frozen=True)
    class MyConfig(TrainConfig):      # defaults written once, here
        hidden: int = 128
    cfg = MyConfig.from_dict({"hidden": 64, "lr": 3e-4})   # unknown keys: ValueError naming them
    cfg.to_dict()                                          # JSON-able, for checkpoints/results

The engine (train/engine.py) owns the loop: epochs, data order (seeded), the global batch's
augmentation before it is sharded across DDP ranks, validation-based model selection,
checkpoints and resume. A recipe says what happens inside: which optimizers, which stage an
epoch belongs to, how the present mask of a training batch is augmented, and one step.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ENGINE_KEYS", "ModelOutput", "task_loss", "zero_absent", "TrainConfig",
           "GRAD_CLIP_MODES", "Recipe", "NonFiniteLossError", "check_finite", "adamw",
           "logged_terms"]

# Config keys the engine reads itself (never passed to a method's build/recipe), with defaults.
ENGINE_KEYS = {"select_on": "complete"}


# ---------------------------------------------------------------- model outputs and losses

@dataclass
class ModelOutput:
    """logits (B, C) for classification or prediction (B,) for regression; losses: named terms,
    each already weighted; extras: anything else a recipe or test may read."""
    logits: Optional[Tensor] = None
    prediction: Optional[Tensor] = None
    losses: dict[str, Tensor] = field(default_factory=dict)
    extras: dict = field(default_factory=dict)

    @property
    def output(self) -> Tensor:
        return self.logits if self.logits is not None else self.prediction

    @property
    def loss(self) -> Tensor:
        if not self.losses:
            raise ValueError("this output has no losses (call the model with labels=...)")
        return torch.stack([v.reshape(()) for v in self.losses.values()]).sum()


def task_loss(output: Tensor, labels: Tensor, task: str, regression_loss: str = "l1") -> Tensor:
    """Cross-entropy on logits (B, C) for classification; L1 (MMSA's default) or MSE on
    predictions (B,) for regression."""
    if task == "classification":
        return F.cross_entropy(output, labels)
    if regression_loss == "l1":
        return F.l1_loss(output, labels.to(output.dtype))
    if regression_loss == "mse":
        return F.mse_loss(output, labels.to(output.dtype))
    raise ValueError(f"regression_loss must be 'l1' or 'mse', got {regression_loss!r}")


def zero_absent(x: Tensor, present_m: Tensor, padding: Optional[Tensor] = None) -> Tensor:
    """x (B, L, D) with absent samples' (present_m (B,) False) and padded tokens' values replaced
    by 0 (torch.where, so NaN/Inf there cannot reach the output or a gradient)."""
    keep = present_m.view(-1, 1, 1)
    if padding is not None:
        keep = keep & ~padding.unsqueeze(-1)
    return torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))


# ---------------------------------------------------------------- typed configs

GRAD_CLIP_MODES = ("norm", "value")


def _matches(value, hint) -> bool:
    """Whether a config value has a field's annotated type (checked before any use, so a typo
    such as lr="abc" is reported with its key, not as a failed float() deep in a recipe).
    int accepts no bool; float accepts an int; tuple[...] / Optional / Union recursively."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin is Union:
        return any(_matches(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is tuple or origin is tuple:
        return isinstance(value, tuple) and (not args or args[-1] is Ellipsis and all(
            _matches(x, args[0]) for x in value) or args[-1] is not Ellipsis and len(args) == len(
            value) and all(_matches(x, a) for x, a in zip(value, args)))
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True  # an annotation we do not check (e.g. a Literal, a Callable)


def _type_name(hint) -> str:
    if typing.get_origin(hint) is Union:
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    return {type(None): "None", float: "a number", int: "an integer", bool: "true or false",
            str: "a string", tuple: "a list"}.get(hint, getattr(hint, "__name__", str(hint)))


@dataclass(frozen=True)
class TrainConfig:
    """The keys every recipe reads. A method's config subclasses it with its own fields.

    epochs, batch_size, lr, weight_decay (AdamW's); modality_dropout: probability per (sample,
    modality) of dropping a present modality in training (every sample keeps >= 1);
    grad_clip: 0 = off; grad_clip_mode: "norm" (torch.nn.utils.clip_grad_norm_, one norm over
    the parameters) or "value" (clip_grad_value_: every gradient entry into [-c, c], CyIN's).
    """
    epochs: int = 30
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-4
    grad_clip: float = 0.0
    grad_clip_mode: str = "norm"
    modality_dropout: float = 0.0

    @classmethod
    def from_dict(cls, config: Union[dict, "TrainConfig", None] = None, *,
                  name: Optional[str] = None):
        """An instance from a dict of (some of) its fields; ValueError naming unknown keys.
        JSON lists become tuples where the field's default is a tuple. An instance of this
        class passes through; of another config class, its fields are read as a dict."""
        if isinstance(config, cls):
            return config
        if isinstance(config, TrainConfig):
            config = config.to_dict()
        config = dict(config or {})
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(config) - set(fields))
        if unknown:
            raise ValueError(f"{name or cls.__name__}: unknown config key(s) {unknown}; known "
                             f"keys: {sorted(fields)}")
        defaults = cls()
        hints = typing.get_type_hints(cls)
        for k, v in config.items():
            if isinstance(getattr(defaults, k), tuple) and isinstance(v, list):
                config[k] = v = tuple(v)
            if not _matches(v, hints.get(k, Any)):
                raise ValueError(f"{name or cls.__name__}: config key {k!r} must be "
                                 f"{_type_name(hints[k])}, got {v!r}")
        return cls(**config)

    def replace(self, **changes):
        """A copy with `changes` (checked like from_dict)."""
        return type(self).from_dict({**self.to_dict(), **changes})

    def to_dict(self) -> dict[str, Any]:
        """Every field, JSON-native (tuples as lists), so json round trips are exact."""
        return {f.name: list(v) if isinstance(v, tuple) else v
                for f in dataclasses.fields(self) for v in [getattr(self, f.name)]}

    def __post_init__(self):
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"epochs and batch_size must be >= 1, got {self.epochs}, "
                             f"{self.batch_size}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr!r}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be a finite number >= 0, got "
                             f"{self.weight_decay!r}")
        if not 0.0 <= self.modality_dropout < 1.0:
            raise ValueError(f"modality_dropout must be in [0, 1), got {self.modality_dropout}")
        if not (math.isfinite(self.grad_clip) and self.grad_clip >= 0):
            raise ValueError(f"grad_clip must be a finite number >= 0 (0 = off), got "
                             f"{self.grad_clip!r}")
        if self.grad_clip_mode not in GRAD_CLIP_MODES:
            raise ValueError(f"grad_clip_mode must be one of {GRAD_CLIP_MODES}, got "
                             f"{self.grad_clip_mode!r}")


# ---------------------------------------------------------------- recipes

class NonFiniteLossError(RuntimeError):
    """Training stopped because a loss term is NaN or infinite (named in the message)."""


def check_finite(losses: dict[str, Tensor], *, epoch: int, step: int) -> None:
    """Raise NonFiniteLossError naming every non-finite term (call before backward)."""
    if not losses:
        return
    # one check (one host sync on a GPU) for every term; names only when something is wrong
    values = torch.stack([v.detach().reshape(-1).to(torch.float32).sum() for v in losses.values()])
    if bool(torch.isfinite(values).all()):
        return
    bad = {k: float(v.detach().sum()) for k, v in losses.items() if not torch.isfinite(v.detach()).all()}
    if bad:
        terms = ", ".join(f"{k}={v}" for k, v in bad.items())
        raise NonFiniteLossError(f"non-finite loss at epoch {epoch}, step {step}: {terms}; "
                                 "training stopped (lower the learning rate, or check the inputs)")


_FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def adamw(params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """torch.optim.AdamW with its fused kernel where every parameter allows it (CPU or CUDA
    float tensors): one kernel for all parameters instead of ~10 ops per tensor per step, 6x
    faster for CyIN's ~200 tensors on CPU. Same update formula; the fused kernel evaluates it
    in its own floating-point order (results differ from the per-tensor loop in the last bits)."""
    params = list(params)
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") and p.dtype in _FUSED_DTYPES
                                 for p in params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused or None)


def logged_terms(out: "ModelOutput") -> dict[str, Tensor]:
    """{"loss": the total, **the terms}, detached 0-d tensors: the engine reads them once per
    epoch (a float() here would wait for a GPU at every step)."""
    return {"loss": out.loss.detach(), **{k: v.detach() for k, v in out.losses.items()}}


class Recipe:
    """One AdamW optimizer on the model's `loss`; modality dropout with probability
    `modality_dropout` per (sample, modality) in training (every sample keeps >= 1); gradient
    clipping by norm or value. Methods subclass it, with their config class as `Config`.

    config: an instance of `Config` (or of a subclass), or a dict of its fields.
    """

    Config = TrainConfig
    # grad_clip: one norm over every parameter (False), or one per optimizer's parameters (True,
    # for optimizers that train on different losses, as MIM's)
    clip_each_optimizer = False

    def __init__(self, config: Union[dict, TrainConfig, None] = None):
        cfg = config if isinstance(config, self.Config) else self.Config.from_dict(config)
        self.cfg = cfg
        self.config = cfg.to_dict()
        self.epochs, self.batch_size = cfg.epochs, cfg.batch_size
        self.lr, self.weight_decay = float(cfg.lr), float(cfg.weight_decay)
        self.grad_clip, self.grad_clip_mode = float(cfg.grad_clip), cfg.grad_clip_mode
        self.modality_dropout = float(cfg.modality_dropout)

    # ---------------------------------------------------------------- schedule
    def optimizers(self, model: nn.Module) -> dict[str, torch.optim.Optimizer]:
        return {"main": adamw(model.parameters(), self.lr, self.weight_decay)}

    def stage(self, epoch: int) -> str:
        """The stage epoch `epoch` (0-based) belongs to."""
        return "main"

    def selects(self, epoch: int) -> bool:
        """Whether the model after `epoch` may be selected as the best (e.g. not during a
        pre-training stage whose model is not the final one)."""
        return True

    def augment(self, present: Tensor, *, epoch: int, stage: str,
                generator: torch.Generator) -> Tensor:
        """The present mask (B, M) a training batch is trained with (global batch, before it
        is sharded across ranks, so every rank draws the same)."""
        if self.modality_dropout <= 0.0:
            return present
        from .missing import modality_dropout
        return modality_dropout(present, self.modality_dropout, generator=generator)

    # ---------------------------------------------------------------- one step
    def train_step(self, model: nn.Module, batch, optimizers: dict, *, epoch: int, step: int,
                   stage: str) -> dict[str, float]:
        """Forward, loss check, backward, optimizer step; returns the logged terms (detached
        0-d tensors, logged_terms; Python floats are accepted from custom recipes)."""
        out = model(batch.inputs, batch.present, labels=batch.labels, padding=batch.padding)
        return self.optimize(model, out, optimizers, epoch=epoch, step=step)

    def clip(self, params) -> None:
        """Clip the gradients of `params` as grad_clip / grad_clip_mode say."""
        if self.grad_clip <= 0:
            return
        if self.grad_clip_mode == "value":
            torch.nn.utils.clip_grad_value_(params, self.grad_clip)
        else:
            torch.nn.utils.clip_grad_norm_(params, self.grad_clip)

    def optimize(self, model: nn.Module, out, optimizers: dict, *, epoch: int, step: int,
                 stepping: Optional[list] = None) -> dict[str, float]:
        """The step after a forward: loss check, backward, clipping, and a step of `stepping`
        (default every optimizer); returns the logged terms."""
        check_finite(out.losses, epoch=epoch, step=step)
        loss = out.loss
        for opt in optimizers.values():
            opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.clip_each_optimizer:
            for opt in optimizers.values():
                self.clip([p for group in opt.param_groups for p in group["params"]])
        else:
            self.clip(list(model.parameters()))
        for opt in (optimizers.values() if stepping is None else stepping):
            opt.step()
        return logged_terms(out)

    def on_epoch_end(self, model: nn.Module, epoch: int, stage: str) -> None:
        """Hook after each training epoch (e.g. DMRNet's hard-combination update)."""

    # ---------------------------------------------------------------- resumable state
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
