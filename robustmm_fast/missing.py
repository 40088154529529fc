"""Missing-modality protocols: which (sample, modality) entries a model sees.

Every function returns an ``(N, M)`` bool CPU tensor, True = present, column m = modality m in
the dataset's modality order. Randomness comes from a ``torch.Generator`` seeded with `seed`,
so the same arguments give the same mask on every machine; masks are saved beside results
(`save_masks` / `load_masks`) so every method is scored on the same ones.

Protocols (as CyIN's evaluation defines them, trains/MissingProtocol.py; see
docs/fidelity.md for the line-by-line comparison)
- `fixed_subsets(M)`: the 2^M - 1 non-empty combinations, row r = bitmask r + 1 (bit m set =
  modality m present), so rows run 1 0 0.., 0 1 0.., 1 1 0.., ... and the last row is complete.
  A fixed-subset point gives every sample the same row.
- `random_missing(N, M, eta, seed)`: the dataset-level missing rate (CyIN; CPM-Nets'
  `get_sn`, Zhang et al., NeurIPS'19, §3.2): eta = missing entries / (N*M), every sample keeps
  >= 1 modality. 0 <= eta <= 1 is accepted; for eta >= (M-1)/M every sample keeps exactly one
  uniformly chosen modality (observed rate (M-1)/M), as in CyIN. See its docstring.
- `instance_missing(N, M, prob, seed)`: the instance-level missing probability (CyIN): with
  probability `prob` a sample gets one of the 2^M - 2 incomplete non-empty patterns, uniformly;
  otherwise it is complete. The incomplete fraction is `prob`.
- `per_entry_missing(N, M, prob, seed)`: each entry missing independently with probability
  `prob`, an all-missing sample keeps one uniformly chosen modality (what `instance_missing`
  did before it followed CyIN; its incomplete fraction is 1 - (1-prob)^M, not prob).
- `modality_dropout(present, p)`: the training augmentation (per-entry dropout that never
  removes a sample's last present modality).
"""
from __future__ import annotations

import json
import math
import numbers
import operator
import os
import tempfile
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["fixed_subsets", "subset_name", "random_missing", "instance_missing",
           "per_entry_missing", "modality_dropout", "save_masks", "load_masks"]

MAX_SUBSET_MODALITIES = 20  # 2^20 - 1 rows; more is certainly a mistake, not a protocol
MAX_PATTERN_MODALITIES = 62  # instance_missing draws a pattern's bitmask as one int64
_META_KEY = "__meta__"      # the npz entry holding the JSON metadata


# ---------------------------------------------------------------- argument checks

def _check_int(value, name: str, minimum: int) -> int:
    """An integer (Python, numpy or 0-d torch; never bool or float) >= minimum."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got bool {value!r}")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}") from None
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _check_fraction(value, name: str, upper: float = 1.0, why: str = "") -> float:
    """A real number in [0, upper] (upper may be given with `why` it is the limit)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float, got {type(value).__name__} {value!r}")
    value = float(value)
    # 1e-12: let a limit computed in floating point, e.g. (M - 1) / M, through
    if not math.isfinite(value) or value < 0.0 or value > upper + 1e-12:
        raise ValueError(f"{name} must be in [0, {upper:g}]{why}, got {value!r}")
    return min(value, upper)


def _generator(seed) -> torch.Generator:
    seed = _check_int(seed, "seed", 0)
    return torch.Generator(device="cpu").manual_seed(seed)


# ---------------------------------------------------------------- fixed subsets

def fixed_subsets(num_modalities: int) -> Tensor:
    """All 2^M - 1 non-empty modality combinations, (2^M - 1, M) bool.

    Row r is the bitmask b = r + 1: ``out[r, m] = (b >> m) & 1``. For M = 2 the rows are
    [T, F], [F, T], [T, T]; the last row is always the complete set.
    """
    m = _check_int(num_modalities, "num_modalities", 1)
    if m > MAX_SUBSET_MODALITIES:
        raise ValueError(f"num_modalities must be <= {MAX_SUBSET_MODALITIES} for fixed subsets "
                         f"(2^M - 1 rows), got {m}")
    bits = torch.arange(1, 2 ** m, dtype=torch.int64)                 # (2^M - 1,)
    return (bits[:, None] >> torch.arange(m, dtype=torch.int64)) & 1 == 1  # (2^M - 1, M)


def subset_name(row, names: Sequence[str]) -> str:
    """The present modalities of one mask row joined by '+', in modality order ("fac+pix")."""
    row = torch.as_tensor(row)
    if row.dim() != 1 or row.dtype != torch.bool:
        raise TypeError(f"row must be a 1-D bool mask, got {row.dtype} of shape {tuple(row.shape)}")
    names = list(names)
    if len(names) != row.shape[0]:
        raise ValueError(f"names must have one name per modality ({row.shape[0]}), got {len(names)}")
    chosen = [str(n) for n, keep in zip(names, row.tolist()) if keep]
    if not chosen:
        raise ValueError("row must have at least one present modality, got none")
    return "+".join(chosen)


# ---------------------------------------------------------------- random missing rate

def random_missing(num_samples: int, num_modalities: int, rate: float, seed: int) -> Tensor:
    """Dataset-level missing rate eta: (N, M) bool, every sample keeps >= 1 modality.

    eta = #missing / (N*M), 0 <= eta <= 1.

    - eta < (M-1)/M: exactly K = round(eta*N*M) absent entries, so |observed - eta| <=
      1/(2*N*M), which is <= 0.005 whenever N*M >= 100.
    - eta >= (M-1)/M: every sample keeps exactly one modality, chosen uniformly (observed rate
      (M-1)/M). CyIN (trains/MissingProtocol.py:54-60) takes this branch whenever the present
      ratio 1 - eta is <= 1/M, so its evaluation rates 0.6 and 0.7 with M = 3 both mean "one
      modality per sample". Every eta in this range gives the same mask for the same seed.

    CyIN (MissingProtocol.py:62-95; CPM-Nets' `get_sn` is the same sampler) gives each sample
    one protected modality (uniform one-hot), ORs it with an independent Bernoulli mask over
    all entries, and redraws until the observed present ratio is within 0.005 of 1 - eta.
    Given the protected entries, the unprotected entries are i.i.d., and i.i.d. Bernoulli
    entries conditioned on their total are a uniformly random subset of that size. So this
    function draws

        protected[i] ~ Uniform{0..M-1}                   one per sample
        missing     = K entries chosen uniformly among the N*(M-1) unprotected ones

    (K rounds with Python's round, halves to even, and is capped at N*(M-1)), i.e. CyIN's
    distribution conditioned on the nearest attainable count (its rejection step conditions
    on a 0.005 window instead). eta = 0 gives all present; M = 1 gives all present for every
    eta (the one modality is each sample's protected one).
    """
    n = _check_int(num_samples, "num_samples", 0)
    m = _check_int(num_modalities, "num_modalities", 1)
    eta = _check_fraction(rate, "rate")
    gen = _generator(seed)
    k = min(round(eta * n * m), n * (m - 1))  # eta >= (M-1)/M: K = N*(M-1), one kept per sample
    present = torch.ones(n, m, dtype=torch.bool)
    if k == 0:
        return present
    protected = torch.randint(m, (n,), generator=gen)                   # (N,)
    keys = torch.rand(n, m, generator=gen)                              # (N, M)
    keys[torch.arange(n), protected] = 2.0  # > any uniform key: never among the K smallest
    missing = torch.argsort(keys.reshape(-1), stable=True)[:k]          # (K,) flat indices
    present.view(-1)[missing] = False
    return present


# ---------------------------------------------------------------- instance-level probability

def instance_missing(num_samples: int, num_modalities: int, prob: float, seed: int) -> Tensor:
    """Instance-level missing probability, as CyIN defines it: (N, M) bool.

    With probability `prob` (0 <= prob <= 1) a sample gets one of the 2^M - 2 incomplete
    non-empty patterns, chosen uniformly; otherwise it is complete. So the fraction of
    incomplete samples is `prob`, each incomplete pattern has probability prob / (2^M - 2),
    and the expected missing fraction of entries is prob / 2 (an incomplete pattern misses
    M/2 entries on average, by symmetry of a pattern and its complement).

    CyIN (trains/MissingProtocol.py:98-112) lists the six patterns for M = 3, draws one per
    sample uniformly, then a Bernoulli(prob) per sample (u < prob) decides whether it applies;
    this function draws in the same order: pattern bitmask b ~ Uniform{1..2^M-2} (bit m set =
    modality m present), then u ~ U[0, 1), pattern applied where u < prob. For the same seed
    the incomplete samples at a smaller prob stay incomplete, with the same pattern, at a
    larger one. M = 1 has no incomplete non-empty pattern: only prob = 0 is valid there.
    """
    n = _check_int(num_samples, "num_samples", 0)
    m = _check_int(num_modalities, "num_modalities", 1)
    p = _check_fraction(prob, "prob")
    if m > MAX_PATTERN_MODALITIES:
        raise ValueError(f"num_modalities must be <= {MAX_PATTERN_MODALITIES} for the instance "
                         f"protocol, got {m}")
    gen = _generator(seed)
    present = torch.ones(n, m, dtype=torch.bool)
    if p == 0.0 or n == 0:
        return present
    if m == 1:
        raise ValueError(f"prob must be 0 for one modality (no incomplete non-empty pattern "
                         f"exists), got {p!r}")
    bits = torch.randint(1, 2 ** m - 1, (n,), generator=gen, dtype=torch.int64)  # (N,) 1..2^M-2
    pattern = (bits[:, None] >> torch.arange(m, dtype=torch.int64)) & 1 == 1      # (N, M)
    apply = torch.rand(n, generator=gen) < p                                        # (N,)
    present[apply] = pattern[apply]
    return present


def per_entry_missing(num_samples: int, num_modalities: int, prob: float, seed: int) -> Tensor:
    """Per-entry missing probability: (N, M) bool (not CyIN's instance-level protocol).

    Each entry is missing independently with probability `prob` (0 <= prob <= 1); a sample whose
    every entry came out missing keeps one modality chosen uniformly. The expected missing
    fraction is therefore prob - prob^M / M and the incomplete fraction 1 - (1 - prob)^M
    (M = 3, prob = 0.7: 97.3% of samples incomplete); prob = 1 keeps exactly one modality per
    sample. This was `instance_missing` before that followed CyIN.
    """
    n = _check_int(num_samples, "num_samples", 0)
    m = _check_int(num_modalities, "num_modalities", 1)
    p = _check_fraction(prob, "prob")
    gen = _generator(seed)
    present = torch.rand(n, m, generator=gen) >= p                      # (N, M)
    rescue = torch.randint(m, (n,), generator=gen)                      # (N,)
    empty = ~present.any(dim=1)                                         # (N,)
    present[empty.nonzero().squeeze(1), rescue[empty]] = True
    return present


# ---------------------------------------------------------------- training augmentation

def modality_dropout(present: Tensor, p: float,
                     generator: Optional[torch.Generator] = None) -> Tensor:
    """Drop each present entry of `present` (B, M) with probability p; a row never loses its
    last present modality.

        kept = present & (u >= p),  u ~ U[0, 1) per entry
        a row with present entries but none kept keeps one of its present entries, chosen
        uniformly; rows with no present entry stay all-absent.

    A full row of M entries loses M*p - p^M entries in expectation. p = 0 returns a copy of
    `present` and draws nothing. Random numbers come from `generator` (its device; default
    the global CPU generator); the result is on present's device.
    """
    if not isinstance(present, Tensor) or present.dtype != torch.bool or present.dim() != 2:
        raise TypeError("present must be a (B, M) bool tensor, got "
                        + (f"{present.dtype} of shape {tuple(present.shape)}"
                           if isinstance(present, Tensor) else type(present).__name__))
    p = _check_fraction(p, "p")
    if p == 0.0:
        return present.clone()
    gen_device = generator.device if generator is not None else torch.device("cpu")
    u = torch.rand(present.shape, generator=generator, device=gen_device).to(present.device)
    keys = torch.rand(present.shape, generator=generator, device=gen_device).to(present.device)
    kept = present & (u >= p)                                            # (B, M)
    lost_all = present.any(dim=1) & ~kept.any(dim=1)                     # (B,)
    # uniform choice among a row's present entries: the largest key among them
    pick = torch.where(present, keys, -1.0).argmax(dim=1)                # (B,)
    rows = lost_all.nonzero().squeeze(1)
    kept[rows, pick[rows]] = True
    return kept


# ---------------------------------------------------------------- saving and loading

def _as_mask(value, name: str) -> np.ndarray:
    arr = value.detach().cpu().numpy() if isinstance(value, Tensor) else np.asarray(value)
    if arr.dtype != np.bool_ or arr.ndim != 2:
        raise TypeError(f"mask {name!r} must be a 2-D bool array, got {arr.dtype} of shape "
                        f"{arr.shape}")
    if arr.shape[0] and not arr.any(axis=1).all():
        raise ValueError(f"mask {name!r} has a row with no present modality")
    return arr


def save_masks(path, masks: Mapping[str, Tensor], meta: dict) -> None:
    """Write `masks` ({name: (N, M) bool}) and `meta` (JSON-serialisable: protocol, rate, seed,
    modality names, ...) to one .npz at `path`, atomically (temp file in the same folder, then
    os.replace), so a reader never sees a half-written file.

    If meta has "modalities" (a list of names), every mask must have that many columns.
    """
    path = Path(path)
    if not isinstance(masks, Mapping) or not masks:
        raise ValueError("masks must be a non-empty dict of name -> (N, M) bool mask")
    if not isinstance(meta, dict):
        raise TypeError(f"meta must be a dict, got {type(meta).__name__}")
    arrays = {}
    for name, mask in masks.items():
        if not isinstance(name, str) or not name or name == _META_KEY:
            raise ValueError(f"mask names must be non-empty strings other than {_META_KEY!r}, "
                             f"got {name!r}")
        arrays[name] = _as_mask(mask, name)
    _check_columns(arrays, meta, where="masks")
    try:
        text = json.dumps(meta, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise TypeError(f"meta must be JSON-serialisable: {e}") from None
    arrays[_META_KEY] = np.array(text)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)  # a file object: numpy adds no ".npz" suffix
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_masks(path) -> tuple[dict[str, Tensor], dict]:
    """Read a file written by `save_masks`: ({name: (N, M) bool tensor}, meta).

    Raises ValueError naming the file when it is not a readable .npz, lacks the metadata, or
    holds a mask that is not 2-D bool with >= 1 present modality per row (or whose columns
    disagree with meta["modalities"]).
    """
    path = Path(path)
    try:
        # our own handle: np.load leaks the one it opens when the zip is unreadable
        with open(path, "rb") as f:
            data = np.load(f, allow_pickle=False)
            if not isinstance(data, np.lib.npyio.NpzFile):
                raise ValueError("a single .npy array, not an .npz archive")
            with data:
                arrays = {k: data[k] for k in data.files}
    except FileNotFoundError:
        raise
    except Exception as e:  # all from the bytes: BadZipFile, zlib.error, NotImplementedError
        # (an unknown zip version or compression), EOFError, KeyError, MemoryError, ...
        raise ValueError(f"{path}: not a readable mask file ({type(e).__name__}: {e})") from None
    if _META_KEY not in arrays:
        raise ValueError(f"{path}: no {_META_KEY!r} entry; not written by save_masks")
    try:
        meta = json.loads(str(arrays.pop(_META_KEY)))
    except (ValueError, RecursionError) as e:  # RecursionError: "[[[[..." nested too deeply
        raise ValueError(f"{path}: metadata is not valid JSON ({type(e).__name__}: "
                         f"{str(e)[:200]})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: metadata must be a JSON object, got {type(meta).__name__}")
    if not arrays:
        raise ValueError(f"{path}: holds no masks")
    masks = {}
    for name, arr in arrays.items():
        try:
            masks[name] = torch.from_numpy(_as_mask(arr, name).copy())
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: {e}") from None
    try:
        _check_columns(arrays, meta, where="masks")
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return masks, meta


def _check_columns(arrays: Mapping[str, np.ndarray], meta: dict, where: str) -> None:
    names = meta.get("modalities")
    if names is None:
        return
    if not isinstance(names, (list, tuple)):
        raise ValueError(f"meta['modalities'] must be a list of names, got {type(names).__name__}")
    for name, arr in arrays.items():
        if arr.shape[1] != len(names):
            raise ValueError(f"{where}: mask {name!r} has {arr.shape[1]} columns but "
                             f"meta['modalities'] names {len(names)}")
