"""Checkpoints: atomic writes, validated reads, and the identity a resumed run must match.

Two files live in a run's `out_dir`:

- ``checkpoint.pt`` (written after every epoch) -- everything needed to continue exactly:
  ``{"format": "robustmm_fast.checkpoint", "version": 1, "identity": {method, config, seed,
  data}, "epoch": last finished epoch (0-based), "epochs": planned total, "model": state dict,
  "optimizers": {name: state dict}, "recipe": recipe.state_dict(), "rng": [per rank {"cpu":
  ByteTensor, "cuda": ByteTensor | None}], "world_size": W, "best": {"epoch", "valid",
  "state"}, "history": [per-epoch dicts], "torch": version}``.
- ``best.pt`` (written when fit ends) -- the selected model and what rebuilds it:
  ``{"format": "robustmm_fast.model", "version": 1, "method", "config", "seed", "data",
  "model": state dict, "best_epoch", "best_valid", "history"}``.

Both hold only tensors and plain Python values, so they are read with
``torch.load(weights_only=True)``: loading a checkpoint never runs code from the file.
"""
from __future__ import annotations

import json
import os
import tempfile
import threading
from pathlib import Path
from typing import Any, Optional

import torch

__all__ = ["CHECKPOINT_FORMAT", "MODEL_FORMAT", "VERSION", "save_atomic", "write_text_atomic",
           "BackgroundSaver",
           "load_checkpoint",
           "load_best", "load_trained", "data_facts", "run_identity", "canonical"]

CHECKPOINT_FORMAT = "robustmm_fast.checkpoint"
MODEL_FORMAT = "robustmm_fast.model"
VERSION = 1

_CHECKPOINT_KEYS = ("identity", "epoch", "epochs", "model", "optimizers", "recipe", "rng",
                    "world_size", "best", "history")
_MODEL_KEYS = ("method", "config", "seed", "data", "model", "best_epoch", "best_valid")


# ---------------------------------------------------------------- writing

def save_atomic(path, obj: Any) -> None:
    """torch.save `obj` to `path` so that `path` is either the old file or the complete new one.
    (write_text_atomic: the same for a text file.)

    The bytes go to a temporary file in the same directory (same filesystem, so the rename is
    atomic), which is flushed and fsync'ed, then ``os.replace``'d over `path`; the directory is
    fsync'ed so the rename itself survives a power loss. Any exception (or KeyboardInterrupt)
    while writing removes the temporary file and leaves `path` untouched; a SIGKILL can leave
    a stray ``.<name>.*.tmp`` beside it, never a truncated `path`.
    """
    _write_atomic(Path(path), lambda f: torch.save(obj, f))


def write_text_atomic(path, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically and durably, as save_atomic."""
    _write_atomic(Path(path), lambda f: f.write(text.encode("utf-8")))


def _write_atomic(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)


class BackgroundSaver:
    """save_atomic in a background thread, one write in flight, so training goes on while a
    checkpoint is serialised and fsync'ed. submit() first waits for the previous write; wait()
    waits for the last one. A failed write is raised by the next submit() or wait(). `obj`
    must be a snapshot: the caller hands over tensors nothing modifies afterwards."""

    def __init__(self):
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None

    def submit(self, path, obj: Any) -> None:
        self.wait()
        self._thread = threading.Thread(target=self._write, args=(path, obj),
                                        name=f"save {Path(path).name}")
        self._thread.start()

    def _write(self, path, obj) -> None:
        try:
            save_atomic(path, obj)
        except BaseException as e:  # re-raised in the training thread
            self._error = e

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        error, self._error = self._error, None
        if error is not None:
            raise error


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. a platform that cannot open directories; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---------------------------------------------------------------- identity of a run

def canonical(value: Any) -> Any:
    """`value` as plain JSON data (tuples -> lists, sorted keys; other objects -> str), so two
    configs compare equal exactly when their JSON forms do."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def data_facts(dataset) -> dict:
    """What a model and a checkpoint depend on in a dataset (read from its arrays)."""
    return {"name": dataset.name, "task": dataset.task,
            "modalities": {m: [dataset.seq_lens[m], dataset.dims[m]] for m in dataset.modalities},
            "num_classes": int(dataset.num_classes),
            "padded": sorted(dataset.lengths),
            "splits": {s: int(idx.numel()) for s, idx in sorted(dataset.splits.items())}}


def run_identity(method: str, config: dict, seed: int, dataset) -> dict:
    """The facts a checkpoint must share with a run that resumes from it."""
    return canonical({"method": method, "config": config, "seed": int(seed),
                      "data": data_facts(dataset)})


def _differences(saved: dict, expected: dict) -> list[str]:
    out = []
    for key in ("method", "seed", "data"):
        if saved.get(key) != expected.get(key):
            out.append(f"{key}: checkpoint has {saved.get(key)!r}, this run has {expected.get(key)!r}")
    a, b = saved.get("config") or {}, expected.get("config") or {}
    for k in sorted(set(a) | set(b)):
        if a.get(k, "<absent>") != b.get(k, "<absent>"):
            out.append(f"config[{k!r}]: checkpoint has {a.get(k, '<absent>')!r}, this run has "
                       f"{b.get(k, '<absent>')!r}")
    return out


# ---------------------------------------------------------------- reading

def _load(path: Path, fmt: str, keys: tuple[str, ...]) -> dict:
    if not path.is_file():
        raise ValueError(f"{path}: no such checkpoint file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, garbage bytes, a pickle of disallowed objects
        raise ValueError(f"{path}: not a readable {fmt} file ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from e
    # type checks first: a crafted file's tensor in place of a str/int would make `!=`
    # elementwise, and `if tensor` ambiguous (RuntimeError)
    if not isinstance(obj, dict) or not isinstance(obj.get("format"), str) \
            or obj["format"] != fmt:
        found = obj.get("format") if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(f"{path}: expected a {fmt!r} file, found {found!r}")
    if type(obj.get("version")) is not int or obj["version"] != VERSION:
        raise ValueError(f"{path}: {fmt} version {obj.get('version')!r} is not supported "
                         f"(this robustmm_fast reads version {VERSION})")
    missing = [k for k in keys if k not in obj]
    if missing:
        raise ValueError(f"{path}: corrupt {fmt} file, missing {missing}")
    return obj


def load_checkpoint(path, *, expect: Optional[dict] = None) -> dict:
    """Read and validate a ``checkpoint.pt``; with `expect` (a `run_identity`), a checkpoint of
    another method / config / seed / dataset raises ValueError listing every difference."""
    path = Path(path)
    ckpt = _load(path, CHECKPOINT_FORMAT, _CHECKPOINT_KEYS)
    if expect is not None:
        try:  # as JSON data, like `expect`: comparing a crafted file's tensors cannot raise
            saved = canonical(ckpt["identity"])
        except (TypeError, ValueError, RecursionError) as e:
            raise ValueError(f"{path}: corrupt {CHECKPOINT_FORMAT} file, its identity is not "
                             f"plain data ({type(e).__name__}: {e})") from None
        if not isinstance(saved, dict) or not isinstance(saved.get("config") or {}, dict):
            raise ValueError(f"{path}: corrupt {CHECKPOINT_FORMAT} file, its identity must be "
                             "a dict with a 'config' dict")
        diff = _differences(saved, expect)
        if diff:
            raise ValueError(f"{path} belongs to another run, refusing to resume or overwrite it "
                             f"(use another out_dir, or delete it): " + "; ".join(diff))
    return ckpt


def load_best(path) -> dict:
    """Read and validate a ``best.pt`` (the selected model of a finished fit)."""
    best = _load(Path(path), MODEL_FORMAT, _MODEL_KEYS)
    for key, kind in (("method", str), ("config", dict), ("data", dict), ("model", dict)):
        if not isinstance(best[key], kind):  # load_trained reads them as these types
            raise ValueError(f"{path}: corrupt {MODEL_FORMAT} file, {key!r} must be a "
                             f"{kind.__name__}, got {type(best[key]).__name__}")
    return best


def load_trained(path, dataset, *, method):
    """Rebuild the model saved in a ``best.pt`` for `dataset` (eval mode, CPU).

    method: the registry Method that trained it (``robustmm_fast.models.get_method(
    load_best(path)["method"])``; name lookups live in cli.py / run.py). The dataset must have the modalities (names, lengths,
    dims), task and classes the model was trained on (ValueError naming what differs).
    """
    path = Path(path)
    best = load_best(path)
    here = canonical(data_facts(dataset))
    try:  # as JSON data, like `here`: comparing a crafted file's tensors cannot raise
        saved = canonical(best["data"])
    except (TypeError, ValueError, RecursionError) as e:
        raise ValueError(f"{path}: corrupt {MODEL_FORMAT} file, its 'data' is not plain data "
                         f"({type(e).__name__}: {e})") from None
    for key in ("task", "modalities", "num_classes"):
        if saved.get(key) != here[key]:
            raise ValueError(f"{path}: the model was trained on {key} {saved.get(key)!r}, but "
                             f"dataset {dataset.name!r} has {here[key]!r}")
    name = best["method"]
    if name.startswith("custom:"):
        raise ValueError(f"{path}: the model is a custom {name[7:]} (fit(model=...)); build it "
                         "yourself and load_state_dict(load_best(path)['model'])")
    if method is None or isinstance(method, str):  # name lookups live above train/
        raise TypeError(f"{path}: load_trained needs the Method that trained it: "
                        f"method=robustmm_fast.models.get_method({name!r})")
    config = {k: v for k, v in best["config"].items() if k not in _engine_keys()}
    model = method.build(dataset, config)
    model.load_state_dict(best["model"])
    return model.eval()


def _engine_keys() -> tuple[str, ...]:
    from ..contract import ENGINE_KEYS
    return tuple(ENGINE_KEYS)
