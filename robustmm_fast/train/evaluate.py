"""Scoring a trained model on one split, optionally under a missing-modality mask."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

__all__ = ["predict", "evaluate"]


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


@torch.no_grad()
def predict(model: nn.Module, dataset, split: str = "test", *, present: Optional[Tensor] = None,
            batch_size: int = 256, device=None) -> tuple[Tensor, Tensor]:
    """(outputs, labels) of `split` in its index order, on the CPU.

    outputs: logits (n, C) for classification, predictions (n,) for regression. present:
    (n, M) bool masks in split order (a protocol's), None = every modality present. The model
    runs in eval mode under no_grad on `device` (None: where its parameters are) and is put
    back in the mode it was in.
    """
    from .distributed import unwrap
    model = unwrap(model)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = _device_of(model) if device is None else torch.device(device)
    if present is not None:
        present = torch.as_tensor(present)
        if present.dtype != torch.bool:
            raise TypeError(f"present must be a bool mask, got {present.dtype}")
    was_training = model.training
    model.eval()
    outs, labels = [], []
    try:
        for batch in dataset.batches(split, batch_size, present=present):
            batch = batch.to(device)
            out = model(batch.inputs, batch.present, padding=batch.padding)
            outs.append(out.output.detach().float().cpu())
            labels.append(batch.labels.cpu())
    finally:
        model.train(was_training)
    if not outs:
        raise ValueError(f"split {split!r} of {dataset.name} is empty")
    return torch.cat(outs), torch.cat(labels)


def evaluate(model: nn.Module, dataset, split: str = "test", *, present: Optional[Tensor] = None,
             batch_size: int = 256, device=None) -> dict:
    """Metrics of `model` on `split`: robustmm_fast.metrics.classification_metrics or
    regression_metrics by dataset.task (as Python floats), plus "loss" (cross-entropy or L1 of
    the outputs) and "n" (samples scored)."""
    from ..metrics import classification_metrics, regression_metrics
    from ..contract import task_loss
    outputs, labels = predict(model, dataset, split, present=present, batch_size=batch_size,
                              device=device)
    if dataset.task == "classification":
        metrics = classification_metrics(outputs, labels)
    else:
        metrics = regression_metrics(outputs, labels)
    out = {k: float(v) for k, v in metrics.items()}
    # the task loss (cross-entropy / L1, unweighted): model selection's tie-break when the
    # primary metric saturates (Handwritten's validation accuracy reaches 100% early)
    out["loss"] = float(task_loss(outputs, labels, dataset.task, "l1"))
    out["n"] = int(labels.shape[0])
    return out
