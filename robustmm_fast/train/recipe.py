"""A method's training schedule, run by the one training engine (robustmm_fast.train.fit).

The engine owns the loop: epochs, data order (seeded), the global batch's augmentation before
it is sharded across DDP ranks, validation-based model selection, checkpoints and resume. A
recipe says what happens inside: which optimizers, which stage an epoch belongs to, how the
present mask of a training batch is augmented, and one optimisation step.

The default recipe (`Recipe` itself) is one AdamW optimizer on `out.loss`, with optional
per-sample modality dropout (`modality_dropout` > 0). Methods subclass it.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

__all__ = ["Recipe", "NonFiniteLossError", "check_finite"]


class NonFiniteLossError(RuntimeError):
    """Training stopped because a loss term is NaN or infinite (named in the message)."""


def check_finite(losses: dict[str, Tensor], *, epoch: int, step: int) -> None:
    """Raise NonFiniteLossError naming every non-finite term (call before backward)."""
    bad = {k: float(v.detach()) for k, v in losses.items() if not torch.isfinite(v.detach()).all()}
    if bad:
        terms = ", ".join(f"{k}={v}" for k, v in bad.items())
        raise NonFiniteLossError(f"non-finite loss at epoch {epoch}, step {step}: {terms}; "
                                 "training stopped (lower the learning rate, or check the inputs)")


class Recipe:
    """One AdamW optimizer on the model's `loss`; modality dropout with probability
    `modality_dropout` per (sample, modality) in training (every sample keeps >= 1).

    Config keys (all optional): epochs, lr, weight_decay, batch_size, grad_clip,
    modality_dropout.
    """

    # grad_clip: one norm over every parameter (False), or one per optimizer's parameters (True,
    # for optimizers that train on different losses, as MIM's)
    clip_each_optimizer = False

    def __init__(self, config: Optional[dict] = None):
        config = dict(config or {})
        self.config = config
        self.epochs = int(config.get("epochs", 30))
        self.batch_size = int(config.get("batch_size", 64))
        self.lr = float(config.get("lr", 1e-3))
        self.weight_decay = float(config.get("weight_decay", 1e-4))
        self.grad_clip = float(config.get("grad_clip", 0.0))
        self.modality_dropout = float(config.get("modality_dropout", 0.0))
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"epochs and batch_size must be >= 1, got {self.epochs}, {self.batch_size}")
        if not 0.0 <= self.modality_dropout < 1.0:
            raise ValueError(f"modality_dropout must be in [0, 1), got {self.modality_dropout}")

    # ---------------------------------------------------------------- schedule
    def optimizers(self, model: nn.Module) -> dict[str, torch.optim.Optimizer]:
        return {"main": torch.optim.AdamW(model.parameters(), lr=self.lr,
                                          weight_decay=self.weight_decay)}

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
        from ..missing import modality_dropout
        return modality_dropout(present, self.modality_dropout, generator=generator)

    # ---------------------------------------------------------------- one step
    def train_step(self, model: nn.Module, batch, optimizers: dict, *, epoch: int, step: int,
                   stage: str) -> dict[str, float]:
        """Forward, loss check, backward, optimizer step; returns the logged terms."""
        out = model(batch.inputs, batch.present, labels=batch.labels, padding=batch.padding)
        return self.optimize(model, out, optimizers, epoch=epoch, step=step)

    def optimize(self, model: nn.Module, out, optimizers: dict, *, epoch: int, step: int,
                 stepping: Optional[list] = None) -> dict[str, float]:
        """The step after a forward: loss check, backward, clipping, and a step of `stepping`
        (default every optimizer); returns the logged terms."""
        check_finite(out.losses, epoch=epoch, step=step)
        loss = out.loss
        for opt in optimizers.values():
            opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.grad_clip > 0 and self.clip_each_optimizer:
            for opt in optimizers.values():
                torch.nn.utils.clip_grad_norm_(
                    [p for group in opt.param_groups for p in group["params"]], self.grad_clip)
        elif self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), self.grad_clip)
        for opt in (optimizers.values() if stepping is None else stepping):
            opt.step()
        return {"loss": float(loss.detach()), **{k: float(v.detach()) for k, v in out.losses.items()}}

    def on_epoch_end(self, model: nn.Module, epoch: int, stage: str) -> None:
        """Hook after each training epoch (e.g. DMRNet's hard-combination update)."""

    # ---------------------------------------------------------------- resumable state
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


