"""Pure-PyTorch Philox4x32-10 normals, the same numbers as csrc/include/robustmm/philox.h and
Triton's ``tl.randn4x(seed, offset)``.

Element ``i`` of a tensor gets component ``i & 3`` of counter ``i >> 2``:

    (x0, x1, x2, x3) = Philox4x32-10(counter = (i >> 2 low 32, high 32, 0, 0),
                                     key = (seed low 32, seed high 32))
    u_k = (x_k < 0 ? ~x_k : x_k) * 4.6566127342e-10          (x_k read as int32)
    n0, n1 = r cos(th), r sin(th) with r = sqrt(-2 log(max(u0, 1e-7))), th = 2 pi u1
    n2, n3 = the same from (u2, u3)

Slow (int64 tensor arithmetic); it is the oracle for the kernels' in-kernel eps and the eps of
the reference backend.
"""
from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85


def _mul_u32(a: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit halves of a * b for uint32 values held in int64, exactly."""
    a_lo, a_hi = a & 0xFFFF, a >> 16
    b_lo, b_hi = b & 0xFFFF, b >> 16
    ll, lh, hl, hh = a_lo * b_lo, a_lo * b_hi, a_hi * b_lo, a_hi * b_hi
    mid = (ll >> 16) + (lh & 0xFFFF) + (hl & 0xFFFF)
    high = hh + (lh >> 16) + (hl >> 16) + (mid >> 16)
    low = ((mid & 0xFFFF) << 16) | (ll & 0xFFFF)
    return high & _MASK32, low


def philox4x32_10(seed: int, counters: torch.Tensor) -> list[torch.Tensor]:
    """The four uint32 outputs (held in int64) of Philox4x32-10 for each int64 counter."""
    counters = counters.to(torch.int64)
    c0 = counters & _MASK32
    c1 = (counters >> 32) & _MASK32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    k0, k1 = seed & _MASK32, seed >> 32
    for _ in range(10):
        hi_b, lo_b = _mul_u32(c2, _ROUND_B)
        hi_a, lo_a = _mul_u32(c0, _ROUND_A)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _KEY_A) & _MASK32, (k1 + _KEY_B) & _MASK32
    return [c0, c1, c2, c3]


def _uniform(x: torch.Tensor) -> torch.Tensor:
    signed = torch.where(x >= 2**31, x - 2**32, x)
    signed = torch.where(signed < 0, -signed - 1, signed)
    return signed.to(torch.float32) * 4.6566127342e-10


def _box_muller(u1: torch.Tensor, u2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    u1 = torch.clamp_min(u1, 1.0e-7)
    th = 6.283185307179586 * u2
    r = torch.sqrt(-2.0 * torch.log(u1))
    return r * torch.cos(th), r * torch.sin(th)


def philox_randn(seed: int, shape, device=None) -> torch.Tensor:
    """float32 normals of `shape`: element i (row-major) is randn_at(seed, i)."""
    numel = 1
    for s in shape:
        numel *= int(s)
    counters = torch.arange((numel + 3) // 4, device=device, dtype=torch.int64)
    u = [_uniform(x) for x in philox4x32_10(seed, counters)]
    n0, n1 = _box_muller(u[0], u[1])
    n2, n3 = _box_muller(u[2], u[3])
    return torch.stack([n0, n1, n2, n3], dim=1).reshape(-1)[:numel].reshape(tuple(shape))


def philox_uniform(seed: int, shape, device=None) -> torch.Tensor:
    """float32 uniforms in [0, 1) of `shape`: element i (row-major) is component (i & 3) of
    Philox4x32-10(seed, counter i >> 2) mapped as Triton's uint_to_uniform_float (tl.rand4x's
    stream; rand_at in csrc/include/robustmm/philox.h)."""
    numel = 1
    for s in shape:
        numel *= int(s)
    counters = torch.arange((numel + 3) // 4, device=device, dtype=torch.int64)
    u = [_uniform(x) for x in philox4x32_10(seed, counters)]
    return torch.stack(u, dim=1).reshape(-1)[:numel].reshape(tuple(shape))
