"""DistributedDataParallel under torchrun: process group, model wrapping, batch sharding.

A run is distributed when torchrun's ``WORLD_SIZE`` is > 1: `setup` initialises the process
group once per process (gloo on CPU, nccl on CUDA, each rank on ``cuda:LOCAL_RANK``), and the
engine shards every *global* batch of ``recipe.batch_size`` rows (drawn and augmented
identically on every rank) into W contiguous chunks, rank r training on chunk r.

Equal-weight averaging of per-rank mean-loss gradients is only the gradient of the global
mean loss when the chunks are equal. To keep "W processes == 1 process on the same global
batch" true for every batch -- including a last batch that W does not divide, e.g. 9 rows on
2 ranks -> 5 + 4 -- a communication hook scales rank r's gradient by ``W * n_r / B`` before
DDP's average:

    (1/W) * sum_r (W n_r / B) * grad mean_r(loss) = sum_r (n_r / B) * grad mean_r(loss)
                                                  = grad mean_B(loss).

A global batch with fewer rows than ranks gives the ranks without a row one dummy row (the
batch's first) with weight 0: every rank still runs forward/backward (DDP needs all of them in
each all-reduce) and the dummy contributes nothing. What stays different from one process:
anything computed across a batch's samples (BatchNorm statistics -- DDP broadcasts rank 0's
buffers --, batch-level contrastive terms) sees a chunk instead of the global batch, and
dropout draws from each rank's own generator.
"""
from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["DistContext", "setup", "wrap", "unwrap", "shard", "shard_slices", "barrier",
           "broadcast_object", "all_gather_object"]


@dataclass
class DistContext:
    """rank / world_size / local_rank of this process and the device it trains on; `enabled`
    when world_size > 1."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {value!r}") from None


def setup(device="cpu") -> DistContext:
    """The context of this process; under torchrun (WORLD_SIZE > 1) also the process group.

    device: "cpu", "cuda" or "cuda:i". Distributed on CUDA, each rank uses cuda:LOCAL_RANK
    (an explicit index is overridden, so ranks never share a GPU by accident).
    """
    device = torch.device(device)
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        return DistContext(device=device)
    import torch.distributed as dist
    if not dist.is_available():
        raise RuntimeError(f"WORLD_SIZE={world} but this torch build has no torch.distributed")
    local_rank = _env_int("LOCAL_RANK", 0)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        atexit.register(_destroy)
    if dist.get_world_size() != world:
        raise RuntimeError(f"process group has {dist.get_world_size()} ranks but WORLD_SIZE={world}")
    return DistContext(dist.get_rank(), world, local_rank, device)


def _destroy() -> None:
    import torch.distributed as dist
    if dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------- the model

class _ShardWeight:
    """Mutable state of the gradient-weighting hook: factor = W * n_r / B of the current step."""

    def __init__(self, world_size: int):
        self.world_size = world_size
        self.factor = 1.0


def _weighted_allreduce_hook(state: _ShardWeight, bucket):
    """Sum over ranks of grad * factor / W (DDP's default hook is this with factor = 1)."""
    import torch.distributed as dist
    buf = bucket.buffer()
    buf.mul_(state.factor / state.world_size)
    fut = dist.all_reduce(buf, async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


def _register_model_output() -> None:
    """Let DDP see the tensors inside a ModelOutput.

    With find_unused_parameters=True, DDP routes the forward's output tensors through its
    autograd sink (torch.utils._pytree-flattened) so an output that does not reach the loss
    (e.g. a tensor in `extras`) cannot leave its parameters waiting for a gradient forever
    ("Expected to have finished reduction in the prior iteration"). An unregistered dataclass
    is one opaque leaf, so register ModelOutput's fields as its children.
    """
    import torch.utils._pytree as pytree
    from ..contract import ModelOutput
    if ModelOutput in pytree.SUPPORTED_NODES:
        return
    fields = ("logits", "prediction", "losses", "extras")

    def flatten(out):
        return [getattr(out, f) for f in fields], None

    def unflatten(children, _context):
        return ModelOutput(*children)

    register = getattr(pytree, "register_pytree_node", None) or pytree._register_pytree_node
    register(ModelOutput, flatten, unflatten)


def wrap(model: nn.Module, ctx: DistContext):
    """(model to train, shard-weight state): DDP(model) with the weighting hook when
    distributed, else (model, None). find_unused_parameters=True: recipes train subsets of
    the parameters by stage, and a missing modality's branch takes no part in a forward."""
    if not ctx.enabled:
        return model, None
    _register_model_output()
    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)
    state = _ShardWeight(ctx.world_size)
    ddp.register_comm_hook(state, _weighted_allreduce_hook)
    return ddp, state


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (a recipe reading model attributes should use this)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


# ---------------------------------------------------------------- the data

def shard_slices(batch_size: int, world_size: int) -> list[tuple[int, int]]:
    """[start, stop) of each rank's contiguous chunk of a global batch: sizes differ by at most
    one, larger chunks first (torch.tensor_split's rule)."""
    base, extra = divmod(batch_size, world_size)
    out, start = [], 0
    for r in range(world_size):
        stop = start + base + (1 if r < extra else 0)
        out.append((start, stop))
        start = stop
    return out


def shard(batch, ctx: DistContext):
    """(this rank's Batch, its number of real rows n_r, gradient factor W * n_r / B).

    A rank whose chunk is empty (B < W) gets the first row as a dummy with factor 0."""
    if not ctx.enabled:
        return batch, len(batch), 1.0
    B = len(batch)
    start, stop = shard_slices(B, ctx.world_size)[ctx.rank]
    n = stop - start
    rows = slice(start, stop) if n > 0 else slice(0, 1)
    from ..data.dataset import Batch
    local = Batch({k: v[rows] for k, v in batch.inputs.items()}, batch.present[rows],
                  batch.labels[rows], {k: v[rows] for k, v in batch.padding.items()},
                  batch.index[rows])
    return local, n, ctx.world_size * n / B


# ---------------------------------------------------------------- collectives (no-ops alone)

def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        import torch.distributed as dist
        dist.barrier()


def broadcast_object(obj: Any, ctx: DistContext, src: int = 0) -> Any:
    """Rank `src`'s `obj` on every rank."""
    if not ctx.enabled:
        return obj
    import torch.distributed as dist
    box = [obj if ctx.rank == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any, ctx: DistContext) -> list:
    """[rank 0's obj, rank 1's obj, ...] on every rank."""
    if not ctx.enabled:
        return [obj]
    import torch.distributed as dist
    out = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out
