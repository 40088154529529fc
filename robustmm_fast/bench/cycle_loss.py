"""Benchmark cases of cycle_reconstruction_loss: this package's backends against the eager
reference, torch.compile(reference) and torch.nn.functional's fused losses on the included rows
(the peer: what a user writes by hand), forward and forward+backward.

Shapes (P pairs, B samples, L tokens, D): (9, 64, 50, 128) -- CyIN's 9 forward/cycle pairs on
MOSI-like token latents -- and (3, 256, 1, 1024) -- pooled vectors. Masks: ``present`` drops
each modality of each sample with probability 0.3 (at least one kept) and includes a pair's rows
where both of its modalities are present, as CyIN's training does; ``none`` includes all rows.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ops.cycle_loss import cycle_reconstruction_loss
from ..reference.cycle_loss import COSINE_EPS
from ..reference.cycle_loss import cycle_reconstruction_loss as reference
from .runner import Case, Impl, compiled, on_backend

SHAPES = ((9, 64, 50, 128), (3, 256, 1, 1024))
DISTANCES = ("mse", "l1", "smooth_l1", "cosine")
MASKS = ("present", "none")
MISSING_RATE = 0.3
FORWARD_WEIGHT, CYCLE_WEIGHT = 1.0, 1.0


def bytes_moved(shape, dtype: torch.dtype) -> tuple[int, int]:
    """(forward, forward + backward) bytes any implementation must move: read the four inputs;
    for the backward also write the four gradients (mask and per-row terms are negligible)."""
    n = 1
    for s in shape:
        n *= int(s)
    elem = torch.empty((), dtype=dtype).element_size()
    return 4 * n * elem, 8 * n * elem


def cases(shapes=SHAPES, distances=DISTANCES, masks=MASKS, dtype=torch.float32) -> list[Case]:
    out = []
    for s in shapes:
        if len(s) < 2:
            raise ValueError(f"cycle_loss shapes are (P, B, ..., D), got {s}")
        for d in distances:
            for m in masks:
                fwd, fwd_bwd = bytes_moved(s, dtype)
                out.append(Case(f"{'x'.join(map(str, s))} {str(dtype).split('.')[-1]} {d} mask={m}",
                                {"shape": s, "distance": d, "mask": m, "dtype": dtype},
                                bytes_fwd=fwd, bytes_fwd_bwd=fwd_bwd))
    return out


def pair_mask(shape, gen: torch.Generator) -> torch.Tensor:
    """(P, B, ...) row mask from random modality presence of M = 3 modalities: row group p
    joins modalities m = p mod 3 and n = (p + 1 + p // 3) mod 3 and is included where both
    are present. For P = 9 that is CyIN's six ordered pairs, then three groups with m = n
    (its three sum-of-translations terms, included where their target is present)."""
    pairs, batch = int(shape[0]), int(shape[1])
    present = torch.rand(batch, 3, generator=gen) >= MISSING_RATE
    present[~present.any(1), 0] = True
    rows = []
    for p in range(pairs):
        m, n = p % 3, (p + 1 + p // 3) % 3
        rows.append(present[:, m] & present[:, n])
    mask = torch.stack(rows)  # (P, B)
    return mask.reshape(pairs, batch, *([1] * (len(shape) - 3))).expand(tuple(shape[:-1])).contiguous()


def _inputs(case: Case, device):
    gen = torch.Generator(device="cpu").manual_seed(0)
    shape, dtype = case.params["shape"], case.params["dtype"]
    make = lambda: torch.randn(shape, generator=gen).to(device, dtype).requires_grad_()  # noqa: E731
    xs = [make() for _ in range(4)]
    mask = pair_mask(shape, gen).to(device) if case.params["mask"] == "present" else None
    return xs, mask


def _closures(fn, case, device):
    xs, mask = _inputs(case, device)
    distance = case.params["distance"]
    kwargs = dict(mask=mask, distance=distance, forward_weight=FORWARD_WEIGHT,
                  cycle_weight=CYCLE_WEIGHT)

    def forward():
        with torch.no_grad():
            return fn(*xs, **kwargs)

    def forward_backward():
        fn(*xs, **kwargs).backward()
        for x in xs:  # as optimizer.zero_grad(set_to_none=True)
            x.grad = None

    return forward, forward_backward


def _ours(backend: str):
    def make(case, device):
        fn = on_backend(cycle_reconstruction_loss, "cycle_loss", backend, device)
        return None if fn is None else _closures(fn, case, device)
    return make


def _compiled(case, device):
    return _closures(compiled(reference), case, device)


def _functional(forward_pred, target, cycle_pred, source, *, mask=None, distance="mse",
                forward_weight=1.0, cycle_weight=1.0):
    """torch.nn.functional's losses on the included rows (boolean indexing), mean reduction."""
    if mask is not None:
        forward_pred, target = forward_pred[mask], target[mask]
        cycle_pred, source = cycle_pred[mask], source[mask]
    if distance == "cosine":
        loss = lambda a, b: (1 - F.cosine_similarity(a, b, dim=-1, eps=COSINE_EPS)).mean()  # noqa: E731
    else:
        loss = {"mse": F.mse_loss, "l1": F.l1_loss, "smooth_l1": F.smooth_l1_loss}[distance]
    return forward_weight * loss(forward_pred, target) + cycle_weight * loss(cycle_pred, source)


def implementations(device: torch.device) -> tuple[list[Impl], str, tuple[str, ...]]:
    """(impls, name of ours, baselines for the ratio columns)."""
    ours = ["cpp"] if device.type == "cpu" else ["cuda", "triton"]
    impls = [Impl(f"robustmm[{b}]", lambda c, b=b: _ours(b)(c, device)) for b in ours]
    impls += [
        Impl("eager reference", lambda c: _closures(reference, c, device)),
        Impl("compile(reference)", lambda c: _compiled(c, device)),
        Impl("F.*_loss on rows", lambda c: _closures(_functional, c, device)),
    ]
    return impls, f"robustmm[{ours[0]}]", ("eager reference", "compile(reference)", "F.*_loss on rows")
