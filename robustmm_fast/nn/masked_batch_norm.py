"""Batch norm whose statistics come from the included rows only (absent modalities, padding)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn


def masked_batch_norm(norm: Optional[nn.BatchNorm1d], t: Tensor, mask: Optional[Tensor]) -> Tensor:
    """Apply `norm` per channel over the rows of t (..., C).

    With a bool `mask` (t's leading dims, True = include) in training, the batch mean and
    variance -- and the running averages -- come from the included rows alone, and excluded rows
    come out 0; without a mask, or in eval mode, this is `norm` itself. `norm=None` returns t.

        mean = sum_included(x) / n,  var = sum_included((x - mean)^2) / n
        y = (x - mean) / sqrt(var + eps) * weight + bias
        running = lerp(running, (mean, var * n / (n - 1)), momentum)   when n > 1
    """
    if norm is None:
        return t
    rows = t.reshape(-1, t.shape[-1])
    if mask is None or not norm.training:
        return norm(rows).reshape(t.shape)
    keep = mask.reshape(-1, 1)
    count = keep.sum()
    mean = torch.where(keep, rows, 0).sum(0) / count.clamp_min(1)
    var = torch.where(keep, (rows - mean) ** 2, 0).sum(0) / count.clamp_min(1)
    if norm.track_running_stats:
        with torch.no_grad():
            unbiased = var * count / (count - 1).clamp_min(1)
            momentum = norm.momentum if norm.momentum is not None else 0.1
            update = count > 1  # fewer than two rows say nothing about the variance
            norm.running_mean.copy_(torch.where(update, torch.lerp(norm.running_mean, mean, momentum),
                                                norm.running_mean))
            norm.running_var.copy_(torch.where(update, torch.lerp(norm.running_var, unbiased, momentum),
                                               norm.running_var))
            norm.num_batches_tracked.add_(1)
    out = (rows - mean) * torch.rsqrt(var + norm.eps)
    if norm.affine:
        out = out * norm.weight + norm.bias
    return torch.where(keep, out, 0).reshape(t.shape)
