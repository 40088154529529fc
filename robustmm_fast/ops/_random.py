"""The seed of an op's in-kernel random numbers (Philox4x32-10 keyed by a 62-bit seed; the
element index is the counter), drawn on the host from torch's generators.

- No generator: the default CPU generator, so ``torch.manual_seed`` reproduces the draw.
- A CPU generator: one ``torch.randint`` draw from it.
- A CUDA generator: derived from its seed and Philox offset, which live on the host, and the
  offset advanced by 4 -- no device round trip (``torch.randint(..., device="cuda").item()``
  would synchronize on every call); ``generator.manual_seed`` reproduces it.

Under CUDA graph capture a host seed would be baked into the graph and every replay would
reuse one eps / one dropout mask, silently: the ops raise instead (``check_not_capturing``).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["draw_seed", "zero_seed", "check_not_capturing"]

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def seed_from_offset(initial_seed: int, offset: int) -> int:
    """A 62-bit seed from a Philox generator's (seed, offset): distinct offsets, distinct seeds."""
    return _splitmix64(_splitmix64(initial_seed & _MASK64) ^ (offset & _MASK64)) >> 2


def check_not_capturing(device: torch.device, op: str, what: str, fix: str) -> None:
    """Raise under CUDA graph capture: the host-drawn seed would repeat on every replay."""
    if device.type == "cuda" and not torch.compiler.is_compiling() \
            and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            f"{op}: {what} under CUDA graph capture would repeat on every replay (its seed is "
            f"drawn on the host when the graph is captured). {fix}")


def draw_seed(generator: Optional[torch.Generator]) -> Tensor:
    """A CPU int64 scalar seed in [0, 2^62) from `generator` (the default CPU one when None)."""
    if generator is None or generator.device.type == "cpu":
        return torch.randint(0, 2**62, (), generator=generator, dtype=torch.int64)
    if generator.device.type == "cuda":
        offset = generator.get_offset()
        generator.set_offset(offset + 4)
        return torch.tensor(seed_from_offset(generator.initial_seed(), offset), dtype=torch.int64)
    # another device's generator: one draw there, copied back
    return torch.randint(0, 2**62, (), generator=generator, device=generator.device).cpu()


def zero_seed() -> Tensor:
    """The seed argument of a call that draws nothing."""
    return torch.zeros((), dtype=torch.int64)
