"""One autograd path per op, the same in eager mode, under torch.compile and under functorch
transforms (flash-attention's layout): two custom ops with fakes (the op's forward and
backward kernels), one ``torch.autograd.Function`` that calls them, and the op's functional API
that calls ``Function.apply``.

The backend is chosen once, by the functional API (``_backend.choose``), and is the first
argument of both custom ops: the Function keeps it on ``ctx``, so the backward runs on the
forward's backend whether ``.backward()`` is called inside ``use_backend`` or not, and on
whichever thread autograd runs it (CUDA's device threads do not see the ContextVar).

Autocast: the functional API casts its floating inputs to the autocast dtype (as autocast does
for SDPA and the other lower-precision ops) and runs the op with autocast off, so the kernels
(and the reference's own torch calls) accumulate in float32 as they do without autocast.
"""
from __future__ import annotations

import functools
import inspect
from typing import Callable, Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["fused_function", "register_folded_vmap", "autocast_inputs", "autocast_off"]


def fused_function(name: str, forward_op, backward_op, setup_context: Callable,
                   backward: Callable) -> type[torch.autograd.Function]:
    """The autograd.Function of op `name`: ``apply(backend, *inputs)``.

    forward_op(backend, *inputs) -> outputs        the forward custom op (torch.library.custom_op)
    backward_op(backend, ...)                        the backward custom op
    setup_context(ctx, inputs, outputs)              what the backward needs, on ctx
    backward(ctx, backward_op, *grad_outputs)        the gradients of `inputs`, calling
                                                     backward_op (the backend already bound)

    Under vmap the Function runs its forward and backward as they are (generate_vmap_rule),
    and the custom ops' own vmap rules (`register_folded_vmap`) fold the vmapped dim into the
    kernels' rows.
    """
    # called as torch.ops overloads: what torch.compile traces without a graph break
    forward_op = _overload(forward_op)
    backward_op = _overload(backward_op)

    def forward(backend, *inputs):
        return forward_op(backend, *inputs)

    # Function.apply binds its arguments through inspect.signature(forward) when setup_context
    # is separate (it must be, for functorch); a precomputed signature halves that cost.
    forward.__signature__ = inspect.signature(forward)

    def _setup_context(ctx, inputs, output):
        ctx.backend = inputs[0]
        setup_context(ctx, inputs[1:], output)

    @once_differentiable  # no double backward: say so instead of returning zeros
    def _backward(ctx, *grads):
        return (None, *backward(ctx, functools.partial(backward_op, ctx.backend), *grads))

    return type(name, (torch.autograd.Function,), {
        "__doc__": f"{name}: forward and backward custom ops of one backend (see ops/_autograd.py).",
        "generate_vmap_rule": True,
        "forward": staticmethod(forward),
        "setup_context": staticmethod(_setup_context),
        "backward": staticmethod(_backward),
    })


def register_folded_vmap(op, inputs: str, outputs: str,
                         random: Optional[Callable[..., bool]] = None) -> None:
    """A vmap rule for custom op `op` that folds the vmapped dim into the kernel's rows, so one
    kernel call covers the whole vmapped batch (instead of vmap's per-sample loop).

    `inputs` has one letter per argument and `outputs` one per output (one letter for an op
    that returns a single Tensor):
      r  rows: the vmapped dim becomes a new leading dim (the kernel takes any leading dims)
      t  terms: the same, but as dim 1 (after a leading (2, ...) dim)
      b  batch: folded into dim 0 (the kernel's B), (V, B, ...) -> (V B, ...)
      s  a seed: one for the whole call (a per-sample seed is reduced to its first)
      -  not a tensor, or never vmapped
    An unbatched operand is expanded to the vmapped size; a numel-0 placeholder (an unused
    gradient) passes as it is and comes out unbatched. `random(*args)` says whether the call
    draws random numbers: vmap's randomness='same' cannot be honoured then (every folded row
    draws its own), so it raises.
    """
    def rule(info, in_dims, *args):
        if random is not None and info.randomness == "same" and random(*args):
            raise NotImplementedError(
                f"{op._qualname} under vmap(randomness='same'): each sample draws its own random "
                "numbers; use randomness='different', or pass the noise in / set dropout_p=0")
        size, folded = info.batch_size, []
        for arg, dim, kind in zip(args, in_dims, inputs):
            if kind == "-" or arg is None or (dim is None and arg.shape == (0,)):
                folded.append(arg)
            elif kind == "s":
                folded.append(arg if dim is None else arg.select(dim, 0))
            else:
                x = arg.movedim(dim, 0) if dim is not None else arg.expand(size, *arg.shape)
                x = x.movedim(0, 1) if kind == "t" else (x.flatten(0, 1) if kind == "b" else x)
                folded.append(x.contiguous())
        out = op(*folded)
        single = isinstance(out, Tensor)
        if single:
            out = (out,)
        results, dims = [], []
        for o, kind in zip(out, outputs):
            if kind == "-" or o.shape == (0,):
                results.append(o)
                dims.append(None)
            elif kind == "b":
                results.append(o.unflatten(0, (size, -1)))
                dims.append(0)
            else:
                results.append(o)
                dims.append(1 if kind == "t" else 0)
        if single:
            return results[0], dims[0]
        return tuple(results), tuple(dims)

    torch.library.register_vmap(op, rule)


def _overload(op):
    namespace, name = op._qualname.split("::")
    return getattr(getattr(torch.ops, namespace), name).default


def autocast_inputs(device_type: str, *tensors: Optional[Tensor]) -> tuple[Optional[Tensor], ...]:
    """`tensors` as autocast would pass them to a lower-precision op on `device_type`: float16/
    bfloat16/float32 ones in the autocast dtype (float64 and non-float ones unchanged); all
    unchanged when autocast is off."""
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() and t.dtype != torch.float64
                 else t for t in tensors)


def autocast_off(device_type: str):
    """A context with autocast disabled on `device_type` (the op's inputs are cast already)."""
    return torch.autocast(device_type, enabled=False)
