"""EarlyFusion: the modalities' features are joined before any joint processing.

    e_m = present[:, m] relu(W_m mean_valid(x_m) + b_m)              (B, hidden)   per modality
    h   = [e_1, ..., e_M, present]                                    (B, M hidden + M)
    y   = W_3 drop(relu(W_2 drop(relu(W_1 h + b_1)) + b_2)) + b_3     (B, C) or (B,) regression

mean_valid: the mean over a sequence's valid tokens (a vector view, L = 1, is its one token).
"present[:, m] e" is a torch.where and absent inputs are zeroed first (zero_absent), so an
absent modality's values (NaN included) never reach the output or a gradient; the presence
mask is an input feature, so the head can tell "absent" from "all features 0".
Losses: {"task": L(y, labels)}.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import Tensor, nn

from ..contract import ModelOutput, TrainConfig, task_loss, zero_absent
from .base import MultimodalModel
from .encoders import masked_mean

__all__ = ["EarlyFusion", "EarlyFusionConfig"]


@dataclass(frozen=True)
class EarlyFusionConfig(TrainConfig):
    """hidden: embedding width per modality and the MLP's width; dropout: inside the MLP;
    regression_loss: "l1" or "mse" (regression only); and TrainConfig's keys."""
    hidden: int = 128
    dropout: float = 0.1
    regression_loss: str = "l1"


class EarlyFusion(MultimodalModel):
    """Concatenation of per-modality input embeddings and the presence mask, then an MLP.

    EarlyFusion(modalities, task, num_classes, config=None, **overrides): config an
    EarlyFusionConfig or a dict of its keys; overrides keys of it.

    forward(inputs, present, labels=None, padding=None, stage=None): stage is accepted (and
    ignored) so every recipe can call every model alike.
    """

    def __init__(self, modalities: dict[str, tuple[int, int]], task: str, num_classes: int = 0,
                 config: Union[EarlyFusionConfig, dict, None] = None, **overrides):
        super().__init__(modalities, task, num_classes)
        cfg = EarlyFusionConfig.from_dict(config, name="EarlyFusion")
        cfg = cfg.replace(**overrides) if overrides else cfg
        hidden, dropout, regression_loss = cfg.hidden, cfg.dropout, cfg.regression_loss
        if not isinstance(hidden, int) or hidden < 1:
            raise ValueError(f"hidden must be an int >= 1, got {hidden!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        if regression_loss not in ("l1", "mse"):
            raise ValueError(f"regression_loss must be 'l1' or 'mse', got {regression_loss!r}")
        self.regression_loss = regression_loss
        self.embed = nn.ModuleDict({m: nn.Linear(D, hidden)
                                    for m, (_, D) in self.modalities.items()})
        M = len(self.modalities)
        self.mlp = nn.Sequential(
            nn.Linear(M * hidden + M, hidden), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(hidden, self.out_dim))

    def forward(self, inputs: dict[str, Tensor], present: Tensor, labels: Optional[Tensor] = None,
                padding: Optional[dict[str, Tensor]] = None,
                stage: Optional[str] = None) -> ModelOutput:
        self.check_inputs(inputs, present)
        padding = padding or {}
        feats = []
        for i, (m, x) in enumerate(inputs.items()):
            pad = padding.get(m)
            e = torch.relu(self.embed[m](masked_mean(zero_absent(x, present[:, i], pad), pad)))
            feats.append(torch.where(present[:, i, None], e, torch.zeros((), dtype=e.dtype,
                                                                         device=e.device)))
        feats.append(present.to(feats[0].dtype))                          # (B, M)
        out = ModelOutput(**self.head_output(self.mlp(torch.cat(feats, 1))))
        if labels is not None:
            out.losses = {"task": task_loss(out.output, labels, self.task, self.regression_loss)}
        return out
