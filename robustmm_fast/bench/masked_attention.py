"""Benchmark cases of masked_cross_attention: this package's backends against the eager
reference, torch.compile(reference) and F.scaled_dot_product_attention with the equivalent
boolean mask (the peer; on CUDA also FlexAttention with the equivalent block mask), forward and
forward+backward. The layer rows time nn.MaskedCrossModalAttention (projections included,
E = H d, batch first, default backend) on its fused path (need_weights=False) and on its
materialized path (need_weights=True), and nn.MultiheadAttention (need_weights=False) with the
equivalent mask.

Shapes: B=64, H=8, Lq=50, keys = 3 modality segments of 50, d = 32 and 64 (MulT-sized), with 0,
1 or 2 of the 3 source modalities absent in every sample (which ones: random per sample,
seeded); and a long case Lq=500, keys 3x500, d=32, B=4, where memory must stay linear in length.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..nn.masked_attention import MaskedCrossModalAttention
from ..ops.masked_attention import masked_cross_attention
from ..reference.masked_attention import key_keep_mask
from ..reference.masked_attention import masked_cross_attention as reference
from .runner import Case, Impl, compiled, on_backend

# (B, H, Lq, key_lengths, d)
SHAPES = ((64, 8, 50, (50, 50, 50), 32), (64, 8, 50, (50, 50, 50), 64),
          (4, 8, 500, (500, 500, 500), 32))
ABSENT = (0, 1, 2)  # absent modalities per sample, of 3


def cases(shapes=SHAPES, absent=ABSENT, dtype=torch.float32) -> list[Case]:
    out = []
    for shape in shapes:
        if len(shape) != 5:
            raise ValueError("masked_attention shapes are (B, H, Lq, key_lengths, d); "
                             "use the defaults (the CLI's --shape does not apply)")
        B, H, Lq, lengths, d = shape
        for a in absent:
            if a >= len(lengths) + 1:
                continue
            name = (f"B{B} H{H} Lq{Lq} Lk{'+'.join(map(str, lengths))} d{d} "
                    f"{str(dtype).split('.')[-1]} absent={a}/{len(lengths)}")
            out.append(Case(name, {"shape": shape, "absent": a, "dtype": dtype}))
    return out


def presence(batch: int, modalities: int, absent: int, gen: torch.Generator) -> torch.Tensor:
    """(B, M) bool with exactly `absent` False per row, which ones random per row."""
    order = torch.rand(batch, modalities, generator=gen).argsort(1)
    return order >= absent


def _inputs(case: Case, device):
    gen = torch.Generator().manual_seed(0)
    B, H, Lq, lengths, d = case.params["shape"]
    dtype, Lk = case.params["dtype"], sum(lengths)
    make = lambda *s: torch.randn(*s, generator=gen).to(device, dtype).requires_grad_()  # noqa: E731
    q, k, v = make(B, H, Lq, d), make(B, H, Lk, d), make(B, H, Lk, d)
    present = presence(B, len(lengths), case.params["absent"], gen).to(device)
    grad = torch.randn(B, H, Lq, d, generator=gen).to(device, dtype)
    return q, k, v, present, lengths, grad


def _closures(fn, case, device):
    q, k, v, present, lengths, grad = _inputs(case, device)

    def forward():
        with torch.no_grad():
            return fn(q, k, v, present=present, key_lengths=lengths)

    def forward_backward():
        fn(q, k, v, present=present, key_lengths=lengths).backward(grad)
        q.grad = k.grad = v.grad = None

    return forward, forward_backward


def _ours(backend: str):
    def make(case, device):
        fn = on_backend(masked_cross_attention, "masked_attention", backend, device)
        return None if fn is None else _closures(fn, case, device)
    return make


def _layer(cls, need_weights: bool):
    """The layer on (B, Lq, E) queries and (B, Lk, E) keys: ours with present/key_lengths, MHA
    with the equivalent key_padding_mask."""
    def make(case, device):
        B, H, Lq, lengths, d = case.params["shape"]
        gen, dtype, E = torch.Generator().manual_seed(0), case.params["dtype"], H * d
        layer = cls(E, H, batch_first=True).to(device, dtype)
        x, s, grad = (torch.randn(B, n, E, generator=gen).to(device, dtype)
                      for n in (Lq, sum(lengths), Lq))
        x.requires_grad_()
        present = presence(B, len(lengths), case.params["absent"], gen).to(device)
        masks = dict(present=present, key_lengths=lengths)
        if cls is not MaskedCrossModalAttention:
            masks = dict(key_padding_mask=~key_keep_mask(B, s.shape[1], present, lengths, None,
                                                         device))
        call = lambda: layer(x, s, s, need_weights=need_weights, **masks)[0]  # noqa: E731

        def forward():
            with torch.no_grad():
                return call()

        def forward_backward():
            call().backward(grad)
            x.grad = None
            layer.zero_grad(set_to_none=True)
        return forward, forward_backward
    return make


def _compiled(case, device):
    return _closures(compiled(reference), case, device)


def _sdpa(q, k, v, *, present, key_lengths):
    keep = key_keep_mask(q.shape[0], k.shape[2], present, key_lengths, None, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])


def _flex(case, device):
    """FlexAttention (compiled) with a block mask from the same kept keys; CUDA only: its CPU
    path has no backward in torch 2.13. The block mask is built once, outside the timing, as a
    user would build it once per batch."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    q, k, v, present, lengths, grad = _inputs(case, device)
    keep = key_keep_mask(q.shape[0], k.shape[2], present, lengths, None, q.device)
    block_mask = create_block_mask(lambda b, h, i, j: keep[b, j], q.shape[0], None,
                                   q.shape[2], k.shape[2], device=str(device))
    flex = compiled(flex_attention)

    def forward():
        with torch.no_grad():
            return flex(q, k, v, block_mask=block_mask)

    def forward_backward():
        flex(q, k, v, block_mask=block_mask).backward(grad)
        q.grad = k.grad = v.grad = None

    return forward, forward_backward


def implementations(device: torch.device) -> tuple[list[Impl], str, tuple[str, ...]]:
    ours = ["cpp"] if device.type == "cpu" else ["cuda", "triton"]
    impls = [Impl(f"robustmm[{b}]", lambda c, b=b: _ours(b)(c, device)) for b in ours]
    impls += [
        Impl("eager reference", lambda c: _closures(reference, c, device)),
        Impl("compile(reference)", lambda c: _compiled(c, device)),
        Impl("SDPA + bool mask", lambda c: _closures(_sdpa, c, device)),
    ]
    impls += [Impl("layer: ours fused (need_weights=False)", lambda c: _layer(
        MaskedCrossModalAttention, False)(c, device)), Impl("layer: ours materialized "
        "(need_weights=True)", lambda c: _layer(MaskedCrossModalAttention, True)(c, device)),
        Impl("layer: nn.MultiheadAttention (need_weights=False)",
             lambda c: _layer(torch.nn.MultiheadAttention, False)(c, device))]
    peers = ("eager reference", "compile(reference)", "SDPA + bool mask")
    if device.type == "cuda":
        impls.append(Impl("FlexAttention + block mask", lambda c: _flex(c, device)))
        peers += ("FlexAttention + block mask",)
    return impls, f"robustmm[{ours[0]}]", peers
