"""Checks of the `robustmm` command's arguments, run before any training: each failure is a
UsageError naming the flag, key or file and what was expected, which the command prints as one
line (`robustmm <command>: error: ...`, exit status 2). A typo found after an hour of training
loses the hour; found here it costs nothing.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Optional, Sequence

__all__ = ["UsageError", "check_device", "check_out", "check_methods", "check_protocol",
           "check_data", "check_configs", "check_checkpoint"]


class UsageError(ValueError):
    """An error in the command's arguments, files or config: the user's to fix."""


def check_device(text: str):
    """'cpu', 'cuda', 'cuda:N' -> torch.device that exists on this machine."""
    import torch
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError, TypeError):
        raise UsageError(f"--device: expected cpu, cuda or cuda:N, got {text!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device: expected cpu, cuda or cuda:N, got {text!r}")
    if device.type == "cuda":
        if not torch.backends.cuda.is_built():
            raise UsageError(f"--device {text}: this torch ({torch.__version__}) is built "
                             "without CUDA; install a CUDA build of torch or use --device cpu")
        if not torch.cuda.is_available():
            raise UsageError(f"--device {text}: no CUDA device is visible")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {text}: only {torch.cuda.device_count()} CUDA "
                             "device(s) are visible")
    return device


def check_out(path: str, flag: str = "--out") -> Path:
    """An output directory that exists (created) and takes a file."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise UsageError(f"{flag} {path}: exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out, prefix=".robustmm-write-check-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UsageError(f"{flag} {path}: cannot write there ({exc.strerror or exc})") from None
    return out


def check_methods(names: Sequence[str], flag: str) -> list[str]:
    from .models.registry import METHODS
    twice = sorted({n for n in names if list(names).count(n) > 1})
    if twice:
        raise UsageError(f"{flag}: {', '.join(twice)} given more than once")
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise UsageError(f"{flag}: unknown method(s) {', '.join(map(repr, unknown))}; known: "
                         f"{', '.join(sorted(METHODS))}")
    return list(names)


def check_protocol(spec: str):
    from .run import parse_protocol
    try:
        return parse_protocol(spec)
    except ValueError as exc:
        raise UsageError(f"--protocol: {exc}") from None


def check_data(spec: str, seed: int):
    """The dataset of the first seed (loaded now, so a bad path or file fails before training)."""
    from .run import load_data
    try:
        return load_data(spec, seed)
    except (ValueError, TypeError, OSError) as exc:
        text = str(exc)
        raise UsageError(text if text.startswith("--data") else f"--data {spec}: {text}") from None


def check_configs(methods: Sequence[str], dataset, overrides: dict,
                  config_file: Optional[dict], source: Optional[str]) -> None:
    """Every method's full config for this dataset, checked as the run will build it (keys
    and typed values), naming where a bad key came from (--set or the --config file)."""
    from .run import method_configs
    try:
        method_configs(methods, dataset.name, overrides=overrides, config_file=config_file)
    except (ValueError, TypeError) as exc:
        where = "--set / --config " + source if source else "--set"
        raise UsageError(f"{where}: {exc}") from None


def check_checkpoint(path: str) -> dict:
    """The saved best-model record of `robustmm eval`'s checkpoint argument."""
    from .train import load_best
    if not Path(path).is_file():
        what = "a directory" if Path(path).is_dir() else "no such file"
        raise UsageError(f"checkpoint {path}: {what} (expected a best.pt written by robustmm "
                         "train/run)")
    try:
        return load_best(path)
    except (ValueError, TypeError, KeyError, OSError, RuntimeError) as exc:
        raise UsageError(f"checkpoint {path}: {exc}") from None
