"""Scoring a trained model on one split, optionally under a missing-modality mask; many masks
in few passes (evaluate_masks)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

__all__ = ["predict", "evaluate", "evaluate_masks"]

# evaluate_masks's passes hold at most this many bytes of inputs (at least 256 rows): large
# enough that Handwritten's 69 masks x 400 rows take 5 passes, small enough that the
# activations of a sequence model stay well under a GiB
_PASS_INPUT_BYTES = 16 << 20


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
    outputs, labels = predict(model, dataset, split, present=present, batch_size=batch_size,
                              device=device)
    return _metrics(outputs, labels, dataset.task)


def _metrics(outputs: Tensor, labels: Tensor, task: str) -> dict:
    from ..metrics import classification_metrics, regression_metrics
    from ..contract import task_loss
    if task == "classification":
        metrics = classification_metrics(outputs, labels)
    else:
        metrics = regression_metrics(outputs, labels)
    out = {k: float(v) for k, v in metrics.items()}
    # the task loss (cross-entropy / L1, unweighted): model selection's tie-break when the
    # primary metric saturates (Handwritten's validation accuracy reaches 100% early)
    out["loss"] = float(task_loss(outputs, labels, task, "l1"))
    out["n"] = int(labels.shape[0])
    return out


@torch.no_grad()
def evaluate_masks(model: nn.Module, dataset, masks: dict, split: str = "test", *,
                   device=None, rows_per_pass: Optional[int] = None) -> dict[str, dict]:
    """{name: evaluate(model, dataset, split, present=mask)} for every (n_split, M) mask, in
    few passes: the split's rows repeated once per mask with the masks stacked, K n rows run
    in passes of `rows_per_pass` rows (default: as many as ~16 MB of inputs, at least 256),
    rounded down to whole masks (at least one).

    The metrics equal one evaluate() per mask bit for bit on the CPU: in eval mode the models
    compute every row on its own, and the CPU kernels give a row the same bits in any batch
    (tests/test_scoring.py checks every method). On CUDA, cuBLAS may pick another GEMM for
    another batch size, so the last bits can differ. A model that samples at test time
    (`stochastic_test` true) is scored one mask at a time, as evaluate does, so its random
    draws are evaluate's.
    """
    from .distributed import unwrap
    net = unwrap(model)
    if getattr(net, "stochastic_test", False):
        return {name: evaluate(net, dataset, split, present=mask, device=device)
                for name, mask in masks.items()}
    idx = dataset._split(split)
    n, names = idx.numel(), list(masks)
    if n == 0:
        raise ValueError(f"split {split!r} of {dataset.name} is empty")
    if not names:
        return {}
    stacked = []
    for name in names:
        mask = torch.as_tensor(masks[name])
        if mask.dtype != torch.bool or mask.shape != (n, dataset.num_modalities):
            raise ValueError(f"mask {name!r} must be bool (n={n}, M={dataset.num_modalities}) "
                             f"for split {split!r}, got {mask.dtype} {tuple(mask.shape)}")
        stacked.append(mask)
    present = torch.cat(stacked)                                  # (K n, M), mask k's rows
    rows = idx.repeat(len(names))                                 # (K n,) dataset rows
    if rows_per_pass is None:
        row_bytes = sum(x[0].numel() * x.element_size() for x in dataset.inputs.values())
        rows_per_pass = max(256, _PASS_INPUT_BYTES // max(1, row_bytes))
    if rows_per_pass < 1:
        raise ValueError(f"rows_per_pass must be >= 1, got {rows_per_pass}")
    # whole masks per pass: CyIN on padded sequences gave a mask cut over two passes other
    # last bits (tests/test_grid.py); whole masks per pass are bit for bit
    rows_per_pass = max(1, rows_per_pass // n) * n
    device = _device_of(net) if device is None else torch.device(device)
    was_training = net.training
    net.eval()
    outs = []
    try:
        for start in range(0, rows.numel(), rows_per_pass):
            batch = dataset.batch(rows[start:start + rows_per_pass],
                                  present[start:start + rows_per_pass]).to(device)
            out = net(batch.inputs, batch.present, padding=batch.padding)
            outs.append(out.output.detach().float().cpu())
    finally:
        net.train(was_training)
    outputs, labels = torch.cat(outs), dataset.labels[idx]
    return {name: _metrics(outputs[k * n:(k + 1) * n], labels, dataset.task)
            for k, name in enumerate(names)}
