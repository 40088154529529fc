"""The model interface every method implements (DESIGN §5).

    out = model(inputs, present, labels=None, padding=None, **options)

inputs {modality: (B, L_m, D_m)} in the dataset's modality order; present (B, M) bool, True =
available; padding {modality: (B, L_m) bool, True = padding} for padded sequence modalities;
labels (B,) -- when given, `out.losses` holds the method's named, weighted loss terms and
`out.loss` their sum. A missing modality's input never influences the output: its values may
be anything, NaN included (models zero it before use, never multiply it by 0).
`options` are method-specific switches a recipe passes (e.g. stage="unimodal").
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ModelOutput", "MultimodalModel", "task_loss", "zero_absent"]


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


class MultimodalModel(nn.Module):
    """Base of every method: the data facts it was built for and the task head's size.

    Args:
        modalities: {name: (L_m, D_m)} in the dataset's order.
        task: "classification" or "regression".
        num_classes: output size for classification (ignored for regression: one output).
    """

    def __init__(self, modalities: dict[str, tuple[int, int]], task: str, num_classes: int = 0):
        super().__init__()
        if task not in ("classification", "regression"):
            raise ValueError(f"task must be 'classification' or 'regression', got {task!r}")
        if len(modalities) < 1:
            raise ValueError("a model needs at least one modality")
        if task == "classification" and num_classes < 2:
            raise ValueError(f"classification needs num_classes >= 2, got {num_classes}")
        self.modalities = dict(modalities)
        self.task, self.num_classes = task, num_classes
        self.out_dim = num_classes if task == "classification" else 1

    @property
    def names(self) -> list[str]:
        return list(self.modalities)

    def check_inputs(self, inputs: dict[str, Tensor], present: Tensor) -> None:
        """ValueError naming what does not match what the model was built for."""
        if list(inputs) != self.names:
            raise ValueError(f"inputs must have the modalities {self.names} in this order, got "
                             f"{list(inputs)}")
        B = present.shape[0]
        if present.dtype != torch.bool or present.shape != (B, len(self.names)):
            raise ValueError(f"present must be bool (B, M={len(self.names)}), got {present.dtype} "
                             f"{tuple(present.shape)}")
        for m, x in inputs.items():
            L, D = self.modalities[m]
            if x.dim() != 3 or x.shape[0] != B or x.shape[2] != D:
                raise ValueError(f"inputs[{m!r}] must be (B={B}, L, D={D}), got {tuple(x.shape)}")

    def head_output(self, out: Tensor) -> dict:
        """{'logits': (B, C)} or {'prediction': (B,)} from a (B, out_dim) tensor."""
        if self.task == "classification":
            return {"logits": out}
        return {"prediction": out.squeeze(-1)}
