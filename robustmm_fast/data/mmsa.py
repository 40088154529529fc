"""MMSA feature pickles (CMU-MOSI, CMU-MOSEI, CH-SIMS): ``aligned_50.pkl`` / ``unaligned_50.pkl``.

Layout (as MMSA's ``data_loader.py`` reads it): a dict with splits "train", "valid", "test",
each a dict of per-sample arrays with a common first dimension N_split:

    text               (N, L_t, D_t)  text features (e.g. BERT hidden states, D_t = 768)
    text_bert          (N, 3, L_t)    BERT input ids / attention mask / segment ids (optional)
    audio              (N, L_a, D_a)  acoustic features (-inf marks failed frames)
    vision             (N, L_v, D_v)  visual features
    audio_lengths      (N,)           valid audio frames (unaligned files only)
    vision_lengths     (N,)           valid vision frames (unaligned files only)
    regression_labels  (N,) or (N, 1) sentiment in [-3, 3] (SIMS: [-1, 1])
    id, raw_text, ...                 ignored

What this loader does, and why:
- features are cast to float32 and audio's -inf set to 0, exactly as MMSA does; any value still
  non-finite afterwards (NaN, +inf, or a float64 value that overflows float32) is an error
  naming the file, split and key -- or, with ``nonfinite="zero"``, replaced by 0 and counted
  in ``info["nonfinite_zeroed"]``.
- lengths: text from the attention-mask row of ``text_bert`` (last non-zero position + 1, so a
  real token is never marked as padding), audio/vision from ``*_lengths``. A modality without
  length information gets none (all positions valid): aligned files pad audio and vision along
  with the words, which the features themselves carry. Padding is at the end (t >= length),
  the convention MMSA's models use when they slice ``x[:, :lengths.max()]``.
- the three splits are concatenated in train, valid, test order; ``splits`` holds their rows.
- ``text_bert`` holds token ids, not features: using it needs a BERT encoder, which this
  package does not ship, so ``text="text_bert"`` is refused.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from . import safe_pickle
from .dataset import SPLITS, MultimodalDataset

__all__ = ["load_mmsa"]

FEATURE_KEYS = {"text": "text", "audio": "audio", "vision": "vision"}   # modality -> key
LENGTH_KEYS = {"audio": "audio_lengths", "vision": "vision_lengths"}
LABEL_KEY = "regression_labels"
KNOWN_NAMES = ("mosei", "mosi", "sims")


def _fail(path, problem: str):
    raise ValueError(f"MMSA file {path}: {problem}")


def _real_array(path, split, key, value) -> np.ndarray:
    """`value` as a numpy array of bools, integers or reals (not complex, datetime, strings or
    objects), or a ValueError naming the file, split and key."""
    try:
        x = np.asarray(value)
    except Exception as exc:  # ragged lists and the like
        _fail(path, f"split {split!r} key {key!r} is not an array ({type(exc).__name__}: {exc})")
    if x.dtype.kind not in "biuf":
        _fail(path, f"split {split!r} key {key!r} must be numeric, got dtype {x.dtype}")
    return x


def _features(path, split, key, value, n, nonfinite, zeroed) -> np.ndarray:
    """(N, L, D) float32, MMSA's -inf -> 0 for audio, then the non-finite check."""
    x = _real_array(path, split, key, value)
    if x.ndim != 3:
        _fail(path, f"split {split!r} key {key!r} must be (N, L, D), got shape {x.shape}")
    if x.shape[0] != n:
        _fail(path, f"split {split!r} key {key!r} has {x.shape[0]} samples but "
                    f"{LABEL_KEY!r} has {n}")
    with np.errstate(over="ignore", invalid="ignore"):
        x = x.astype(np.float32)                     # as MMSA: float64 overflow becomes inf
    if key == "audio":
        x[x == -np.inf] = 0
    bad = ~np.isfinite(x)
    if bad.any():
        if nonfinite == "error":
            first = tuple(int(i) for i in np.argwhere(bad)[0])
            _fail(path, f"split {split!r} key {key!r} has {int(bad.sum())} non-finite values "
                        f"after float32 cast (first at {first}: {x[first]}); pass "
                        "nonfinite='zero' to replace them by 0")
        x[bad] = 0
        zeroed[f"{split}/{key}"] = int(bad.sum())
    return x


def _lengths(path, split, key, value, n, max_len) -> np.ndarray:
    ln = _real_array(path, split, key, value)
    if ln.ndim == 2 and ln.shape[1] == 1:
        ln = ln[:, 0]
    if ln.shape != (n,):
        _fail(path, f"split {split!r} key {key!r} must be ({n},), got shape {ln.shape}")
    if not np.all(np.isfinite(ln)) or np.any(ln != np.round(ln)):
        _fail(path, f"split {split!r} key {key!r} must hold integer lengths")
    if n and (ln.min() < 0 or ln.max() > max_len):  # before the cast: 1e30 must not wrap
        _fail(path, f"split {split!r} key {key!r} has lengths in [{ln.min()}, {ln.max()}] "
                    f"outside [0, {max_len}] (the sequence length of its features)")
    return ln.astype(np.int64)


def _text_lengths(path, split, value, n, max_len) -> np.ndarray:
    """Last non-zero attention-mask position + 1, per sample."""
    tb = _real_array(path, split, "text_bert", value)
    if tb.ndim != 3 or tb.shape[0] != n or tb.shape[1] != 3 or tb.shape[2] != max_len:
        _fail(path, f"split {split!r} key 'text_bert' must be (N={n}, 3, L_t={max_len}) "
                    f"(ids, mask, segments), got shape {tb.shape}")
    mask = tb[:, 1, :] != 0                                              # (N, L_t)
    return np.where(mask.any(1), max_len - np.argmax(mask[:, ::-1], axis=1), 0).astype(np.int64)


def _read_split(path, split, d, nonfinite, zeroed):
    if not isinstance(d, dict):
        _fail(path, f"split {split!r} must be a dict of arrays, got {type(d).__name__}")
    missing = [k for k in (*FEATURE_KEYS.values(), LABEL_KEY) if k not in d]
    if missing:
        _fail(path, f"split {split!r} lacks key(s) {missing}; it has {sorted(map(str, d))}")
    y = _real_array(path, split, LABEL_KEY, d[LABEL_KEY])
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        _fail(path, f"split {split!r} key {LABEL_KEY!r} must be numeric (N,), got "
                    f"{y.dtype} {y.shape}")
    with np.errstate(over="ignore", invalid="ignore"):
        y = y.astype(np.float32)                     # float64 overflow becomes inf: refused
    if not np.all(np.isfinite(y)):
        _fail(path, f"split {split!r} key {LABEL_KEY!r} has {int((~np.isfinite(y)).sum())} "
                    "non-finite labels (after float32 cast); labels must be finite")
    n = y.shape[0]
    feats = {m: _features(path, split, k, d[k], n, nonfinite, zeroed)
             for m, k in FEATURE_KEYS.items()}
    lengths = {}
    if "text_bert" in d:
        lengths["text"] = _text_lengths(path, split, d["text_bert"], n, feats["text"].shape[1])
    for m, k in LENGTH_KEYS.items():
        if k in d:
            lengths[m] = _lengths(path, split, k, d[k], n, feats[m].shape[1])
    return feats, lengths, y


def _infer_name(path: Path) -> str:
    for part in reversed([p.lower() for p in path.parts]):
        for name in KNOWN_NAMES:
            if name in part:
                return name
    return "mmsa"


def load_mmsa(path: Union[str, Path], *, text: str = "text", name: Optional[str] = None,
              nonfinite: str = "error") -> MultimodalDataset:
    """An MMSA pickle as a regression MultimodalDataset (modalities text, audio, vision).

    Args:
        path: the ``.pkl`` file (aligned or unaligned).
        text: which key is the text modality; only "text" (features) is supported --
            "text_bert" holds BERT token ids that need a BERT encoder.
        name: dataset name; default: "mosi", "mosei" or "sims" if the path names one, else "mmsa".
        nonfinite: "error" (default) or "zero" for values still non-finite after MMSA's
            audio -inf -> 0.
    Raises ValueError naming the file and the problem for any malformed content.
    """
    if text == "text_bert":
        raise ValueError("load_mmsa: text='text_bert' are BERT input ids/mask/segments "
                         "(N, 3, L), not features; they need a BERT encoder, which robustmm_fast "
                         "does not ship. Use text='text' (the pickle's precomputed features).")
    if text != "text":
        raise ValueError(f"load_mmsa: text must be 'text', got {text!r}")
    if nonfinite not in ("error", "zero"):
        raise ValueError(f"load_mmsa: nonfinite must be 'error' or 'zero', got {nonfinite!r}")
    path = Path(path)
    if not path.is_file():
        _fail(path, "no such file")
    data = safe_pickle.load_file(path, "MMSA file")   # no code from the file runs
    if not isinstance(data, dict):
        _fail(path, f"top level must be a dict of splits {SPLITS}, got {type(data).__name__}")
    missing = [s for s in SPLITS if s not in data]
    if missing:
        _fail(path, f"missing split(s) {missing}; it has {sorted(map(str, data))}")
    zeroed: dict[str, int] = {}
    parts = {s: _read_split(path, s, data[s], nonfinite, zeroed) for s in SPLITS}
    for m in FEATURE_KEYS:
        shapes = {s: parts[s][0][m].shape[1:] for s in SPLITS}
        if len(set(shapes.values())) != 1:
            _fail(path, f"key {FEATURE_KEYS[m]!r} has different (L, D) across splits: {shapes}")
    for m in sorted({m for s in SPLITS for m in parts[s][1]}):
        has = [s for s in SPLITS if m in parts[s][1]]
        if len(has) != len(SPLITS):
            _fail(path, f"length information for {m!r} present in split(s) {has} only")
    sizes = [parts[s][2].shape[0] for s in SPLITS]
    offsets = np.cumsum([0] + sizes)
    inputs = {m: torch.from_numpy(np.concatenate([parts[s][0][m] for s in SPLITS]))
              for m in FEATURE_KEYS}                                     # (N, L_m, D_m)
    lengths = {m: torch.from_numpy(np.concatenate([parts[s][1][m] for s in SPLITS]))
               for m in parts["train"][1]}
    labels = torch.from_numpy(np.concatenate([parts[s][2] for s in SPLITS]))
    splits = {s: torch.arange(int(offsets[i]), int(offsets[i + 1]), dtype=torch.int64)
              for i, s in enumerate(SPLITS)}
    return MultimodalDataset(
        name=name or _infer_name(path), task="regression", inputs=inputs, labels=labels,
        splits=splits, lengths=lengths, num_classes=0,
        info={"source": str(path), "format": "MMSA pickle",
              "split_sizes": dict(zip(SPLITS, sizes)),
              "lengths_from": {m: ("text_bert attention mask" if m == "text" else LENGTH_KEYS[m])
                               for m in lengths},
              "audio_neg_inf_to_zero": True, "nonfinite_zeroed": zeroed})
