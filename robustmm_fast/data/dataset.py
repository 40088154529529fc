"""The one dataset type of the harness, and the batch the training engine hands to a model.

A dataset holds every sample of every split: per modality an array ``(N, L_m, D_m)`` (a vector
view is L_m = 1), optional valid lengths ``(N,)`` per modality (tokens at t >= length are
padding), labels ``(N,)`` and the index sets of its splits. Dims and lengths are read from the
arrays, never assumed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

__all__ = ["MultimodalDataset", "Batch", "SPLITS", "TASKS"]

SPLITS = ("train", "valid", "test")
TASKS = ("classification", "regression")


@dataclass
class Batch:
    """One batch: inputs {name: (B, L_m, D_m)}, present (B, M) bool in `modalities` order,
    labels (B,), padding {name: (B, L_m) bool, True = padding} (only modalities with lengths),
    index (B,) int64 rows of the dataset."""
    inputs: dict[str, Tensor]
    present: Tensor
    labels: Tensor
    padding: dict[str, Tensor]
    index: Tensor

    def to(self, device) -> "Batch":
        return Batch({k: v.to(device) for k, v in self.inputs.items()}, self.present.to(device),
                     self.labels.to(device), {k: v.to(device) for k, v in self.padding.items()},
                     self.index.to(device))

    def __len__(self) -> int:
        return self.labels.shape[0]


@dataclass
class MultimodalDataset:
    """Per-modality arrays, labels and splits.

    Attributes:
        name: e.g. "handwritten", "mosi".
        task: "classification" (labels int64 in [0, num_classes)) or "regression" (float32).
        inputs: {modality: (N, L_m, D_m) float32}; the dict's order is the modality order of
            every `present` mask.
        labels: (N,).
        splits: {"train"|"valid"|"test": (n,) int64 row indices}, disjoint.
        lengths: {modality: (N,) int64 valid lengths}, only for padded sequence modalities.
        num_classes: classes of a classification task (0 for regression).
        info: free-form provenance (source file, attribution, scaling fitted on train).
    """
    name: str
    task: str
    inputs: dict[str, Tensor]
    labels: Tensor
    splits: dict[str, Tensor]
    lengths: dict[str, Tensor] = field(default_factory=dict)
    num_classes: int = 0
    info: dict = field(default_factory=dict)

    def __post_init__(self):
        self.validate()

    # ---------------------------------------------------------------- facts read from the arrays
    @property
    def modalities(self) -> list[str]:
        return list(self.inputs)

    @property
    def num_modalities(self) -> int:
        return len(self.inputs)

    @property
    def num_samples(self) -> int:
        return self.labels.shape[0]

    @property
    def dims(self) -> dict[str, int]:
        return {m: x.shape[2] for m, x in self.inputs.items()}

    @property
    def seq_lens(self) -> dict[str, int]:
        return {m: x.shape[1] for m, x in self.inputs.items()}

    def validate(self) -> None:
        """Raise ValueError/TypeError naming what is inconsistent."""
        if self.task not in TASKS:
            raise ValueError(f"{self.name}: task must be one of {TASKS}, got {self.task!r}")
        if not self.inputs:
            raise ValueError(f"{self.name}: inputs is empty (need at least one modality)")
        if self.labels.dim() != 1:
            raise ValueError(f"{self.name}: labels must be (N,), got {tuple(self.labels.shape)}")
        n = self.labels.shape[0]
        for m, x in self.inputs.items():
            if not isinstance(x, Tensor) or x.dim() != 3 or not x.is_floating_point():
                raise ValueError(f"{self.name}: modality {m!r} must be a float tensor (N, L, D), got "
                                 f"{getattr(x, 'shape', type(x))}")
            if x.shape[0] != n:
                raise ValueError(f"{self.name}: modality {m!r} has {x.shape[0]} samples but labels "
                                 f"have {n}")
        for m, ln in self.lengths.items():
            if m not in self.inputs:
                raise ValueError(f"{self.name}: lengths given for unknown modality {m!r}")
            if ln.shape != (n,) or ln.dtype != torch.int64:
                raise ValueError(f"{self.name}: lengths[{m!r}] must be int64 (N={n},), got "
                                 f"{ln.dtype} {tuple(ln.shape)}")
            if n and (int(ln.min()) < 0 or int(ln.max()) > self.inputs[m].shape[1]):
                raise ValueError(f"{self.name}: lengths[{m!r}] must lie in [0, "
                                 f"{self.inputs[m].shape[1]}]")
        if self.task == "classification":
            if self.labels.dtype != torch.int64:
                raise TypeError(f"{self.name}: classification labels must be int64, got "
                                f"{self.labels.dtype}")
            if self.num_classes < 2 or (n and (int(self.labels.min()) < 0
                                               or int(self.labels.max()) >= self.num_classes)):
                raise ValueError(f"{self.name}: labels must lie in [0, num_classes="
                                 f"{self.num_classes}) with num_classes >= 2")
        elif not self.labels.is_floating_point():
            raise TypeError(f"{self.name}: regression labels must be float, got {self.labels.dtype}")
        seen = torch.zeros(n, dtype=torch.bool)
        for s, idx in self.splits.items():
            if s not in SPLITS:
                raise ValueError(f"{self.name}: unknown split {s!r}; expected {SPLITS}")
            if idx.dtype != torch.int64 or idx.dim() != 1:
                raise ValueError(f"{self.name}: split {s!r} must be a 1-D int64 index tensor")
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
                raise ValueError(f"{self.name}: split {s!r} indexes outside [0, {n})")
            if seen[idx].any() or idx.unique().numel() != idx.numel():
                raise ValueError(f"{self.name}: splits overlap or repeat rows (at split {s!r})")
            seen[idx] = True

    # ---------------------------------------------------------------- batches
    def split_size(self, split: str) -> int:
        return self._split(split).numel()

    def _split(self, split: str) -> Tensor:
        if split not in self.splits:
            raise ValueError(f"{self.name} has no split {split!r}; it has {list(self.splits)}")
        return self.splits[split]

    def batch(self, index: Tensor, present: Optional[Tensor] = None) -> Batch:
        """The rows `index` (int64, dataset rows) as a Batch; present (B, M) defaults to all."""
        index = index.to(torch.int64)
        inputs = {m: x[index] for m, x in self.inputs.items()}          # (B, L_m, D_m)
        padding = {m: torch.arange(self.inputs[m].shape[1]) >= ln[index, None]
                   for m, ln in self.lengths.items()}                     # (B, L_m)
        if present is None:
            present = torch.ones(index.numel(), self.num_modalities, dtype=torch.bool)
        elif present.shape != (index.numel(), self.num_modalities) or present.dtype != torch.bool:
            raise ValueError(f"present must be bool (B={index.numel()}, M={self.num_modalities}), "
                             f"got {present.dtype} {tuple(present.shape)}")
        return Batch(inputs, present, self.labels[index], padding, index)

    def batches(self, split: str, batch_size: int, *, shuffle: bool = False,
                generator: Optional[torch.Generator] = None, present: Optional[Tensor] = None):
        """Yield Batches over `split`. present: (n_split, M) masks in split order (e.g. a
        missing protocol's), else all present. shuffle permutes with `generator`."""
        idx = self._split(split)
        if present is not None and present.shape != (idx.numel(), self.num_modalities):
            raise ValueError(f"present must be (n={idx.numel()}, M={self.num_modalities}) for split "
                             f"{split!r}, got {tuple(present.shape)}")
        order = torch.randperm(idx.numel(), generator=generator) if shuffle else torch.arange(idx.numel())
        for start in range(0, idx.numel(), batch_size):
            pos = order[start:start + batch_size]
            yield self.batch(idx[pos], None if present is None else present[pos])
