"""Launch on the tensors' device: a Triton launch uses the *current* CUDA device and its
current stream, not the device its tensors are on, so every host wrapper runs its launches
inside ``torch.cuda.device(first tensor's device)`` (as torch's own CUDA ops do with a
device guard). A no-op for CPU tensors (the interpreter)."""
from __future__ import annotations

import functools

import torch


def on_tensor_device(wrapper):
    """Decorate a host wrapper whose first argument is a tensor."""
    @functools.wraps(wrapper)
    def guarded(first, *args, **kwargs):
        if first.device.type != "cuda" or first.device.index == torch.cuda.current_device():
            return wrapper(first, *args, **kwargs)
        with torch.cuda.device(first.device):
            return wrapper(first, *args, **kwargs)
    return guarded
