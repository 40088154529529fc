"""Backend availability and choice (DESIGN §3).

Four backends implement every op: ``reference`` (pure PyTorch, any device), ``cpp`` (the C++
extension ``robustmm_fast._C``, CPU tensors), ``cuda`` (``robustmm_fast._C_cuda``, CUDA tensors)
and ``triton`` (``robustmm_fast.kernels``, CUDA tensors; CPU tensors only under
``TRITON_INTERPRET=1``).

The choice comes from ``use_backend(name)`` if active, else ``ROBUSTMM_BACKEND``, else ``auto``:
CPU tensors -> cpp if built, else reference; CUDA tensors -> cuda, else triton, else reference.
An explicitly requested backend that cannot run raises RuntimeError saying why and how to fix it;
``auto`` falls back quietly (one debug log line per fallback).

Importing this module never fails for a missing extension, triton or GPU.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import importlib.util
import json
import logging
import os
import warnings
from collections import Counter
from pathlib import Path

import torch

__all__ = ["BACKENDS", "backends", "use_backend", "choose", "record", "last_backend",
           "backend_calls", "backward_calls", "LIMITATIONS"]

log = logging.getLogger("robustmm_fast")

BACKENDS = ("reference", "cpp", "cuda", "triton")
_CHOICES = ("auto",) + BACKENDS
_requested: contextvars.ContextVar[str | None] = contextvars.ContextVar("robustmm_backend", default=None)

# op name -> backend that ran its last call, and counts per (op, backend): tests use these to
# prove that the backend they name really ran (forward and backward alike).
_last: dict[str, str] = {}
backend_calls: Counter = Counter()
backward_calls: Counter = Counter()
_logged_fallbacks: set = set()  # auto's fallbacks are logged once each


def _build_record() -> dict:
    path = Path(__file__).with_name("_build_status.json")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _import_extension(name: str):
    """(module or None, reason it is missing)."""
    try:
        return importlib.import_module(f"robustmm_fast.{name}"), None
    except Exception as exc:  # ImportError, or an undefined symbol from an ABI mismatch
        recorded = _build_record().get(name)
        if isinstance(exc, ModuleNotFoundError) and exc.name == f"robustmm_fast.{name}":
            why = recorded or ("not built (no build record: installed without torch at build "
                               "time, e.g. an isolated `pip install .`)")
        else:
            why = f"import failed: {exc.__class__.__name__}: {exc}"
        return None, why


_C, _C_reason = _import_extension("_C")
if _C is None:
    warnings.warn(f"robustmm_fast: the C++ extension is unavailable ({_C_reason}); CPU tensors use "
                  "the slower pure-PyTorch reference backend. `robustmm info` shows every backend.",
                  RuntimeWarning, stacklevel=2)
if _C is None:
    _C_cuda, _C_cuda_reason = None, f"needs robustmm_fast._C, which is unavailable ({_C_reason})"
elif torch.version.cuda is None and torch.version.hip is None:
    _C_cuda, _C_cuda_reason = None, f"torch {torch.__version__} is a CPU-only build"
else:
    _C_cuda, _C_cuda_reason = _import_extension("_C_cuda")

_FIX = {
    "cpp": "reinstall with `pip install --no-build-isolation .` in an environment with torch and a C++ compiler",
    "cuda": "install a CUDA build of torch and nvcc, then `pip install --no-build-isolation .` (or FORCE_CUDA=1)",
    "triton": "`pip install triton` and run on a CUDA device (or set TRITON_INTERPRET=1 before import, for CPU tests)",
}


def _triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_status() -> tuple[bool, str | None]:
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed"
    try:
        importlib.import_module("robustmm_fast.kernels")
    except Exception as exc:
        return False, f"robustmm_fast.kernels failed to import: {exc.__class__.__name__}: {exc}"
    return True, None


@functools.lru_cache(maxsize=None)
def kernel_registered(op: str, dispatch_key: str) -> bool:
    """Whether the built extension registers `op`'s forward kernel for `dispatch_key` ('CPU' or
    'CUDA'). False for an extension built before the op existed (a stale in-place build)."""
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(
            f"robustmm_C::{op}_forward", dispatch_key)
    except RuntimeError:  # the schema itself is unknown: the extension predates the op
        return False


def _stale(op: str | None, extension: str, dispatch_key: str) -> str | None:
    if op is None or kernel_registered(op, dispatch_key):
        return None
    return (f"robustmm_fast.{extension} was built before the {op} kernel existed (a stale build; "
            "rebuild with `python setup.py build_ext --inplace`, or reinstall)")


def _unavailable_reason(backend: str, device: torch.device, op: str | None = None) -> str | None:
    """None if `backend` can run `op` (any op when None) on tensors of `device`, else why not."""
    if backend == "reference":
        return None
    if backend == "cpp":
        if device.type != "cpu":
            return f"the cpp backend runs CPU tensors, got {device}"
        if _C is None:
            return f"robustmm_fast._C: {_C_reason}"
        return _stale(op, "_C", "CPU")
    if backend == "cuda":
        if device.type != "cuda":
            return f"the cuda backend runs CUDA tensors, got {device}"
        if _C_cuda is None:
            return f"robustmm_fast._C_cuda: {_C_cuda_reason}"
        return _stale(op, "_C_cuda", "CUDA")
    if backend == "triton":
        ok, why = _triton_status()
        if not ok:
            return why
        if device.type == "cuda" or (device.type == "cpu" and _triton_interpret()):
            return None
        return f"triton runs CUDA tensors (CPU tensors only under TRITON_INTERPRET=1), got {device}"
    raise ValueError(f"unknown backend {backend!r}; expected one of {_CHOICES}")


def requested_backend() -> str:
    """The backend asked for by use_backend(...) or ROBUSTMM_BACKEND, or 'auto'."""
    name = _requested.get()
    if name is None:
        name = os.environ.get("ROBUSTMM_BACKEND", "auto").strip().lower() or "auto"
        if name not in _CHOICES:
            raise ValueError(f"ROBUSTMM_BACKEND={name!r} is not one of {_CHOICES}")
    return name


# (op, backend, device type, dtype) combinations a backend does not run, and why: `auto` skips
# them, an explicit request raises with the reason, and `robustmm info` lists them.
LIMITATIONS: dict[tuple[str, str, str, torch.dtype], str] = {
    ("masked_attention", "triton", "cuda", torch.float64):
        "Triton compiles no float64 tl.dot at these tile sizes for sm_80/sm_90 (Triton 3.6-3.9: "
        "'Currently fp64 don't support largeK MMA'); float64 attention on CUDA runs the reference",
}


def _limitation(op: str, backend: str, device_type: str, dtype: torch.dtype) -> str | None:
    return LIMITATIONS.get((op, backend, device_type, dtype))


@torch.compiler.assume_constant_result
def choose(op: str, device_type: str, dtype: torch.dtype,
           implemented: tuple[str, ...] = BACKENDS) -> str:
    """The backend that runs `op` on tensors of `device_type` and `dtype`, from use_backend /
    ROBUSTMM_BACKEND / auto. Records nothing: the kernels record what ran (`record`).

    Ops call it once, in the forward, and hand the name to the backward, so the backward runs
    on the forward's backend wherever and on whichever thread autograd runs it. Under
    torch.compile it is evaluated when the graph is traced and the choice is part of the graph
    (a later use_backend does not retrace it: compile inside the block you mean).
    """
    device = torch.device(device_type)
    name = requested_backend()
    if name != "auto":
        missing = name not in implemented
        limited = None if missing else _limitation(op, name, device_type, dtype)
        why = f"op {op!r} has no {name} kernel (it has {', '.join(implemented)})" if missing \
            else (limited or _unavailable_reason(name, device, op))
        if why is not None:
            fix = "" if missing or limited else _FIX.get(name, "")
            raise RuntimeError(f"robustmm_fast: backend {name!r} was requested for {op} but is "
                               f"unavailable: {why}." + (f" To fix: {fix}." if fix else ""))
        return name
    order = ("cpp",) if device_type == "cpu" else ("cuda", "triton")
    for candidate in order:
        if candidate not in implemented:
            continue
        why = _limitation(op, candidate, device_type, dtype) \
            or _unavailable_reason(candidate, device, op)
        if why is None:
            return candidate
        if (op, candidate, device_type, dtype) not in _logged_fallbacks:
            _logged_fallbacks.add((op, candidate, device_type, dtype))
            log.debug("robustmm_fast: %s falls back from %s: %s", op, candidate, why)
    return "reference"


def record(op: str, backend: str, backward: bool = False) -> None:
    """Called by each kernel call: `backend_calls` counts forward and backward calls of `op` on
    `backend` together, `backward_calls` the backward ones alone; `last_backend` is the last."""
    _last[op] = backend
    backend_calls[(op, backend)] += 1
    if backward:
        backward_calls[(op, backend)] += 1


def last_backend(op: str) -> str | None:
    """The backend that ran the most recent call of `op` (None if it never ran)."""
    return _last.get(op)


@contextlib.contextmanager
def use_backend(name: str):
    """Run the ops called inside the block on backend `name` ('auto', 'reference', 'cpp', 'cuda',
    'triton'). The choice is made at each op's forward; its backward runs on the same backend
    even when `.backward()` is called after the block. Under torch.compile the backend in effect
    when the graph is traced is compiled in."""
    name = name.strip().lower()
    if name not in _CHOICES:
        raise ValueError(f"backend must be one of {_CHOICES}, got {name!r}")
    token = _requested.set(name)
    try:
        yield
    finally:
        _requested.reset(token)


def backends() -> dict[str, dict]:
    """Each backend's availability: {name: {"available": bool, "reason": str | None, "devices": ...}}."""
    cuda_dev = torch.device("cuda")
    cpu_dev = torch.device("cpu")
    out = {}
    for name in BACKENDS:
        if name == "reference":
            out[name] = {"available": True, "reason": None, "devices": "cpu, cuda"}
        elif name == "cpp":
            why = _unavailable_reason(name, cpu_dev)
            out[name] = {"available": why is None, "reason": why, "devices": "cpu"}
        elif name == "cuda":
            why = _unavailable_reason(name, cuda_dev)
            if why is None and not torch.cuda.is_available():
                why = "built, but no CUDA device is visible"
            out[name] = {"available": why is None, "reason": why, "devices": "cuda"}
        else:
            ok, why = _triton_status()
            devices = "cuda" + (", cpu (TRITON_INTERPRET=1)" if _triton_interpret() else "")
            if ok and not torch.cuda.is_available() and not _triton_interpret():
                ok, why = False, "installed, but no CUDA device is visible (and TRITON_INTERPRET is not 1)"
            out[name] = {"available": ok, "reason": why, "devices": devices}
    return out


def cpu_capability() -> str | None:
    """'avx2' or 'default': which copy of the CPU kernels runs (None without the extension)."""
    return _C.cpu_capability() if _C is not None else None
