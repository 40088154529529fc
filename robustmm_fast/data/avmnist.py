"""MultiBench AV-MNIST arrays (MNIST digits paired with spoken-digit spectrograms).

Layout of `root` (as MultiBench's ``datasets/avmnist/get_data.py`` reads it):

    root/image/train_data.npy   (N_tr, 784) or (N_tr, 28, 28)   pixel values 0..255
    root/image/test_data.npy    (N_te, 784) or (N_te, 28, 28)
    root/audio/train_data.npy   (N_tr, 112, 112)                 spectrogram values 0..255
    root/audio/test_data.npy    (N_te, 112, 112)
    root/train_labels.npy       (N_tr,) digits 0..9
    root/test_labels.npy        (N_te,)

As MultiBench does: both modalities are divided by 255, and the validation split is the LAST
part of the training file (MultiBench: rows 55000..59999 of 60000, i.e. 1/12 of them). For a
training file of another size the same 1/12 is kept: n_valid = round(N_tr / 12), the last
n_valid rows (at least 1 when N_tr >= 2). The test file is the test split.

Modalities: "image" as one vector token (N, 1, 784) by default, or its 28 rows as tokens
(N, 28, 28) with ``image="rows"``; "audio" as the spectrogram's 112 rows as tokens
(N, 112, 112), in the order they are stored (no transpose).
"""
from __future__ import annotations

from pathlib import Path
from typing import Union

import numpy as np
import torch

from .dataset import MultimodalDataset

__all__ = ["load_avmnist"]

NUM_CLASSES = 10
VALID_SHARE = 1 / 12        # MultiBench: 5000 of 60000 training rows
SCALE = 255.0
FILES = {("image", "train"): "image/train_data.npy", ("image", "test"): "image/test_data.npy",
         ("audio", "train"): "audio/train_data.npy", ("audio", "test"): "audio/test_data.npy",
         ("labels", "train"): "train_labels.npy", ("labels", "test"): "test_labels.npy"}


def _fail(path, problem: str):
    raise ValueError(f"AV-MNIST file {path}: {problem}")


def _load(path: Path) -> np.ndarray:
    if not path.is_file():
        _fail(path, "no such file")
    try:
        x = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as exc:
        _fail(path, f"not a readable .npy array ({type(exc).__name__}: {exc})")
    # bools, integers, reals: timedelta64 counts as np.number (and breaks np.round), complex
    # would lose its imaginary part silently
    if not isinstance(x, np.ndarray) or x.dtype.kind not in "biuf":
        _fail(path, f"must hold a real numeric array, got dtype "
                    f"{getattr(x, 'dtype', type(x))}")
    return x


def _image(path: Path, x: np.ndarray) -> np.ndarray:
    if x.ndim == 3 and x.shape[1:] == (28, 28):
        x = x.reshape(x.shape[0], 784)
    if x.ndim != 2 or x.shape[1] != 784:
        _fail(path, f"image data must be (N, 784) or (N, 28, 28), got shape {x.shape}")
    return x


def _audio(path: Path, x: np.ndarray) -> np.ndarray:
    if x.ndim != 3:
        _fail(path, f"audio data must be (N, T, F) spectrograms (MultiBench: (N, 112, 112)), "
                    f"got shape {x.shape}")
    return x


def _labels(path: Path, y: np.ndarray) -> np.ndarray:
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        _fail(path, f"labels must be (N,), got shape {y.shape}")
    y = np.asarray(y)
    if y.size and (not np.all(np.isfinite(y)) or np.any(y != np.round(y))
                   or y.min() < 0 or y.max() >= NUM_CLASSES):
        _fail(path, f"labels must be integers in [0, {NUM_CLASSES})")
    return y.astype(np.int64)


def _scaled(parts: list[tuple[Path, np.ndarray]], shape: tuple[int, ...]) -> np.ndarray:
    """Concatenate `parts` into one float32 array divided by 255, chunk by chunk (the audio of
    the full dataset is ~3 GB as float32; no float64 temporary of that size is made)."""
    out = np.empty(shape, dtype=np.float32)
    start = 0
    for path, x in parts:
        for i in range(0, x.shape[0], 4096):
            chunk = np.asarray(x[i:i + 4096], dtype=np.float32)
            if not np.all(np.isfinite(chunk)):
                _fail(path, "has non-finite values")
            out[start + i:start + i + chunk.shape[0]] = chunk.reshape((-1,) + shape[1:]) / SCALE
        start += x.shape[0]
    return out


def load_avmnist(root: Union[str, Path], *, image: str = "vector") -> MultimodalDataset:
    """The AV-MNIST arrays under `root` as a 10-class MultimodalDataset (modalities image, audio).

    Args:
        root: the folder holding image/, audio/ and the two label files (layout above).
        image: "vector" -> image (N, 1, 784); "rows" -> image (N, 28, 28) (rows as tokens).
    Raises ValueError naming the file for a missing/unreadable file, a wrong shape, a sample
    count that disagrees with the labels, audio shapes that differ between train and test, or
    labels outside 0..9.
    """
    if image not in ("vector", "rows"):
        raise ValueError(f"load_avmnist: image must be 'vector' or 'rows', got {image!r}")
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"AV-MNIST root {root}: no such directory")
    paths = {k: root / f for k, f in FILES.items()}
    arrays = {k: _load(p) for k, p in paths.items()}
    sizes = {}
    for split in ("train", "test"):
        y = _labels(paths["labels", split], arrays["labels", split])
        arrays["labels", split] = y
        arrays["image", split] = _image(paths["image", split], arrays["image", split])
        arrays["audio", split] = _audio(paths["audio", split], arrays["audio", split])
        for m in ("image", "audio"):
            if arrays[m, split].shape[0] != y.shape[0]:
                _fail(paths[m, split], f"has {arrays[m, split].shape[0]} samples but "
                                       f"{paths['labels', split]} has {y.shape[0]} labels")
        sizes[split] = y.shape[0]
    if arrays["audio", "train"].shape[1:] != arrays["audio", "test"].shape[1:]:
        _fail(paths["audio", "test"], f"spectrogram shape {arrays['audio', 'test'].shape[1:]} "
                                      f"differs from train's {arrays['audio', 'train'].shape[1:]}")
    n_tr, n_te = sizes["train"], sizes["test"]
    n = n_tr + n_te
    img_shape = (n, 1, 784) if image == "vector" else (n, 28, 28)
    inputs = {
        "image": torch.from_numpy(_scaled([(paths["image", s], arrays["image", s])
                                           for s in ("train", "test")], img_shape)),
        "audio": torch.from_numpy(_scaled([(paths["audio", s], arrays["audio", s])
                                           for s in ("train", "test")],
                                          (n,) + arrays["audio", "train"].shape[1:])),
    }
    n_valid = int(round(n_tr * VALID_SHARE))
    if n_tr >= 2:
        n_valid = min(max(n_valid, 1), n_tr - 1)
    labels = torch.from_numpy(np.concatenate([arrays["labels", "train"],
                                              arrays["labels", "test"]]))
    splits = {"train": torch.arange(0, n_tr - n_valid), "valid": torch.arange(n_tr - n_valid, n_tr),
              "test": torch.arange(n_tr, n)}
    return MultimodalDataset(
        name="avmnist", task="classification", inputs=inputs, labels=labels, splits=splits,
        num_classes=NUM_CLASSES,
        info={"source": str(root), "format": "MultiBench AV-MNIST arrays",
              "scaling": "image / 255, audio / 255 (as MultiBench)",
              "valid": f"last {n_valid} of {n_tr} training rows (MultiBench: last 5000 of 60000)",
              "image_layout": image})
