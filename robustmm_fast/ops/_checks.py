"""Argument checks shared by the ops' Python entry points. Each error names the argument and
what was expected: TypeError for a wrong type or dtype, ValueError for a wrong shape or value
(a device mismatch is a ValueError too, as in SDPA)."""
from __future__ import annotations

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(t, name: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def check_float_tensor(t, name: str) -> None:
    check_tensor(t, name)
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor (float16, bfloat16, float32 or "
                        f"float64), got {t.dtype}")


def check_same_dtype_device(t: Tensor, name: str, ref: Tensor, ref_name: str) -> None:
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} and {ref_name} must have the same dtype, got {t.dtype} and {ref.dtype}")
    if t.device != ref.device:
        raise ValueError(f"{name} and {ref_name} must be on the same device, got {t.device} and {ref.device}")


def check_like(t, name: str, ref: Tensor, ref_name: str) -> None:
    """`t` is a float tensor with `ref`'s dtype, device and shape."""
    check_float_tensor(t, name)
    check_same_dtype_device(t, name, ref, ref_name)
    if t.shape != ref.shape:
        raise ValueError(f"{name} must have the shape of {ref_name} {tuple(ref.shape)}, got {tuple(t.shape)}")


def check_broadcastable(t, name: str, ref: Tensor, ref_name: str) -> None:
    """`t` is a float tensor with `ref`'s dtype and device that broadcasts to `ref`'s shape."""
    check_float_tensor(t, name)
    check_same_dtype_device(t, name, ref, ref_name)
    try:
        shape = torch.broadcast_shapes(t.shape, ref.shape)
    except RuntimeError:
        shape = None
    if shape != ref.shape:
        raise ValueError(f"{name} of shape {tuple(t.shape)} must broadcast to the shape of "
                         f"{ref_name} {tuple(ref.shape)}")


def check_row_mask(mask, name: str, ref: Tensor, ref_name: str) -> None:
    """A bool mask over the leading dims of `ref` (True = include)."""
    check_tensor(mask, name)
    if mask.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor (True = include), got {mask.dtype}")
    if mask.device != ref.device:
        raise ValueError(f"{name} and {ref_name} must be on the same device, got {mask.device} and {ref.device}")
    if mask.shape != ref.shape[:-1]:
        raise ValueError(f"{name} must have shape {tuple(ref.shape[:-1])} (the leading dims of "
                         f"{ref_name}), got {tuple(mask.shape)}")


def check_choice(value, name: str, choices: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
