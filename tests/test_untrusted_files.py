"""Hostile and broken MMSA pickles (issue 17): no code from a data file ever runs, and every bad
file is one ValueError naming the file (and the refused global, the split and the key).

Each hostile pickle is also loaded once with plain ``pickle.loads`` into a control marker, so a
payload that would not run anyway cannot make these tests pass.
"""
from __future__ import annotations

import collections
import os
import pickle
import re
import struct
import subprocess
import time

import numpy as np
import pytest
import torch

from robustmm_fast.data import load_mmsa
from robustmm_fast.data.safe_pickle import ALLOWED

SIZES = {"train": 4, "valid": 2, "test": 3}
LT, DT, LA, DA, LV, DV = 5, 6, 7, 3, 4, 2


def mmsa_like(seed: int = 0, aligned: bool = False) -> dict:
    """An MMSA-format dict as MMSA ships it: numpy arrays, object arrays of strings for ids and
    raw text, numpy scalars in the annotations."""
    rng = np.random.default_rng(seed)
    out = {}
    for s, n in SIZES.items():
        audio = rng.normal(size=(n, LA, DA))
        audio[0, 0, 0] = -np.inf                                   # COVAREP's failed frame
        mask = (np.arange(LT) < rng.integers(1, LT + 1, n)[:, None]).astype(np.float32)
        d = {"raw_text": np.array([f"utterance {i}" for i in range(n)], dtype=object),
             "id": np.array([f"v{i}$_${i}" for i in range(n)], dtype=object),
             "text": rng.normal(size=(n, LT, DT)).astype(np.float32),
             "text_bert": np.stack([mask * 101, mask, 0 * mask], 1),
             "audio": audio, "vision": rng.normal(size=(n, LV, DV)).astype(np.float32),
             "regression_labels": rng.uniform(-3, 3, (n, 1)).astype(np.float32),
             "annotations": [np.float64(0.5), np.int64(2)] * (n // 2 + 1)}
        if not aligned:
            d["audio_lengths"] = rng.integers(0, LA + 1, n)
            d["vision_lengths"] = list(rng.integers(0, LV + 1, n))
        out[s] = d
    return out


def write(path, obj, protocol=4):
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    return path


# ---------------------------------------------------------------- hostile payloads

class _Reduce:
    """Pickles as `func(*args)`; callable so that it can itself be a reducer's function."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args

    def __call__(self, *args):  # never called: pickle only needs it to be callable
        raise AssertionError


def payloads(folder):
    """{kind: (payload, regex of the refused global)} and the marker each would create.

    The __import__ payload imports a module of ours that creates the marker when imported (a
    module name in a pickle is code too)."""
    marker = folder / "MARKER"
    module = f"evil_{abs(hash(str(folder)))}"
    (folder / f"{module}.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    cmd = f"touch {marker}"
    return marker, {
        "os.system": (_Reduce(os.system, cmd), r"'(posix|os)\.system'"),
        "subprocess.Popen": (_Reduce(subprocess.Popen, ["touch", str(marker)]),
                             r"'subprocess\.Popen'"),
        "builtins.eval": (_Reduce(eval, f"__import__('os').system({cmd!r})"),
                          r"'builtins\.eval'"),
        "builtins.exec": (_Reduce(exec, f"import os; os.system({cmd!r})"), r"'builtins\.exec'"),
        "getattr chain": (_Reduce(_Reduce(getattr, _Reduce(__import__, "os"), "system"), cmd),
                          r"'builtins\.getattr'"),
        "builtins.__import__": (_Reduce(__import__, module), r"'builtins\.__import__'"),
    }


def _control(obj, marker):
    """The payload really runs under plain pickle (else the test below could not fail)."""
    obj = pickle.loads(pickle.dumps(obj, protocol=2))
    if isinstance(obj, subprocess.Popen):
        obj.wait()
    return marker.exists()


def _hosts(payload):
    """Where a payload can sit: the top level, a key of a valid file, an object array's element."""
    data = mmsa_like()
    data["valid"]["id"] = payload
    arr = mmsa_like()
    arr["test"]["raw_text"] = np.array(["ok", payload, "ok"], dtype=object)
    return {"top": payload, "in a split": data, "in an object array": arr}


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
@pytest.mark.parametrize("kind", ["os.system", "subprocess.Popen", "builtins.eval",
                                  "builtins.exec", "getattr chain", "builtins.__import__"])
def test_hostile_pickle_refused_before_it_runs(tmp_path, monkeypatch, kind, protocol):
    monkeypatch.syspath_prepend(str(tmp_path))
    marker, cases = payloads(tmp_path)
    payload, refused = cases[kind]
    for where, obj in _hosts(payload).items():
        path = write(tmp_path / f"evil_{where.replace(' ', '_')}.pkl", obj, protocol)
        with pytest.raises(ValueError) as err:
            load_mmsa(path)
        msg = str(err.value)
        assert msg.startswith(f"MMSA file {path}: refused global"), (where, msg)
        assert re.search(refused, msg), (where, msg)
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["os.system", "subprocess.Popen", "builtins.eval",
                                  "builtins.exec", "getattr chain", "builtins.__import__"])
def test_hostile_payloads_do_run_under_plain_pickle(tmp_path, monkeypatch, kind):
    """Control for the test above: with pickle.loads each payload creates its marker."""
    monkeypatch.syspath_prepend(str(tmp_path))
    marker, cases = payloads(tmp_path)
    assert _control(cases[kind][0], marker)


def test_handwritten_os_system_protocol0(tmp_path):
    """The classic hand-written exploit: GLOBAL 'os system', a string, REDUCE."""
    marker = tmp_path / "MARKER"
    path = tmp_path / "evil.pkl"
    path.write_bytes(b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR.")
    with pytest.raises(ValueError, match=re.escape(str(path)) + r".*'os\.system'"):
        load_mmsa(path)
    assert not marker.exists()


def test_python2_builtin_names_are_mapped_and_refused(tmp_path):
    path = tmp_path / "evil.pkl"
    path.write_bytes(b"c__builtin__\neval\n(S'1+1'\ntR.")
    with pytest.raises(ValueError, match=r"'builtins\.eval'.*written as '__builtin__\.eval'"):
        load_mmsa(path)


@pytest.mark.parametrize("blob, problem", [
    (b"cnumpy\nndarray\n((I100000\nI100000\ntS'f8'\ntR.", "ndarray called directly"),
    (b"c__builtin__\nbytes\n(I10000000000\ntR.", "bytes(n) allocates n bytes"),
    (b"c_codecs\nencode\n(Vx\nVzlib\ntR.", "a codec other than latin1"),
    (b"cnumpy.core.multiarray\n_reconstruct\n(c__builtin__\nobject\n(I0\ntS'b'\ntR.",
     "_reconstruct of a class other than ndarray (its global refused first)"),
    (b"cnumpy.core.multiarray\n_reconstruct\n(I1\n(I0\ntS'b'\ntR.",
     "_reconstruct of a non-class"),
    (b"P1\n.", "a persistent id"),
])
def test_allowed_globals_only_in_their_harmless_use(tmp_path, blob, problem):
    path = tmp_path / "odd.pkl"
    path.write_bytes(blob)
    with pytest.raises(ValueError, match=re.escape(str(path))):
        load_mmsa(path)


def test_huge_memo_index_costs_nothing(tmp_path):
    """LONG_BINPUT 2**32-1: the C unpickler would zero-fill a 32 GB memo array."""
    path = tmp_path / "memo.pkl"
    path.write_bytes(b"\x80\x04}r\xff\xff\xff\xff.")          # {} memoized at 4294967295
    start = time.perf_counter()
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*missing split"):
        load_mmsa(path)
    assert time.perf_counter() - start < 1


@pytest.mark.parametrize("target", [b"cnumpy._core.numeric\n_frombuffer\n",
                                    b"c_codecs\nencode\n", b"cnumpy\nndarray\n",
                                    b"cnumpy\ndtype\n", b"ccollections\nOrderedDict\n"])
def test_build_cannot_alter_an_allowed_global(tmp_path, target):
    """BUILD (setattr through a state's slot dict) on an allowed global is refused, and the
    allowlist is unchanged for the next file."""
    before = {k: (v, getattr(v, "__defaults__", None)) for k, v in ALLOWED.items()}
    path = tmp_path / "tamper.pkl"
    state = pickle.dumps((None, {"__defaults__": (1,)}), protocol=0)[:-1]   # (None, slots)
    path.write_bytes(target + state + b"b.")                                   # BUILD
    with pytest.raises(ValueError, match=re.escape(str(path))):
        load_mmsa(path)
    assert {k: (v, getattr(v, "__defaults__", None)) for k, v in ALLOWED.items()} == before
    assert load_mmsa(write(tmp_path / "ok.pkl", mmsa_like())).num_samples == 9


def test_allowlist_is_exactly_numpy_reconstruction_and_containers():
    names = {f"{m}.{n}" for m, n in ALLOWED}
    assert names == {
        "numpy.ndarray", "numpy.dtype", "_codecs.encode", "builtins.bytes",
        "collections.OrderedDict",
        "numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct",
        "numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar",
        "numpy.core.numeric._frombuffer", "numpy._core.numeric._frombuffer"}


# ---------------------------------------------------------------- valid files still load

@pytest.mark.parametrize("protocol", [0, 1, 2, 3, 4, 5])
def test_valid_file_loads_at_every_protocol(tmp_path, protocol):
    data = mmsa_like(aligned=protocol % 2 == 0)
    data["train"] = collections.OrderedDict(data["train"])
    d = load_mmsa(write(tmp_path / "aligned_50.pkl", data, protocol))
    assert d.num_samples == sum(SIZES.values())
    assert d.dims == {"text": DT, "audio": DA, "vision": DV}
    y = np.concatenate([data[s]["regression_labels"][:, 0] for s in ("train", "valid", "test")])
    np.testing.assert_array_equal(d.labels.numpy(), y)
    audio = data["test"]["audio"].astype(np.float32)
    audio[np.isneginf(audio)] = 0                      # MMSA's -inf marker is still legitimate
    np.testing.assert_array_equal(d.inputs["audio"][6:].numpy(), audio)


def test_python2_latin1_pickle_loads(tmp_path):
    """A Python 2 byte string with a non-ASCII byte (SHORT_BINSTRING 'U') in raw_text: the
    default ASCII decoding fails, the latin1 retry (same restriction) reads it."""
    data = mmsa_like()
    data["train"]["raw_text"] = ["PLACEHOLDER-0123"]
    blob = pickle.dumps(data, protocol=2)
    old = b"X" + struct.pack("<I", 16) + b"PLACEHOLDER-0123"
    assert blob.count(old) == 1
    path = tmp_path / "py2.pkl"
    path.write_bytes(blob.replace(old, b"U\x04caf\xe9"))
    with pytest.raises(UnicodeDecodeError):
        pickle.loads(path.read_bytes())
    assert load_mmsa(path).num_samples == 9


def test_latin1_retry_keeps_the_restriction(tmp_path):
    """A file that needs latin1 AND names a forbidden global after the non-ASCII string."""
    marker = tmp_path / "MARKER"
    path = tmp_path / "evil_py2.pkl"
    path.write_bytes(b"(U\x04caf\xe9cos\nsystem\n(S'touch " + str(marker).encode()
                     + b"'\ntRl.")
    with pytest.raises(ValueError, match=r"'os\.system'"):
        load_mmsa(path)
    assert not marker.exists()


# ---------------------------------------------------------------- broken files

def test_truncated_empty_and_garbage_files(tmp_path):
    good = pickle.dumps(mmsa_like(), protocol=4)
    cases = {f"cut{i}.pkl": good[:cut] for i, cut in
             enumerate([1, 2, 11, len(good) // 3, len(good) // 2, len(good) - 1])}
    cases.update({"empty.pkl": b"", "garbage.pkl": os.urandom(4096),
                  "text.pkl": b"regression_labels,text\n1,2\n",
                  "huge_frame.pkl": b"\x80\x04\x95" + struct.pack("<Q", 2 ** 62) + b"}.",
                  "huge_bytes.pkl": b"\x80\x04\x8e" + struct.pack("<Q", 2 ** 62) + b"x."})
    for name, blob in cases.items():
        path = tmp_path / name
        path.write_bytes(blob)
        with pytest.raises(ValueError, match=re.escape(str(path))):
            load_mmsa(path)


def _broken(kind):
    data = mmsa_like()
    t = data["train"]
    if kind == "top level list":
        return [data]
    if kind == "no splits":
        return {"text": t["text"], "audio": t["audio"]}
    if kind == "split missing regression_labels":
        del data["valid"]["regression_labels"]
    elif kind == "split missing audio":
        del data["test"]["audio"]
    elif kind == "split is a list":
        data["valid"] = list(data["valid"].values())
    elif kind == "labels NaN":
        data["test"]["regression_labels"][1] = np.nan
    elif kind == "labels +inf":
        data["train"]["regression_labels"][0] = np.inf
    elif kind == "labels -inf":
        data["valid"]["regression_labels"][0] = -np.inf
    elif kind == "labels overflow float32":
        data["valid"]["regression_labels"] = np.full((2,), 1e300)
    elif kind == "labels ragged":
        data["train"]["regression_labels"] = [[1.0], [1.0, 2.0], [], [3.0]]
    elif kind == "labels strings":
        data["train"]["regression_labels"] = np.array(["1", "2", "3", "4"])
    elif kind == "labels complex":
        data["train"]["regression_labels"] = np.ones(4, dtype=complex)
    elif kind == "vision NaN":
        data["test"]["vision"][0, 0, 0] = np.nan
    elif kind == "text +inf":
        data["train"]["text"][0, 0, 0] = np.inf
    elif kind == "N text != labels":
        t["text"] = t["text"][:3]
    elif kind == "N audio != vision":
        t["audio"] = np.concatenate([t["audio"], t["audio"]])
    elif kind == "dims differ across splits":
        data["test"]["audio"] = np.zeros((3, LA, DA + 1))
    elif kind == "lengths differ across splits":
        data["test"]["vision"] = np.zeros((3, LV + 2, DV))
    elif kind == "features object dtype":
        t["vision"] = np.empty((4, LV, DV), dtype=object)
    elif kind == "features timedelta":
        t["vision"] = np.zeros((4, LV, DV), dtype="m8[s]")
    elif kind == "lengths NaN":
        t["audio_lengths"] = np.array([1, np.nan, 2, 3])
    elif kind == "lengths huge":
        t["audio_lengths"] = np.array([1e30, 1, 2, 3])
    elif kind == "lengths object":
        t["audio_lengths"] = np.array([{}, 1, 2, 3], dtype=object)
    elif kind == "text_bert strings":
        t["text_bert"] = np.full((4, 3, LT), "x")
    return data


BROKEN = {  # kind -> what the message must name besides the file
    "top level list": "top level", "no splits": "missing split",
    "split missing regression_labels": r"'valid'.*regression_labels",
    "split missing audio": r"'test'.*audio", "split is a list": r"'valid'.*dict",
    "labels NaN": r"'test'.*regression_labels.*non-finite",
    "labels +inf": r"'train'.*regression_labels.*non-finite",
    "labels -inf": r"'valid'.*regression_labels.*non-finite",
    "labels overflow float32": r"'valid'.*regression_labels.*non-finite",
    "labels ragged": r"'train'.*regression_labels", "labels strings": r"'train'.*numeric",
    "labels complex": r"'train'.*numeric", "vision NaN": r"'test'.*'vision'.*non-finite",
    "text +inf": r"'train'.*'text'.*non-finite", "N text != labels": r"'train'.*'text'.*3",
    "N audio != vision": r"'train'.*'audio'.*8", "dims differ across splits": r"'audio'.*splits",
    "lengths differ across splits": r"'vision'.*splits",
    "features object dtype": r"'train'.*'vision'.*numeric",
    "features timedelta": r"'train'.*'vision'.*numeric",
    "lengths NaN": r"'train'.*audio_lengths", "lengths huge": r"'train'.*audio_lengths",
    "lengths object": r"'train'.*audio_lengths", "text_bert strings": r"'train'.*text_bert",
}


@pytest.mark.parametrize("kind", sorted(BROKEN))
def test_wrong_structure_values_and_shapes(tmp_path, kind):
    path = write(tmp_path / "bad.pkl", _broken(kind))
    with pytest.raises(ValueError) as err:
        load_mmsa(path)
    msg = str(err.value)
    assert msg.startswith(f"MMSA file {path}:"), msg
    assert re.search(BROKEN[kind], msg, re.S), msg


def test_audio_neg_inf_is_legitimate_but_only_in_audio(tmp_path):
    data = mmsa_like()
    assert load_mmsa(write(tmp_path / "ok.pkl", data)).inputs["audio"][0, 0, 0] == 0
    data["train"]["vision"][0, 0, 0] = -np.inf
    with pytest.raises(ValueError, match=r"'train'.*'vision'.*non-finite"):
        load_mmsa(write(tmp_path / "bad.pkl", data))


# ---------------------------------------------------------------- other files we read

def _checkpoint(**changes):
    from robustmm_fast.train.checkpoint import CHECKPOINT_FORMAT, VERSION
    identity = {"method": "mim", "config": {"lr": 0.01}, "seed": 1, "data": {"name": "x"}}
    obj = {"format": CHECKPOINT_FORMAT, "version": VERSION, "identity": identity, "epoch": 0,
           "epochs": 1, "model": {}, "optimizers": {}, "recipe": {}, "rng": [],
           "world_size": 1, "best": {}, "history": []}
    for key, value in changes.items():
        if key.startswith("identity."):
            identity[key[9:]] = value
        else:
            obj[key] = value
    return obj, dict(identity, seed=1, config={"lr": 0.01}, method="mim", data={"name": "x"})


@pytest.mark.parametrize("changes", [
    {"format": torch.tensor([1, 2])}, {"version": torch.tensor([1, 1])},
    {"version": True}, {"identity": [1, 2]}, {"identity.seed": torch.tensor([1, 2])},
    {"identity.config": [1, 2]}, {"identity.data": {1: "a", "b": 2}},
])
def test_crafted_checkpoint_values_are_clean_errors(tmp_path, changes):
    from robustmm_fast.train import load_checkpoint, save_atomic
    obj, expect = _checkpoint(**changes)
    save_atomic(tmp_path / "checkpoint.pt", obj)
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "checkpoint.pt"))):
        load_checkpoint(tmp_path / "checkpoint.pt", expect=expect)


@pytest.mark.parametrize("key, value", [("method", torch.tensor([1])), ("config", [1]),
                                        ("data", "x"), ("model", None)])
def test_crafted_best_values_are_clean_errors(tmp_path, key, value):
    from robustmm_fast.train import load_best, save_atomic
    from robustmm_fast.train.checkpoint import MODEL_FORMAT, VERSION
    obj = {"format": MODEL_FORMAT, "version": VERSION, "method": "mim", "config": {},
           "seed": 1, "data": {}, "model": {}, "best_epoch": 0, "best_valid": 0.0}
    save_atomic(tmp_path / "best.pt", dict(obj, **{key: value}))
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "best.pt")) + f".*{key}"):
        load_best(tmp_path / "best.pt")
    save_atomic(tmp_path / "ok.pt", obj)
    assert load_best(tmp_path / "ok.pt")["method"] == "mim"


def test_checkpoint_pickle_payload_is_refused_by_weights_only(tmp_path):
    """torch.load(weights_only=True) stays: a checkpoint holding a reducer runs nothing."""
    from robustmm_fast.train import load_checkpoint
    marker = tmp_path / "MARKER"
    obj, _ = _checkpoint(history=[_Reduce(os.system, f"touch {marker}")])
    torch.save(obj, tmp_path / "checkpoint.pt")
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "checkpoint.pt"))):
        load_checkpoint(tmp_path / "checkpoint.pt")
    assert not marker.exists()


def test_masks_with_deeply_nested_meta(tmp_path):
    from robustmm_fast.missing import load_masks
    path = tmp_path / "m.npz"
    np.savez(path, a=np.ones((3, 2), dtype=bool), __meta__=np.array("[" * 100_000))
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*JSON"):
        load_masks(path)


def test_config_not_utf8_or_nested_too_deeply(tmp_path):
    from robustmm_fast.config import load_config
    for name, blob in (("a.toml", b"lr = '\xff'\n"), ("b.json", b"[" * 100_000),
                       ("c.toml", b"x = " + b"[" * 100_000)):
        (tmp_path / name).write_bytes(blob)
        with pytest.raises(ValueError, match=re.escape(str(tmp_path / name))):
            load_config(str(tmp_path / name))


@pytest.mark.parametrize("rel", ["train_labels.npy", "audio/test_data.npy"])
@pytest.mark.parametrize("dtype", ["m8[s]", "complex64", "<U2"])
def test_avmnist_arrays_must_be_real_numbers(tmp_path, rel, dtype):
    """A timedelta64 .npy counts as np.number (np.round then raised a bare TypeError); complex
    lost its imaginary part silently."""
    from robustmm_fast.data import load_avmnist
    rng = np.random.default_rng(0)
    arrays = {"image/train_data.npy": rng.integers(0, 256, (3, 784)),
              "image/test_data.npy": rng.integers(0, 256, (2, 784)),
              "audio/train_data.npy": rng.integers(0, 256, (3, 4, 5)),
              "audio/test_data.npy": rng.integers(0, 256, (2, 4, 5)),
              "train_labels.npy": np.arange(3), "test_labels.npy": np.arange(2)}
    for name, a in arrays.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        np.save(tmp_path / name, a)
    assert load_avmnist(tmp_path).num_samples == 5
    np.save(tmp_path / rel, arrays[rel].astype(dtype))
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / rel)) + ".*real numeric"):
        load_avmnist(tmp_path)
