"""Loaders of robustmm_fast.data on small files in each real format, on corrupt ones, on the
packaged Handwritten copy, and the synthetic generator."""
from __future__ import annotations

import math
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from robustmm_fast.data import (MultimodalDataset, load_avmnist, load_handwritten, load_mmsa,
                                make_synthetic)
from robustmm_fast.data.handwritten import raw_handwritten

UCI_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "uci-mfeat"
HW_VIEWS = ("fac", "fou", "kar", "mor", "pix", "zer")
HW_DIMS = {"fac": 216, "fou": 76, "kar": 64, "mor": 6, "pix": 240, "zer": 47}  # UCI description


# ====================================================================== Handwritten

@pytest.fixture(scope="module")
def hw():
    return load_handwritten()


def test_handwritten_views_shapes_labels(hw):
    assert hw.modalities == list(HW_VIEWS)
    assert hw.task == "classification" and hw.num_classes == 10
    for v in HW_VIEWS:
        assert hw.inputs[v].shape == (2000, 1, HW_DIMS[v]) and hw.inputs[v].dtype == torch.float32
    assert hw.labels.dtype == torch.int64
    assert hw.labels.bincount().tolist() == [200] * 10
    assert "C5HC70" in hw.info["attribution"] and "CC BY 4.0" in hw.info["attribution"]
    assert hw.info["scaling_fitted_on"] == "train"


def test_handwritten_split_sizes_stratified_disjoint(hw):
    sp = hw.splits
    # per class: test round(0.2*200)=40, valid round(0.1*160)=16, train 144
    assert {s: i.numel() for s, i in sp.items()} == {"train": 1440, "valid": 160, "test": 400}
    for s, per_class in (("train", 144), ("valid", 16), ("test", 40)):
        assert hw.labels[sp[s]].bincount(minlength=10).tolist() == [per_class] * 10
    allrows = torch.cat(list(sp.values()))
    assert allrows.unique().numel() == 2000


def test_handwritten_seed_controls_split():
    a, b, c = load_handwritten(seed=1111), load_handwritten(seed=1111), load_handwritten(seed=1112)
    for s in ("train", "valid", "test"):
        assert torch.equal(a.splits[s], b.splits[s])
    assert not torch.equal(a.splits["test"], c.splits["test"])
    for v in HW_VIEWS:
        assert torch.equal(a.inputs[v], b.inputs[v])


def test_handwritten_valid_fraction():
    d = load_handwritten(valid_fraction=0.25)   # per class: 40 test, round(0.25*160)=40 valid
    assert {s: i.numel() for s, i in d.splits.items()} == {"train": 1200, "valid": 400, "test": 400}
    d0 = load_handwritten(valid_fraction=0.0)
    assert {s: i.numel() for s, i in d0.splits.items()} == {"train": 1600, "valid": 0, "test": 400}


def test_handwritten_scaling_fitted_on_train_only(hw):
    from sklearn.preprocessing import MinMaxScaler, StandardScaler
    raw, _ = raw_handwritten()
    tr = hw.splits["train"].numpy()
    mm = load_handwritten(scale="minmax")
    for v in HW_VIEWS:
        x = raw[v].astype(np.float64)
        want = StandardScaler().fit(x[tr]).transform(x)
        np.testing.assert_allclose(hw.inputs[v][:, 0].numpy(), want, rtol=1e-5, atol=1e-5)
        want_mm = MinMaxScaler().fit(x[tr]).transform(x)
        np.testing.assert_allclose(mm.inputs[v][:, 0].numpy(), want_mm, rtol=1e-5, atol=1e-5)
    # on the train rows: mean 0 and std 1 (0 for a feature constant on train); elsewhere not
    x = torch.cat([hw.inputs[v][:, 0] for v in HW_VIEWS], 1).double()   # (2000, 649)
    xt = x[hw.splits["train"]]
    const = torch.from_numpy(np.concatenate([raw[v][tr].std(0) == 0 for v in HW_VIEWS]))
    assert xt.mean(0).abs().max() < 1e-5
    std = xt.std(0, unbiased=False)
    assert torch.allclose(std[~const], torch.ones_like(std[~const]), atol=1e-5)
    assert torch.all(std[const] == 0)
    assert x[hw.splits["test"]].mean(0).abs().max() > 1e-2
    assert torch.isfinite(x).all()


def test_fit_scaling_constant_feature_is_safe():
    from robustmm_fast.data.handwritten import fit_scaling
    x = np.array([[1.0, 5.0], [3.0, 5.0], [8.0, 5.0]])      # column 1 constant
    shift, div = fit_scaling(x, "standard")
    np.testing.assert_allclose(shift, [4.0, 5.0])
    sd = math.sqrt(((1 - 4) ** 2 + (3 - 4) ** 2 + (8 - 4) ** 2) / 3)     # population std
    np.testing.assert_allclose(div, [sd, 1.0])
    shift, div = fit_scaling(x, "minmax")
    np.testing.assert_allclose(shift, [1.0, 5.0])
    np.testing.assert_allclose(div, [7.0, 1.0])
    shift, div = fit_scaling(x, None)
    assert np.all(shift == 0) and np.all(div == 1)


def test_info_is_json_serialisable(hw, tmp_path):
    import json
    json.dumps(hw.info)
    json.dumps(make_synthetic(num_samples=10).info)
    json.dumps(load_mmsa(write_pkl(tmp_path / "a.pkl", mmsa_dict(aligned=False))).info)
    write_avmnist(tmp_path / "av", n_tr=3, n_te=1, audio_shape=(2, 2))
    json.dumps(load_avmnist(tmp_path / "av").info)


def test_handwritten_raw_values_and_bad_args():
    raw, labels = raw_handwritten()
    d = load_handwritten(scale=None)
    for v in HW_VIEWS:
        assert torch.equal(d.inputs[v][:, 0], torch.from_numpy(raw[v].astype(np.float32)))
    assert np.array_equal(labels, np.repeat(np.arange(10), 200))   # rows in class order
    with pytest.raises(ValueError, match="scale"):
        load_handwritten(scale="zscore")
    with pytest.raises(ValueError, match="valid_fraction"):
        load_handwritten(valid_fraction=1.0)
    with pytest.raises(TypeError, match="seed"):
        load_handwritten(seed="1")


@pytest.mark.skipif(not UCI_DIR.is_dir(), reason=f"{UCI_DIR} (the source CSVs) absent")
def test_handwritten_packaged_copy_equals_csvs():
    raw, labels = raw_handwritten()
    for v in HW_VIEWS:
        csv = np.loadtxt(UCI_DIR / f"mfeat-{v}.csv", delimiter=",", skiprows=1)   # float64
        assert np.array_equal(labels, csv[:, -1].astype(np.uint8))
        got = raw[v]
        if got.dtype.kind == "u":                     # integer views: exact
            assert np.array_equal(got.astype(np.float64), csv[:, :-1])
        else:                                         # float32: the CSV decimal comes back
            assert got.dtype == np.float32
            assert np.array_equal(got, csv[:, :-1].astype(np.float32))
            shortest = np.array([float(np.format_float_positional(t, unique=True))
                                 for t in got.ravel()])
            assert np.array_equal(shortest, csv[:, :-1].ravel())


def test_handwritten_batches(hw):
    batches = list(hw.batches("test", 128))
    assert [len(b) for b in batches] == [128, 128, 128, 16]
    assert batches[0].inputs["pix"].shape == (128, 1, 240) and batches[0].present.all()


# ====================================================================== MMSA

SIZES = {"train": 4, "valid": 2, "test": 3}
LT, DT, LA, DA, LV, DV = 6, 5, 7, 3, 4, 2
TEXT_LENS = {"train": [6, 3, 1, 4], "valid": [2, 6], "test": [5, 5, 3]}
AUDIO_LENS = {"train": [7, 1, 4, 0], "valid": [3, 7], "test": [2, 5, 6]}
VISION_LENS = {"train": [4, 4, 2, 1], "valid": [1, 3], "test": [4, 2, 3]}


def mmsa_dict(aligned: bool, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    out = {}
    for s, n in SIZES.items():
        ids = rng.integers(100, 30000, (n, LT)).astype(np.float64)
        mask = (np.arange(LT) < np.array(TEXT_LENS[s])[:, None]).astype(np.float64)
        audio = rng.normal(size=(n, LA, DA))
        audio[0, 1, 2] = -np.inf                       # COVAREP's failed frames
        d = {"raw_text": [f"utterance {i}" for i in range(n)],
             "id": [f"v{i}$_${i}" for i in range(n)],
             "text": rng.normal(size=(n, LT, DT)).astype(np.float32),
             "text_bert": np.stack([ids * mask, mask, np.zeros_like(mask)], 1),   # (n, 3, L)
             "audio": audio, "vision": rng.normal(size=(n, LV, DV)).astype(np.float32),
             "regression_labels": rng.uniform(-3, 3, n).astype(np.float32),
             "classification_labels": rng.integers(0, 2, n), "annotations": ["Neutral"] * n}
        if not aligned:
            d["audio_lengths"] = list(AUDIO_LENS[s])
            d["vision_lengths"] = np.array(VISION_LENS[s])
        out[s] = d
    return out


def write_pkl(path: Path, obj, protocol=4) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    return path


def test_mmsa_aligned(tmp_path):
    data = mmsa_dict(aligned=True)
    path = write_pkl(tmp_path / "MOSI" / "Processed" / "aligned_50.pkl", data)
    d = load_mmsa(path)
    assert isinstance(d, MultimodalDataset) and d.name == "mosi" and d.task == "regression"
    assert d.modalities == ["text", "audio", "vision"]
    assert d.dims == {"text": DT, "audio": DA, "vision": DV}
    assert d.seq_lens == {"text": LT, "audio": LA, "vision": LV}
    assert {s: i.tolist() for s, i in d.splits.items()} == {
        "train": [0, 1, 2, 3], "valid": [4, 5], "test": [6, 7, 8]}
    assert set(d.lengths) == {"text"}     # aligned: no audio/vision lengths in the file
    assert d.lengths["text"].tolist() == TEXT_LENS["train"] + TEXT_LENS["valid"] + TEXT_LENS["test"]
    order = ("train", "valid", "test")
    assert torch.equal(d.labels, torch.from_numpy(
        np.concatenate([data[s]["regression_labels"] for s in order])))
    audio = np.concatenate([data[s]["audio"] for s in order]).astype(np.float32)
    assert np.isneginf(audio).sum() == 3
    audio[np.isneginf(audio)] = 0
    assert torch.equal(d.inputs["audio"], torch.from_numpy(audio))
    assert torch.equal(d.inputs["text"], torch.from_numpy(
        np.concatenate([data[s]["text"] for s in order])))
    b = d.batch(torch.tensor([0, 2]))
    assert b.padding["text"].tolist() == [[False] * 6, [False] + [True] * 5]


def test_mmsa_unaligned_lengths_and_name(tmp_path):
    path = write_pkl(tmp_path / "unaligned_50.pkl", mmsa_dict(aligned=False))
    d = load_mmsa(path, name="custom")
    assert d.name == "custom"
    order = ("train", "valid", "test")
    assert d.lengths["audio"].tolist() == sum((AUDIO_LENS[s] for s in order), [])
    assert d.lengths["vision"].tolist() == sum((VISION_LENS[s] for s in order), [])
    assert load_mmsa(path).name == "mmsa"


def _latin1_pickle(data: dict) -> bytes:
    """A protocol-2 pickle whose raw_text holds a Python 2 byte string (SHORT_BINSTRING 'U')
    with a non-ASCII byte: Python 3's default encoding='ASCII' cannot read it, latin1 can."""
    marker = "PLACEHOLDER-0123456789"
    data["train"]["raw_text"][0] = marker
    blob = pickle.dumps(data, protocol=2)
    enc = marker.encode()
    old = b"X" + struct.pack("<I", len(enc)) + enc           # BINUNICODE
    assert blob.count(old) == 1
    py2 = b"caf\xe9"
    return blob.replace(old, b"U" + bytes([len(py2)]) + py2)


def test_mmsa_python2_pickle_needs_latin1(tmp_path):
    path = tmp_path / "aligned_50.pkl"
    path.write_bytes(_latin1_pickle(mmsa_dict(aligned=True)))
    with pytest.raises(UnicodeDecodeError):
        pickle.loads(path.read_bytes())
    d = load_mmsa(path)
    assert d.num_samples == 9


def test_mmsa_text_bert_refused(tmp_path):
    path = write_pkl(tmp_path / "aligned_50.pkl", mmsa_dict(aligned=True))
    with pytest.raises(ValueError, match="BERT"):
        load_mmsa(path, text="text_bert")


def test_mmsa_nonfinite(tmp_path):
    data = mmsa_dict(aligned=True)
    data["valid"]["vision"][1, 2, 0] = np.nan
    path = write_pkl(tmp_path / "nan.pkl", data)
    with pytest.raises(ValueError, match=r"(?s)nan\.pkl.*'valid'.*'vision'.*non-finite"):
        load_mmsa(path)
    d = load_mmsa(path, nonfinite="zero")
    assert d.inputs["vision"][4 + 1, 2, 0] == 0     # valid row 1 = dataset row 4 + 1
    assert d.info["nonfinite_zeroed"] == {"valid/vision": 1}
    data = mmsa_dict(aligned=True)
    data["test"]["audio"][0, 0, 0] = 1e300        # finite in float64, +inf in float32
    with pytest.raises(ValueError, match=r"(?s)'test'.*'audio'.*non-finite"):
        load_mmsa(write_pkl(tmp_path / "big.pkl", data))
    data = mmsa_dict(aligned=True)
    data["train"]["audio"][0, 0, 0] = np.inf      # only -inf is MMSA's marker
    with pytest.raises(ValueError, match="non-finite"):
        load_mmsa(write_pkl(tmp_path / "posinf.pkl", data))


def _corrupt(kind):
    data = mmsa_dict(aligned=False)
    if kind == "missing split":
        del data["valid"]
    elif kind == "missing key":
        del data["test"]["vision"]
    elif kind == "wrong ndim":
        data["train"]["audio"] = data["train"]["audio"][:, :, 0]
    elif kind == "mismatched N":
        data["valid"]["text"] = data["valid"]["text"][:1]
    elif kind == "lengths too long":
        data["train"]["audio_lengths"][0] = LA + 1
    elif kind == "lengths wrong shape":
        data["test"]["vision_lengths"] = np.array([1, 2])
    elif kind == "text_bert shape":
        data["train"]["text_bert"] = data["train"]["text_bert"][:, :2]
    elif kind == "labels nan":
        data["test"]["regression_labels"][0] = np.nan
    elif kind == "labels 2-D":
        data["test"]["regression_labels"] = np.zeros((3, 2))
    elif kind == "dims differ across splits":
        data["test"]["vision"] = np.zeros((3, LV, DV + 1))
    elif kind == "lengths in one split only":
        del data["valid"]["audio_lengths"]
    elif kind == "split not a dict":
        data["train"] = [1, 2]
    elif kind == "top level list":
        data = [data]
    elif kind == "strings as features":
        data["train"]["vision"] = np.full((4, LV, DV), "x")
    return data


@pytest.mark.parametrize("kind", [
    "missing split", "missing key", "wrong ndim", "mismatched N", "lengths too long",
    "lengths wrong shape", "text_bert shape", "labels nan", "labels 2-D",
    "dims differ across splits", "lengths in one split only", "split not a dict",
    "top level list", "strings as features"])
def test_mmsa_corrupt_content(tmp_path, kind):
    path = write_pkl(tmp_path / "bad.pkl", _corrupt(kind))
    with pytest.raises(ValueError) as err:
        load_mmsa(path)
    assert str(path) in str(err.value)


def test_mmsa_corrupt_files(tmp_path):
    good = pickle.dumps(mmsa_dict(aligned=True), protocol=4)
    cases = {"missing.pkl": None, "truncated.pkl": good[: len(good) // 2],
             "garbage.pkl": b"this is not a pickle at all", "empty.pkl": b""}
    for name, blob in cases.items():
        path = tmp_path / name
        if blob is not None:
            path.write_bytes(blob)
        with pytest.raises(ValueError) as err:
            load_mmsa(path)
        assert str(path) in str(err.value), name


# ====================================================================== AV-MNIST

def write_avmnist(root: Path, n_tr=24, n_te=6, seed=0, audio_shape=(112, 112)):
    rng = np.random.default_rng(seed)
    (root / "image").mkdir(parents=True, exist_ok=True)
    (root / "audio").mkdir(parents=True, exist_ok=True)
    arrays = {
        "image/train_data.npy": rng.integers(0, 256, (n_tr, 784)).astype(np.float32),
        "image/test_data.npy": rng.integers(0, 256, (n_te, 28, 28)).astype(np.float64),
        "audio/train_data.npy": rng.integers(0, 256, (n_tr,) + audio_shape).astype(np.float32),
        "audio/test_data.npy": rng.integers(0, 256, (n_te,) + audio_shape).astype(np.uint8),
        "train_labels.npy": rng.integers(0, 10, n_tr),
        "test_labels.npy": rng.integers(0, 10, n_te),
    }
    for rel, a in arrays.items():
        np.save(root / rel, a)
    return arrays


def test_avmnist_layout_scaling_splits(tmp_path):
    arr = write_avmnist(tmp_path / "avmnist")
    d = load_avmnist(tmp_path / "avmnist")
    assert d.task == "classification" and d.num_classes == 10 and d.modalities == ["image", "audio"]
    assert d.inputs["image"].shape == (30, 1, 784) and d.inputs["audio"].shape == (30, 112, 112)
    img = np.concatenate([arr["image/train_data.npy"], arr["image/test_data.npy"].reshape(6, 784)])
    np.testing.assert_allclose(d.inputs["image"][:, 0].numpy(), img / 255.0, rtol=1e-6)
    aud = np.concatenate([arr["audio/train_data.npy"], arr["audio/test_data.npy"]])
    np.testing.assert_allclose(d.inputs["audio"].numpy(), aud / 255.0, rtol=1e-6)
    assert d.labels.tolist() == arr["train_labels.npy"].tolist() + arr["test_labels.npy"].tolist()
    # MultiBench: validation = the last 1/12 of the training file (5000 of 60000); 24 -> 2
    assert d.splits["train"].tolist() == list(range(22))
    assert d.splits["valid"].tolist() == [22, 23]
    assert d.splits["test"].tolist() == list(range(24, 30))
    rows = load_avmnist(tmp_path / "avmnist", image="rows")
    assert rows.inputs["image"].shape == (30, 28, 28)
    np.testing.assert_allclose(rows.inputs["image"][0, 1].numpy(),
                               arr["image/train_data.npy"][0, 28:56] / 255.0, rtol=1e-6)


def test_avmnist_valid_share(tmp_path):
    write_avmnist(tmp_path / "a", n_tr=120, n_te=2, audio_shape=(4, 3))
    d = load_avmnist(tmp_path / "a")
    assert d.split_size("valid") == 10 and d.split_size("train") == 110
    assert d.inputs["audio"].shape == (122, 4, 3)


@pytest.mark.parametrize("kind", ["missing audio test", "label count", "image shape", "audio ndim",
                                  "label range", "not npy", "truncated npy", "audio test shape",
                                  "object array"])
def test_avmnist_corrupt(tmp_path, kind):
    root = tmp_path / "avmnist"
    write_avmnist(root, n_tr=12, n_te=3, audio_shape=(8, 8))
    target = {"missing audio test": "audio/test_data.npy", "label count": "train_labels.npy",
              "image shape": "image/train_data.npy", "audio ndim": "audio/train_data.npy",
              "label range": "test_labels.npy", "not npy": "image/test_data.npy",
              "truncated npy": "audio/train_data.npy", "audio test shape": "audio/test_data.npy",
              "object array": "train_labels.npy"}[kind]
    path = root / target
    if kind == "missing audio test":
        path.unlink()
    elif kind == "label count":
        np.save(path, np.zeros(11, dtype=np.int64))
    elif kind == "image shape":
        np.save(path, np.zeros((12, 100), dtype=np.float32))
    elif kind == "audio ndim":
        np.save(path, np.zeros((12, 64), dtype=np.float32))
    elif kind == "label range":
        np.save(path, np.array([0, 10, 3]))
    elif kind == "not npy":
        path.write_text("hello")
    elif kind == "truncated npy":
        path.write_bytes(path.read_bytes()[:200])
    elif kind == "audio test shape":
        np.save(path, np.zeros((3, 8, 7), dtype=np.float32))
    elif kind == "object array":
        np.save(path, np.array([1, "a"] * 6, dtype=object), allow_pickle=True)
    with pytest.raises(ValueError) as err:
        load_avmnist(root)
    assert str(path) in str(err.value)


def test_avmnist_missing_root(tmp_path):
    with pytest.raises(ValueError, match="no such directory"):
        load_avmnist(tmp_path / "nowhere")


# ====================================================================== synthetic

def test_synthetic_presets_shapes():
    mosi = make_synthetic("mosi", num_samples=6, seed=1)
    assert mosi.modalities == ["text", "audio", "vision"]
    assert {m: tuple(x.shape) for m, x in mosi.inputs.items()} == {
        "text": (6, 50, 768), "audio": (6, 50, 5), "vision": (6, 50, 20)}
    mosei = make_synthetic("mosei", num_samples=4)
    assert {m: tuple(x.shape[1:]) for m, x in mosei.inputs.items()} == {
        "text": (50, 768), "audio": (50, 74), "vision": (50, 35)}
    assert mosei.task == "regression" and mosei.labels.dtype == torch.float32
    assert mosi.lengths == {}


def test_synthetic_split_proportions():
    # MOSI 1284:229:686 of 2199 -> valid round(100*229/2199)=10, test round(100*686/2199)=31
    d = make_synthetic("mosi", num_samples=100, modalities={"t": (1, 2)})
    assert {s: i.numel() for s, i in d.splits.items()} == {"train": 59, "valid": 10, "test": 31}
    d = make_synthetic(num_samples=50)   # 70/10/20
    assert {s: i.numel() for s, i in d.splits.items()} == {"train": 35, "valid": 5, "test": 10}


def test_synthetic_deterministic():
    kw = dict(num_samples=40, modalities={"a": (3, 4), "b": (2, 5)}, random_lengths=True)
    a, b = make_synthetic(seed=7, **kw), make_synthetic(seed=7, **kw)
    c = make_synthetic(seed=8, **kw)
    for m in ("a", "b"):
        assert torch.equal(a.inputs[m], b.inputs[m]) and torch.equal(a.lengths[m], b.lengths[m])
    assert torch.equal(a.labels, b.labels) and torch.equal(a.splits["test"], b.splits["test"])
    assert not torch.equal(a.inputs["a"], c.inputs["a"])


def test_synthetic_labels_range_and_classes():
    r = make_synthetic(num_samples=500)
    assert r.labels.abs().max() < 3 and r.labels.std() > 0.5
    c = make_synthetic(num_samples=4000, task="classification", num_classes=4)
    counts = c.labels.bincount(minlength=4)
    assert c.num_classes == 4 and counts.numel() == 4
    assert torch.all((counts - 1000).abs() < 150)    # balanced: binomial sd ~27


def test_synthetic_random_lengths_pad_with_zeros():
    d = make_synthetic(num_samples=30, modalities={"a": (8, 3)}, random_lengths=True, seed=3)
    ln = d.lengths["a"]
    assert ln.min() >= 2 and ln.max() <= 8 and ln.unique().numel() > 1     # max(1, 8 // 4) = 2
    pad = torch.arange(8) >= ln[:, None]                                    # (N, L)
    assert torch.all(d.inputs["a"][pad] == 0) and torch.all(d.inputs["a"][~pad] != 0)


def _probe_corr(d: MultimodalDataset, mods) -> float:
    """Least-squares linear probe (with bias) on the train split, correlation on test."""
    def feats(idx):
        x = torch.cat([d.inputs[m][idx].flatten(1) for m in mods], 1).double()
        return torch.cat([x, torch.ones(x.shape[0], 1, dtype=torch.float64)], 1)
    tr, te = d.splits["train"], d.splits["test"]
    w = torch.linalg.lstsq(feats(tr), d.labels[tr].double()[:, None]).solution
    pred = (feats(te) @ w)[:, 0]
    return float(torch.corrcoef(torch.stack([pred, d.labels[te].double()]))[0, 1])


def test_synthetic_information_is_controllable():
    kw = dict(num_samples=600, modalities={"a": (1, 8), "b": (1, 8)}, seed=0)
    # label from the shared factor only, no noise: any single modality determines z linearly;
    # the label 3 tanh(z/2) is a monotone function of it, so a linear probe correlates ~0.98
    clean = make_synthetic(shared=1.0, specific=0.0, noise=0.0, **kw)
    assert _probe_corr(clean, ["a"]) > 0.95 and _probe_corr(clean, ["b"]) > 0.95
    noisy = make_synthetic(shared=1.0, specific=0.0, noise=10.0, **kw)
    assert _probe_corr(noisy, ["a"]) < 0.5
    # label from specific factors only: one modality sees half of the variance of z
    # (corr ~ 1/sqrt(2)), both together all of it
    split = make_synthetic(shared=0.0, specific=1.0, noise=0.0, **kw)
    assert 0.5 < _probe_corr(split, ["a"]) < 0.85
    assert _probe_corr(split, ["a", "b"]) > 0.95
    # per-modality noise: a clean, b drowned
    mixed = make_synthetic(shared=1.0, specific=0.0, noise={"a": 0.0, "b": 10.0}, **kw)
    assert _probe_corr(mixed, ["a"]) > 0.95 > 0.5 > _probe_corr(mixed, ["b"])


@pytest.mark.parametrize("kwargs, match", [
    (dict(preset="iemocap"), "preset"),
    (dict(noise=-1.0), "noise"),
    (dict(noise={"a": 0.1}), "noise"),
    (dict(shared=0.0, specific=0.0), "no information"),
    (dict(task="ranking"), "task"),
    (dict(num_samples=0), "num_samples"),
    (dict(task="classification", num_classes=1), "num_classes"),
    (dict(modalities={"a": (0, 3)}), "modalities"),
])
def test_synthetic_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_synthetic(**kwargs)
