"""Synthetic multimodal data with controllable shared, modality-specific and noise information.

Generative model (per sample n; all draws from one torch.Generator seeded with `seed`):

    s   ~ N(0, I_{k_s})                    shared factor, seen by every modality
    u_m ~ N(0, I_{k_u})  for each m        specific factor, seen by modality m only
    z   = (shared * a.s + sum_m specific_m * b_m.u_m) / sigma,
          sigma = sqrt(shared^2 + sum_m specific_m^2)      (so z ~ N(0, 1))
    label: regression      y = 3 tanh(z / 2)              in (-3, 3), like MOSI/MOSEI
           classification  y = #{j : z > q_j}, q_j = Phi^{-1}(j / C), j = 1..C-1 (balanced)
    token t of modality m:
           x_m[t] = W_{m,t} [s; u_m] / sqrt(k_s + k_u) + noise_m * eps,   eps ~ N(0, I_{D_m})

a, b_m are random unit vectors; W_{m,t} (D_m x (k_s + k_u)) random N(0, 1) matrices, one per
position, so each token is a different view of the same latents. The "world" (a, b_m, W) is drawn
first, so it depends only on the seed and the modality shapes, not on num_samples.

Controls: `shared` and `specific` weigh how much of the label every modality knows versus what
only one modality knows (specific=0: any single modality determines the label up to noise;
shared=0: every modality is needed); `noise` (a float or {modality: float}) hides it.
With ``random_lengths=True`` each sample keeps a random prefix of max(1, L//4)..L tokens per
modality; the rest is zero padding (``lengths``).

Presets (the shapes of MMSA's aligned_50 features):
    "mosi":  text (50, 768), audio (50, 5),  vision (50, 20), splits 1284 : 229 : 686
    "mosei": text (50, 768), audio (50, 74), vision (50, 35), splits 16326 : 1871 : 4659
The split proportions are kept for any num_samples. Memory: text alone is
num_samples * 50 * 768 * 4 bytes (154 MB for the default 1000 samples).
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch

from .dataset import TASKS, MultimodalDataset

__all__ = ["make_synthetic", "PRESETS"]

PRESETS = {
    "mosi": {"modalities": {"text": (50, 768), "audio": (50, 5), "vision": (50, 20)},
             "split_sizes": (1284, 229, 686)},
    "mosei": {"modalities": {"text": (50, 768), "audio": (50, 74), "vision": (50, 35)},
              "split_sizes": (16326, 1871, 4659)},
}
DEFAULT_MODALITIES = {"a": (1, 16), "b": (1, 16), "c": (1, 16)}
DEFAULT_SPLIT_FRACTIONS = (0.7, 0.1, 0.2)

Number = Union[int, float]


def _per_modality(value, names, what) -> dict[str, float]:
    if isinstance(value, dict):
        unknown = set(value) - set(names)
        missing = set(names) - set(value)
        if unknown or missing:
            raise ValueError(f"{what}: dict keys must be the modalities {list(names)}; unknown "
                             f"{sorted(unknown)}, missing {sorted(missing)}")
        out = {m: value[m] for m in names}
    else:
        out = {m: value for m in names}
    for m, v in out.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ValueError(f"{what}[{m!r}] must be a finite number >= 0, got {v!r}")
    return {m: float(v) for m, v in out.items()}


def _split_sizes(n: int, fractions) -> tuple[int, int, int]:
    total = float(sum(fractions))
    n_valid = int(round(n * fractions[1] / total))
    n_test = int(round(n * fractions[2] / total))
    return n - n_valid - n_test, n_valid, n_test


def make_synthetic(preset: Optional[str] = None, *, num_samples: int = 1000,
                   modalities: Optional[dict[str, tuple[int, int]]] = None,
                   shared: Number = 1.0, specific: Union[Number, dict] = 0.5,
                   noise: Union[Number, dict] = 0.5, task: str = "regression",
                   num_classes: int = 2, shared_dim: int = 4, specific_dim: int = 4,
                   random_lengths: bool = False, seed: int = 0) -> MultimodalDataset:
    """A MultimodalDataset drawn from the generative model above; deterministic given `seed`.

    Args:
        preset: None, "mosi" or "mosei" (modality shapes and split proportions).
        num_samples: N, split by the preset's proportions (else 70/10/20), in random order.
        modalities: {name: (L, D)}; overrides the preset's shapes (default without a preset:
            three vector modalities a, b, c of dim 16).
        shared, specific: label weights of the shared / specific factors (>= 0, not all 0);
            `specific` may be a {modality: weight} dict.
        noise: std of the Gaussian observation noise, or a {modality: std} dict.
        task: "regression" (labels in (-3, 3)) or "classification" (`num_classes` balanced classes).
        shared_dim, specific_dim: k_s and k_u.
        random_lengths: draw per-sample valid lengths (padding at the end, zeroed).
        seed: seeds the single torch.Generator behind every draw.
    """
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"preset must be None or one of {sorted(PRESETS)}, got {preset!r}")
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be an int >= 1, got {num_samples!r}")
    if task == "classification" and (not isinstance(num_classes, int) or num_classes < 2):
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
    for what, k in (("shared_dim", shared_dim), ("specific_dim", specific_dim)):
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"{what} must be an int >= 1, got {k!r}")
    shapes = dict(modalities if modalities is not None
                  else PRESETS[preset]["modalities"] if preset else DEFAULT_MODALITIES)
    if not shapes:
        raise ValueError("modalities must name at least one modality")
    for m, shp in shapes.items():
        if (not isinstance(shp, (tuple, list)) or len(shp) != 2
                or not all(isinstance(v, int) and v >= 1 for v in shp)):
            raise ValueError(f"modalities[{m!r}] must be (L, D) positive ints, got {shp!r}")
    names = list(shapes)
    w_shared = _per_modality(shared, ["shared"], "shared")["shared"]
    w_spec = _per_modality(specific, names, "specific")
    noise_std = _per_modality(noise, names, "noise")
    sigma = math.sqrt(w_shared ** 2 + sum(w ** 2 for w in w_spec.values()))
    if sigma == 0:
        raise ValueError("shared and specific are all 0: the label would carry no information")

    g = torch.Generator().manual_seed(int(seed))
    k = shared_dim + specific_dim

    def unit(dim):
        v = torch.randn(dim, generator=g, dtype=torch.float64)
        return v / v.norm()

    # the world: label directions and per-position projections (independent of num_samples)
    a = unit(shared_dim)
    b = {m: unit(specific_dim) for m in names}
    proj = {m: torch.randn(L, D, k, generator=g) / math.sqrt(k)
            for m, (L, D) in shapes.items()}                               # (L_m, D_m, k) f32

    n = num_samples
    s = torch.randn(n, shared_dim, generator=g, dtype=torch.float64)      # (N, k_s)
    u = {m: torch.randn(n, specific_dim, generator=g, dtype=torch.float64) for m in names}
    z = (w_shared * s @ a + sum(w_spec[m] * u[m] @ b[m] for m in names)) / sigma   # (N,)
    if task == "regression":
        labels = (3 * torch.tanh(z / 2)).to(torch.float32)
        num_cls = 0
    else:
        q = torch.distributions.Normal(0.0, 1.0).icdf(
            torch.arange(1, num_classes, dtype=torch.float64) / num_classes)   # (C-1,)
        labels = torch.bucketize(z, q).to(torch.int64)
        num_cls = num_classes

    inputs, lengths = {}, {}
    for m, (L, D) in shapes.items():
        # float32 from here: the text modality of a preset is the bulk of the memory
        h = torch.cat([s, u[m]], dim=1).to(torch.float32)                 # (N, k)
        x = torch.einsum("tdk,nk->ntd", proj[m], h)                        # (N, L, D)
        x += noise_std[m] * torch.randn(n, L, D, generator=g)
        if random_lengths:
            lo = max(1, L // 4)
            ln = torch.randint(lo, L + 1, (n,), generator=g)
            x[torch.arange(L) >= ln[:, None]] = 0                          # padding at the end
            lengths[m] = ln.to(torch.int64)
        inputs[m] = x

    fractions = PRESETS[preset]["split_sizes"] if preset else DEFAULT_SPLIT_FRACTIONS
    n_train, n_valid, _ = _split_sizes(n, fractions)
    order = torch.randperm(n, generator=g)
    splits = {"train": order[:n_train].sort().values,
              "valid": order[n_train:n_train + n_valid].sort().values,
              "test": order[n_train + n_valid:].sort().values}
    return MultimodalDataset(
        name=f"synthetic-{preset}" if preset else "synthetic", task=task, inputs=inputs,
        labels=labels, splits=splits, lengths=lengths, num_classes=num_cls,
        info={"source": "make_synthetic", "preset": preset, "seed": int(seed),
              "shared": w_shared, "specific": w_spec, "noise": noise_std,
              "shared_dim": shared_dim, "specific_dim": specific_dim,
              "random_lengths": bool(random_lengths)})
