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

import torch
from torch import Tensor, nn

from ..contract import ModelOutput, task_loss, zero_absent  # the contract's, re-exported

__all__ = ["ModelOutput", "MultimodalModel", "task_loss", "zero_absent"]


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
