"""LateFusion: one encoder + head per modality; the fused output combines the present branches.

    z_m = head_m(enc_m(x_m))                                   (B, C)   per modality m
    sum:  y = sum_m present[:, m] z_m                          (0 for a sample with none present)
    mean: y = sum_m present[:, m] z_m / max(1, sum_m present[:, m])

"present[:, m] z_m" is a torch.where, not a product: an absent branch contributes exactly
nothing, whatever its input held. Losses: {"task": L(y, labels)}; with stage="unimodal" each
branch is trained alone instead: {"uni_<m>": mean over the samples where m is present of
L(z_m, labels)} (0 when m is absent from the whole batch).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..contract import ModelOutput, TrainConfig, task_loss, zero_absent
from .base import MultimodalModel
from .encoders import make_encoder

__all__ = ["LateFusion", "LateFusionConfig", "masked_task_loss"]

COMBINES = ("sum", "mean")


@dataclass(frozen=True)
class LateFusionConfig(TrainConfig):
    """hidden: encoder width; encoder: "auto" | "mlp" | "transformer" (see make_encoder);
    layers, heads, dropout: encoder settings (dropout also precedes each head); combine: "sum"
    or "mean" over the present branches; regression_loss: "l1" or "mse"; TrainConfig's keys."""
    hidden: int = 128
    encoder: str = "auto"
    layers: int = 2
    heads: int = 4
    dropout: float = 0.1
    combine: str = "sum"
    regression_loss: str = "l1"


def masked_task_loss(output: Tensor, labels: Tensor, task: str, keep: Tensor,
                     regression_loss: str = "l1") -> Tensor:
    """task_loss averaged over the samples with keep (B,) True; 0 (still connected to the
    graph) when none is kept. output: (B, C) logits or (B,) predictions."""
    if task == "classification":
        per = F.cross_entropy(output, labels, reduction="none")           # (B,)
    elif regression_loss in ("l1", "mse"):
        fn = F.l1_loss if regression_loss == "l1" else F.mse_loss
        per = fn(output, labels.to(output.dtype), reduction="none")       # (B,)
    else:
        raise ValueError(f"regression_loss must be 'l1' or 'mse', got {regression_loss!r}")
    per = torch.where(keep, per, torch.zeros((), dtype=per.dtype, device=per.device))  # (B,)
    return per.sum() / keep.sum().clamp(min=1).to(per.dtype)


class LateFusion(MultimodalModel):
    """Late fusion of per-modality classifiers/regressors.

    LateFusion(modalities, task, num_classes, config=None, **overrides): config a
    LateFusionConfig (or a dict of its keys), overrides keys of it.

    forward(inputs, present, labels=None, padding=None, stage=None): stage "unimodal" gives the
    per-branch losses, any other stage (or None) the fused task loss. extras["branches"]:
    {m: (B, out_dim) branch outputs} (absent samples' rows are meaningless).
    """

    Config = LateFusionConfig

    def __init__(self, modalities: dict[str, tuple[int, int]], task: str, num_classes: int = 0,
                 config: Union[LateFusionConfig, dict, None] = None, **overrides):
        super().__init__(modalities, task, num_classes)
        cfg = self.Config.from_dict(config, name=type(self).__name__)
        cfg = cfg.replace(**overrides) if overrides else cfg
        hidden, encoder, layers, heads = cfg.hidden, cfg.encoder, cfg.layers, cfg.heads
        dropout, combine, regression_loss = cfg.dropout, cfg.combine, cfg.regression_loss
        if combine not in COMBINES:
            raise ValueError(f"combine must be one of {COMBINES}, got {combine!r}")
        if regression_loss not in ("l1", "mse"):
            raise ValueError(f"regression_loss must be 'l1' or 'mse', got {regression_loss!r}")
        self.combine, self.regression_loss = combine, regression_loss
        self.encoders = nn.ModuleDict({
            m: make_encoder(L, D, hidden, kind=encoder, layers=layers, heads=heads, dropout=dropout)
            for m, (L, D) in self.modalities.items()})
        self.heads = nn.ModuleDict({
            m: nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden, self.out_dim))
            for m in self.modalities})

    def branch(self, m: str, x: Tensor, present_m: Tensor, padding: Optional[Tensor]) -> Tensor:
        """Branch m's output (B, out_dim) on its zeroed input (absent rows computed from zeros)."""
        return self.heads[m](self.encoders[m](zero_absent(x, present_m, padding), padding))

    def forward(self, inputs: dict[str, Tensor], present: Tensor, labels: Optional[Tensor] = None,
                padding: Optional[dict[str, Tensor]] = None,
                stage: Optional[str] = None) -> ModelOutput:
        self.check_inputs(inputs, present)
        padding = padding or {}
        branches, fused = {}, None
        for i, (m, x) in enumerate(inputs.items()):
            z = self.branch(m, x, present[:, i], padding.get(m))           # (B, out_dim)
            branches[m] = z
            z = torch.where(present[:, i, None], z, z.new_zeros(()))
            fused = z if fused is None else fused + z
        if self.combine == "mean":
            fused = fused / present.sum(1, keepdim=True).clamp(min=1).to(fused.dtype)
        out = ModelOutput(**self.head_output(fused), extras={"branches": branches})
        if labels is not None:
            if stage == "unimodal":
                out.losses = {f"uni_{m}": masked_task_loss(self._flat(z), labels, self.task,
                                                           present[:, i], self.regression_loss)
                              for i, (m, z) in enumerate(branches.items())}
            else:
                out.losses = {"task": task_loss(out.output, labels, self.task,
                                                self.regression_loss)}
        return out

    def _flat(self, z: Tensor) -> Tensor:
        """(B, out_dim) -> logits (B, C) or predictions (B,)."""
        return z if self.task == "classification" else z.squeeze(-1)
