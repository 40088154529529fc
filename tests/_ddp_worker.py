"""A tiny dataset and model for the training-engine tests, and the torchrun worker of the DDP test.

    python -m torch.distributed.run --nproc_per_node=2 --standalone tests/_ddp_worker.py OUT

trains `ddp_runs()` under DDP (gloo, CPU) and writes, per run, OUT/<run>/checkpoint.pt (rank 0,
by fit) and OUT/<run>_rank<r>.pt (every rank's selected weights), which tests/test_train.py
compares with the same runs in one process.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

from robustmm_fast.data.dataset import MultimodalDataset
from robustmm_fast.models.base import ModelOutput, MultimodalModel, task_loss, zero_absent

SEED = 7
N_TRAIN = 49  # prime-ish: batch 16 leaves a last batch of 1 (< 2 ranks), batch 10 one of 9 (5 + 4)


def make_data(n_train: int = N_TRAIN, n_valid: int = 30, n_test: int = 30, seed: int = 0,
              noise: float = 0.6) -> MultimodalDataset:
    """3 classes, two modalities: "a" a vector view (N, 1, 4); "b" a padded sequence (N, 3, 2)
    with lengths 1..3 and NaN in its padding (a model must never read it). Each class has its
    own mean in both views, so a linear model separates them when noise is small."""
    g = torch.Generator().manual_seed(seed)
    n = n_train + n_valid + n_test
    y = torch.arange(n) % 3
    y = y[torch.randperm(n, generator=g)]
    mu_a = torch.tensor([[2., 0, 0, 1], [0, 2, 0, -1], [0, 0, 2, 0]])
    mu_b = torch.tensor([[1.5, 0], [0, 1.5], [-1.5, -1.5]])
    a = mu_a[y][:, None, :] + noise * torch.randn(n, 1, 4, generator=g)
    b = mu_b[y][:, None, :] + noise * torch.randn(n, 3, 2, generator=g)
    lengths = torch.randint(1, 4, (n,), generator=g)
    b[torch.arange(3)[None, :] >= lengths[:, None]] = float("nan")
    idx = torch.arange(n)
    return MultimodalDataset("tiny", "classification", {"a": a, "b": b}, y,
                             {"train": idx[:n_train], "valid": idx[n_train:n_train + n_valid],
                              "test": idx[n_train + n_valid:]},
                             lengths={"b": lengths}, num_classes=3)


class TinyModel(MultimodalModel):
    """Per modality: masked mean over valid tokens -> Linear -> tanh; the mean over present
    modalities -> dropout -> linear head. `side` adds an output (in extras) that no loss uses;
    `nan_loss` makes the task loss NaN (for the non-finite-loss test)."""

    def __init__(self, modalities, task="classification", num_classes=3, hidden=16,
                 dropout=0.0, side=False):
        super().__init__(modalities, task, num_classes)
        self.enc = nn.ModuleDict({m: nn.Linear(D, hidden) for m, (L, D) in modalities.items()})
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, self.out_dim)
        self.side = nn.Linear(hidden, 2) if side else None
        self.nan_loss = False

    def forward(self, inputs, present, labels=None, padding=None):
        self.check_inputs(inputs, present)
        padding = padding or {}
        feats = []
        for i, m in enumerate(self.names):
            x = zero_absent(inputs[m], present[:, i], padding.get(m))           # (B, L, D)
            valid = torch.ones(x.shape[:2], dtype=x.dtype, device=x.device) if m not in padding \
                else (~padding[m]).to(x.dtype)                                   # (B, L)
            pooled = x.sum(1) / valid.sum(1, keepdim=True).clamp_min(1)          # (B, D)
            feats.append(torch.tanh(self.enc[m](pooled)) * present[:, i:i + 1].to(x.dtype))
        fused = torch.stack(feats).sum(0) / present.sum(1, keepdim=True).clamp_min(1)  # (B, H)
        out = ModelOutput(**self.head_output(self.head(self.drop(fused))))
        if self.side is not None:
            out.extras["side"] = self.side(fused)
        if labels is not None:
            loss = task_loss(out.output, labels, self.task)
            out.losses["task"] = loss * float("nan") if self.nan_loss else loss
            out.losses["l2"] = 1e-3 * fused.pow(2).mean()
        return out


def builder(hidden=16, dropout=0.0, side=False):
    """A model= callable for fit: (dataset, config) -> TinyModel."""
    def build(dataset, config):
        mods = {m: (dataset.seq_lens[m], dataset.dims[m]) for m in dataset.modalities}
        return TinyModel(mods, dataset.task, dataset.num_classes, hidden=hidden, dropout=dropout,
                         side=side)
    return build


def ddp_config(batch_size: int) -> dict:
    return {"epochs": 2, "batch_size": batch_size, "lr": 1e-2, "weight_decay": 1e-4,
            "modality_dropout": 0.3}


# run name -> (batch size, gradient weighting on)
# bs16: the last global batch has 1 row, so rank 1 trains on a weight-0 dummy row; bs10: the last
# has 9 rows, split 5 + 4; bs10_unweighted: the control, DDP's plain average of the 5 + 4 chunks.
DDP_RUNS = {"bs16": (16, True), "bs10": (10, True), "bs10_unweighted": (10, False)}


def run(name: str, out: Path) -> None:
    from robustmm_fast.train import Recipe, fit
    from robustmm_fast.train import distributed
    bs, weighted = DDP_RUNS[name]
    shard = distributed.shard
    if not weighted:  # the control: DDP's plain average of per-rank mean gradients
        distributed.shard = lambda batch, ctx: shard(batch, ctx)[:2] + (1.0,)
    try:
        result = fit(None, make_data(), model=builder(side=True), recipe=Recipe(ddp_config(bs)),
                     seed=SEED, out_dir=out / name, progress=False)
    finally:
        distributed.shard = shard
    rank = int(torch.distributed.get_rank()) if torch.distributed.is_initialized() else 0
    torch.save({k: v.clone() for k, v in result.model.state_dict().items()},
               out / f"{name}_rank{rank}.pt")


if __name__ == "__main__":
    out = Path(sys.argv[1])
    for name in DDP_RUNS:
        run(name, out)
