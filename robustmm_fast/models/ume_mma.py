"""UME-MMA: Uni-Modal Ensemble with Missing Modality Adaptation.

Li, Du, Zhao, Huang, Zhao, "What Makes for Robust Multi-Modal Models in the Face of Missing
Modalities?", arXiv:2310.06383 (2023).

The model is LateFusion (one encoder + head per modality; the output sums the present
branches' logits, so an absent branch contributes nothing). The schedule has two stages:

    unimodal  (epochs [0, unimodal_epochs)):  each branch trained alone on the labels,
              loss = sum_m uni_m,  uni_m = mean over samples with m present of L(z_m, y);
              these epochs' models are not selectable (the final model is the fine-tuned one).
    finetune  (the next finetune_epochs):     the fused model, initialised from the unimodally
              trained branches (the same modules: nothing is copied), trained on L(y_fused, y)
              with per-sample modality dropout (probability modality_dropout; every sample
              keeps >= 1 modality) -- the missing-modality augmentation.

Each stage has its own AdamW (lr, then finetune_lr), so the fine-tuning starts from fresh
optimizer state; only the current stage's optimizer steps.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import Tensor, nn

from ..contract import Recipe, adamw
from .late_fusion import LateFusion, LateFusionConfig

__all__ = ["UMEMMA", "UMEMMAConfig", "UMEMMARecipe", "STAGES"]

STAGES = ("unimodal", "finetune")


@dataclass(frozen=True)
class UMEMMAConfig(LateFusionConfig):
    """LateFusionConfig's keys, and unimodal_epochs, finetune_epochs, finetune_lr (None: lr);
    modality_dropout 0.5 (applied in finetune only). `epochs` is unimodal_epochs +
    finetune_epochs and is not set by hand (None)."""
    epochs: Optional[int] = None
    unimodal_epochs: int = 10
    finetune_epochs: int = 20
    finetune_lr: Optional[float] = None
    modality_dropout: float = 0.5

    def __post_init__(self):
        if self.epochs is not None and self.epochs != self.total_epochs:
            raise ValueError("UME-MMA's epochs = unimodal_epochs + finetune_epochs; set those "
                             f"instead of 'epochs' (got epochs={self.epochs})")
        if self.unimodal_epochs < 0 or self.finetune_epochs < 1:
            raise ValueError(f"unimodal_epochs must be >= 0 and finetune_epochs >= 1, got "
                             f"{self.unimodal_epochs} and {self.finetune_epochs}")
        object.__setattr__(self, "epochs", self.unimodal_epochs + self.finetune_epochs)
        super().__post_init__()
        object.__setattr__(self, "epochs", None)

    @property
    def total_epochs(self) -> int:
        return self.unimodal_epochs + self.finetune_epochs


class UMEMMA(LateFusion):
    """LateFusion with combine="sum" by default (the paper's ensemble of branch logits); see
    LateFusion for the arguments. Train it with UMEMMARecipe."""

    Config = UMEMMAConfig


class UMEMMARecipe(Recipe):
    """UMEMMAConfig's keys: unimodal_epochs, finetune_epochs, lr, finetune_lr, modality_dropout
    (finetune only), weight_decay, batch_size, grad_clip."""

    Config = UMEMMAConfig

    def __init__(self, config: Union[UMEMMAConfig, dict, None] = None):
        super().__init__(config)
        self.unimodal_epochs, self.finetune_epochs = (self.cfg.unimodal_epochs,
                                                      self.cfg.finetune_epochs)
        self.epochs = self.cfg.total_epochs
        ft = self.cfg.finetune_lr
        self.finetune_lr = self.lr if ft is None else float(ft)
        if not self.finetune_lr > 0 or not self.lr > 0:
            raise ValueError(f"lr and finetune_lr must be > 0, got {self.lr} and "
                             f"{self.finetune_lr}")

    def optimizers(self, model: nn.Module) -> dict[str, torch.optim.Optimizer]:
        params = list(model.parameters())
        return {"unimodal": adamw(params, self.lr, self.weight_decay),
                "finetune": adamw(params, self.finetune_lr, self.weight_decay)}

    def stage(self, epoch: int) -> str:
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        return "unimodal" if epoch < self.unimodal_epochs else "finetune"

    def selects(self, epoch: int) -> bool:
        return self.stage(epoch) == "finetune"

    def augment(self, present: Tensor, *, epoch: int, stage: str,
                generator: torch.Generator) -> Tensor:
        _check_stage(stage)
        if stage == "unimodal":  # each branch sees every sample its modality is present in
            return present
        return super().augment(present, epoch=epoch, stage=stage, generator=generator)

    def train_step(self, model: nn.Module, batch, optimizers: dict, *, epoch: int, step: int,
                   stage: str) -> dict[str, float]:
        """unimodal: sum of the uni_<m> losses; finetune: the fused task loss. Steps only the
        stage's optimizer."""
        _check_stage(stage)
        out = model(batch.inputs, batch.present, labels=batch.labels, padding=batch.padding,
                    stage=stage)
        return self.optimize(model, out, optimizers, epoch=epoch, step=step,
                             stepping=[optimizers[stage]])


def _check_stage(stage: str) -> None:
    if stage not in STAGES:
        raise ValueError(f"UME-MMA stage must be one of {STAGES}, got {stage!r}")
