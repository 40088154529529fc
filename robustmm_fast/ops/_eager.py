"""When an op may skip its custom-op dispatch (about 0.1 ms a call) and run its autograd.Function
directly: plain tensors in eager mode. Under torch.compile, fake tensors, functorch transforms or
tensor subclasses the custom ops must run, so those see the registered fake and autograd."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode

_PLAIN = (Tensor, torch.nn.Parameter)


def eager_fast_path(*tensors: Optional[Tensor]) -> bool:
    if torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None:
        return False
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return False
    return all(t is None or type(t) in _PLAIN for t in tensors)
