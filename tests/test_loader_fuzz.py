"""Property-based fuzz of every file loader (issue 17.2): on random bytes and on mutated valid
files, a loader returns or raises ValueError/TypeError naming the file -- never another
exception, never a hang (SIGALRM after LIMIT_S), never code from the file (a marker).

Loaders: load_mmsa, load_avmnist (one of its six files mutated), load_masks, load_checkpoint /
load_best, load_config (.toml and .json). The valid MMSA file carries an os.system payload in
an object array, so a mutation that keeps the payload intact must still refuse it.
"""
from __future__ import annotations

import contextlib
import io
import os
import pickle
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from robustmm_fast.config import load_config
from robustmm_fast.data import load_avmnist, load_mmsa
from robustmm_fast.missing import load_masks, save_masks
from robustmm_fast.train import load_best, load_checkpoint, save_atomic
from robustmm_fast.train.checkpoint import CHECKPOINT_FORMAT, MODEL_FORMAT, VERSION

LIMIT_S = 5
# ROBUSTMM_FUZZ_EXAMPLES=5000 for a longer hunt; 60 keeps the file's run to a few seconds
FUZZ = settings(max_examples=int(os.environ.get("ROBUSTMM_FUZZ_EXAMPLES", 60)), deadline=None,
                database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])

# a mutation: (kind, where in the file as a fraction, bytes)
MUTATION = st.tuples(st.sampled_from(["flip", "truncate", "insert", "overwrite"]),
                     st.floats(0, 1), st.binary(min_size=1, max_size=16))
MUTATIONS = st.lists(MUTATION, min_size=1, max_size=4)


def mutate(blob: bytes, mutations) -> bytes:
    for kind, where, data in mutations:
        i = min(int(where * len(blob)), max(len(blob) - 1, 0))
        if kind == "flip" and blob:
            blob = blob[:i] + bytes([blob[i] ^ (data[0] or 1)]) + blob[i + 1:]
        elif kind == "truncate":
            blob = blob[:i]
        elif kind == "insert":
            blob = blob[:i] + data + blob[i:]
        else:
            blob = blob[:i] + data + blob[i + len(data):]
    return blob


class Hang(BaseException):
    """Not an Exception: a loader's `except Exception` must not turn it into a clean error."""


@contextlib.contextmanager
def bounded(seconds: int = LIMIT_S):
    """Fail (Hang) if the block runs longer than `seconds` -- a hang is a bug. The alarm fires
    between bytecodes; a long C call is caught by the elapsed-time check after it."""
    def alarm(signum, frame):
        raise Hang(f"loader still running after {seconds} s")
    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    start = time.perf_counter()
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert time.perf_counter() - start < seconds


def check(load, path, named=None):
    """`load()` returns, or raises ValueError/TypeError whose message names `named`."""
    named = str(named or path)
    with bounded():
        try:
            load()
        except (ValueError, TypeError) as exc:
            assert named in str(exc), str(exc)


# ---------------------------------------------------------------- valid files

class _System:
    def __init__(self, cmd):
        self.cmd = cmd

    def __reduce__(self):
        return os.system, (self.cmd,)


def mmsa_blob(marker) -> bytes:
    """A valid MMSA pickle; with a `marker` path, its raw_text holds an os.system payload."""
    data = mmsa_data()
    if marker is not None:
        data["test"]["raw_text"] = np.array(["a", _System(f"touch {marker}")], dtype=object)
    return pickle.dumps(data, protocol=4)


def mmsa_data() -> dict:
    rng = np.random.default_rng(0)
    data = {}
    for s, n in (("train", 3), ("valid", 2), ("test", 2)):
        data[s] = {"text": rng.normal(size=(n, 3, 4)).astype(np.float32),
                   "audio": rng.normal(size=(n, 2, 3)), "vision": rng.normal(size=(n, 2, 2)),
                   "audio_lengths": np.array([1] * n), "vision_lengths": [2] * n,
                   "regression_labels": rng.uniform(-3, 3, (n, 1)).astype(np.float32),
                   "id": np.array([f"v{i}" for i in range(n)], dtype=object)}
    return data


def checkpoint_blob(folder: Path, fmt: str) -> bytes:
    identity = {"method": "mim", "config": {"lr": 0.01}, "seed": 1, "data": {"name": "x"}}
    obj = {"format": fmt, "version": VERSION, "identity": identity, "epoch": 0, "epochs": 1,
           "model": {"w": torch.arange(6.0).reshape(2, 3)}, "optimizers": {}, "recipe": {},
           "rng": [{"cpu": torch.zeros(4, dtype=torch.uint8), "cuda": None}], "world_size": 1,
           "best": {"epoch": 0, "valid": 0.5, "state": None}, "history": [{"loss": 1.0}],
           "method": "mim", "config": {"lr": 0.01}, "seed": 1, "data": {"name": "x"},
           "best_epoch": 0, "best_valid": 0.5}
    save_atomic(folder / f"{fmt}.pt", obj)
    return (folder / f"{fmt}.pt").read_bytes()


def masks_blob(folder: Path) -> bytes:
    mask = torch.tensor([[True, False], [True, True], [False, True]])
    save_masks(folder / "m.npz", {"train": mask, "test": mask[:2]}, {"modalities": ["a", "b"]})
    return (folder / "m.npz").read_bytes()


def avmnist_files() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    arrays = {"image/train_data.npy": rng.integers(0, 256, (3, 784)).astype(np.uint8),
              "image/test_data.npy": rng.integers(0, 256, (2, 28, 28)).astype(np.float32),
              "audio/train_data.npy": rng.integers(0, 256, (3, 4, 5)).astype(np.float32),
              "audio/test_data.npy": rng.integers(0, 256, (2, 4, 5)).astype(np.uint8),
              "train_labels.npy": rng.integers(0, 10, 3), "test_labels.npy": np.arange(2)}
    out = {}
    for rel, a in arrays.items():
        buf = io.BytesIO()
        np.save(buf, a)
        out[rel] = buf.getvalue()
    return out


CONFIGS = {"c.toml": b'lr = 0.01\nwidths = [64, 32]\n[cyin]\nbeta = 0.5\nname = "x"\n',
           "c.json": b'{"lr": 0.01, "widths": [64, 32], "cyin": {"beta": 0.5}}'}


# ---------------------------------------------------------------- MMSA

@FUZZ
@given(blob=st.binary(max_size=1024))
@example(blob=b"")
@example(blob=b"\x80\x05\x95" + (2 ** 62).to_bytes(8, "little") + b"}.")
def test_mmsa_random_bytes(tmp_path, blob):
    path = tmp_path / "r.pkl"
    path.write_bytes(blob)
    check(lambda: load_mmsa(path), path)


@FUZZ
@given(mutations=MUTATIONS)
def test_mmsa_mutated(tmp_path, mutations):
    marker = tmp_path / "MARKER"
    path = tmp_path / "m.pkl"
    path.write_bytes(mutate(mmsa_blob(marker), mutations))
    check(lambda: load_mmsa(path), path)
    assert not marker.exists()


KEYS = ["text", "audio", "vision", "regression_labels", "audio_lengths", "vision_lengths",
        "text_bert", "id"]
DTYPES = ["float32", "float64", "int64", "uint8", "bool", "complex64", "<U2", "m8[s]", "f2"]


@st.composite
def value(draw):
    """A split's value: usually an array of MMSA-like shape, else anything pickle can hold."""
    if draw(st.booleans()):
        n = draw(st.integers(0, 3))
        shape = (n,) + tuple(draw(st.lists(st.integers(0, 4), max_size=3)))
        dtype = np.dtype(draw(st.sampled_from(DTYPES)))
        floats = dtype.kind in "fc"   # only these hold NaN/Inf; the others get an integer
        fill = draw(st.sampled_from([0, 1, -1, 3.5, np.nan, np.inf, -np.inf, 1e300] if floats
                                    else [0, 1, -1, 7]))
        with np.errstate(all="ignore"):
            return np.full(shape, fill).astype(dtype)
    return draw(st.recursive(
        st.none() | st.integers() | st.floats() | st.text(max_size=3) | st.binary(max_size=3),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner,
                                                                    max_size=3), max_leaves=6))


SPLIT = st.dictionaries(st.sampled_from(KEYS), value(), max_size=len(KEYS))


@FUZZ
@given(data=st.dictionaries(st.sampled_from(["train", "valid", "test", "x"]), SPLIT,
                            min_size=2, max_size=4) | value())
def test_mmsa_random_structures(tmp_path, data):
    """Valid pickles of the wrong structure, dtypes, shapes and values: validation's errors."""
    path = tmp_path / "s.pkl"
    path.write_bytes(pickle.dumps(data, protocol=4))
    check(lambda: load_mmsa(path), path)


@FUZZ
@given(changes=st.lists(st.tuples(st.sampled_from(["train", "valid", "test"]),
                                  st.sampled_from(KEYS), value()), min_size=1, max_size=3))
def test_mmsa_valid_file_with_random_values(tmp_path, changes):
    """A valid file with one to three keys replaced: validation's errors, deep in the checks."""
    data = mmsa_data()
    for split, key, new in changes:
        data[split][key] = new
    path = tmp_path / "v.pkl"
    path.write_bytes(pickle.dumps(data, protocol=4))
    check(lambda: load_mmsa(path), path)


# ---------------------------------------------------------------- AV-MNIST

@FUZZ
@given(which=st.sampled_from(sorted(avmnist_files())), mutations=MUTATIONS,
       random=st.none() | st.binary(max_size=512))
def test_avmnist_mutated_or_random(tmp_path, which, mutations, random):
    files = avmnist_files()
    for rel, blob in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(blob)
    blob = random if random is not None else mutate(files[which], mutations)
    (tmp_path / which).write_bytes(blob)
    check(lambda: load_avmnist(tmp_path), tmp_path)


# ---------------------------------------------------------------- masks

@FUZZ
@given(mutations=MUTATIONS, random=st.none() | st.binary(max_size=512))
def test_load_masks_mutated_or_random(tmp_path, mutations, random):
    good = masks_blob(tmp_path)
    path = tmp_path / "f.npz"
    path.write_bytes(random if random is not None else mutate(good, mutations))
    check(lambda: load_masks(path), path)


# ---------------------------------------------------------------- checkpoints

@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch, on mutated headers
@FUZZ
@given(fmt=st.sampled_from([CHECKPOINT_FORMAT, MODEL_FORMAT]), mutations=MUTATIONS,
       random=st.none() | st.binary(max_size=512))
def test_checkpoint_mutated_or_random(tmp_path, fmt, mutations, random):
    good = checkpoint_blob(tmp_path, fmt)
    path = tmp_path / "f.pt"
    path.write_bytes(random if random is not None else mutate(good, mutations))
    expect = {"method": "mim", "config": {"lr": 0.01}, "seed": 1, "data": {"name": "x"}}
    if fmt == CHECKPOINT_FORMAT:
        check(lambda: load_checkpoint(path, expect=expect), path)
    else:
        check(lambda: load_best(path), path)


# ---------------------------------------------------------------- config files

@FUZZ
@given(name=st.sampled_from(sorted(CONFIGS)), mutations=MUTATIONS,
       random=st.none() | st.binary(max_size=512))
@example(name="c.json", mutations=[("flip", 0, b"\x01")], random=b"[" * 100_000)
@example(name="c.toml", mutations=[("flip", 0, b"\x01")], random=b"x = " + b"[" * 100_000)
@example(name="c.toml", mutations=[("flip", 0, b"\x01")], random=b"\xff\xfe\x00")
def test_config_mutated_or_random(tmp_path, name, mutations, random):
    path = tmp_path / name
    path.write_bytes(random if random is not None else mutate(CONFIGS[name], mutations))
    check(lambda: load_config(str(path)), path)


# ---------------------------------------------------------------- the harness itself

def test_harness_catches_a_hang_and_a_foreign_exception(tmp_path):
    """`check` can fail: a loader that hangs, or raises another exception, is reported."""
    with pytest.raises(Hang), bounded(1):
        time.sleep(3)
    with pytest.raises(KeyError):
        check(lambda: {}["x"], tmp_path)
    with pytest.raises(AssertionError):
        check(lambda: (_ for _ in ()).throw(ValueError("no file named")), tmp_path)


def test_unmutated_files_are_valid(tmp_path):
    """The mutations start from files the loaders accept (the MMSA one but for its payload)."""
    marker = tmp_path / "MARKER"
    path = tmp_path / "m.pkl"
    path.write_bytes(mmsa_blob(marker))
    with pytest.raises(ValueError, match="refused global 'posix.system'"):
        load_mmsa(path)
    assert not marker.exists()
    path.write_bytes(mmsa_blob(None))
    assert load_mmsa(path).num_samples == 7
    files = avmnist_files()
    for rel, blob in files.items():
        (tmp_path / "av" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "av" / rel).write_bytes(blob)
    assert load_avmnist(tmp_path / "av").num_samples == 5
    (tmp_path / "f.npz").write_bytes(masks_blob(tmp_path))
    assert load_masks(tmp_path / "f.npz")[1] == {"modalities": ["a", "b"]}
    for fmt, load in ((CHECKPOINT_FORMAT, load_checkpoint), (MODEL_FORMAT, load_best)):
        (tmp_path / "f.pt").write_bytes(checkpoint_blob(tmp_path, fmt))
        assert load(tmp_path / "f.pt")["format"] == fmt
    for name, blob in CONFIGS.items():
        (tmp_path / name).write_bytes(blob)
        assert load_config(str(tmp_path / name))["cyin"]["beta"] == 0.5
