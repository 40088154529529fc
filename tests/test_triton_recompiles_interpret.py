import os
os.environ["TRITON_INTERPRET"] = "1"  # before triton / robustmm_fast are imported  # noqa: E402

"""Interpret tier: how many kernels Triton would compile on a GPU when the lengths vary
(issue 14.8: a new sequence length must not cost a 1-4 s compile).

Run in its own process:
    TRITON_INTERPRET=1 python -m pytest -m interpret tests/test_triton_recompiles_interpret.py -p no:cacheprovider

The interpreter keeps no compile cache, so each launch is filed under the key Triton's JIT
cache gives it on a GPU: a JITFunction of the same function and do_not_specialize list binds
the launch's arguments (each int's == 1 / divisible-by-16 specialisation, each pointer's
alignment, every constexpr) with the sm_90 backend. The kernels' public functions are called
with 20 random lengths; the distinct keys per kernel are the compiles a GPU run would make.
"""
import contextlib
import random
from collections import defaultdict

import pytest
import torch

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import make_backend  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402
from triton.runtime.jit import (JITFunction, compute_cache_key,  # noqa: E402
                                create_function_from_signature)

from robustmm_fast.kernels import cycle_loss as CL  # noqa: E402
from robustmm_fast.kernels import masked_attention as MA  # noqa: E402
from robustmm_fast.kernels import reparam_kl as RK  # noqa: E402

pytestmark = pytest.mark.interpret

LENGTHS = 20
_BACKEND = make_backend(GPUTarget("cuda", 90, 32))
_binders = {}


def _binder(kernel: InterpretedFunction):
    if kernel.fn not in _binders:
        jit = JITFunction(kernel.fn, **{k: v for k, v in kernel.kwargs.items()
                                        if k in ("do_not_specialize",
                                                 "do_not_specialize_on_alignment")})
        _binders[kernel.fn] = create_function_from_signature(jit.signature, jit.params, _BACKEND)
    return _binders[kernel.fn]


@contextlib.contextmanager
def compile_keys(execute: bool = True):
    """Yield {kernel name: {GPU compile key: its constexprs and options}} of the launches made
    in the block (execute=False: record them without running the interpreter)."""
    keys = defaultdict(dict)
    run = InterpretedFunction.run

    def recording_run(self, *args, grid, warmup, **kwargs):
        _, specialization, options = _binder(self)(*args, **kwargs)
        constexprs = [value for kind, value in specialization if kind == "constexpr"]
        keys[self.fn.__name__][compute_cache_key({}, specialization, options)] = (
            f"{constexprs} {options}")
        if execute:
            return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = recording_run
    try:
        yield keys
    finally:
        InterpretedFunction.run = run


def lengths(low: int, high: int, seed: int):
    rng = random.Random(seed)
    return [(rng.randint(low, high), rng.randint(low, high)) for _ in range(LENGTHS)]


def counts(keys):
    return {name: len(k) for name, k in sorted(keys.items())}


def attention_launches(dtype, low, high):
    """Forward and backward, causal and not, with a key mask and dropout, at 20 random
    (Lq, Lk) in [low, high] (Lk % 4 both 0 and not), recorded, not interpreted (the per-op
    interpret tests check the values, the dropout stream at Lk % 4 == 0 and != 0 included)."""
    gen = torch.Generator().manual_seed(0)
    B, H, d = 2, 2, 16
    with compile_keys(execute=False) as keys:
        for Lq, Lk in lengths(low, high, seed=1):
            q = torch.randn(B, H, Lq, d, generator=gen).to(dtype)
            k, v = (torch.randn(B, H, Lk, d, generator=gen).to(dtype) for _ in range(2))
            keep = torch.rand(B, Lk, generator=gen) < 0.7
            keep[:, 0] = True
            for causal in (False, True):
                out, lse = MA.masked_attention_forward(q, k, v, keep, causal, 0.25, 0.25, 7)
                MA.masked_attention_backward(torch.ones_like(out), q, k, v, out, lse, keep,
                                             causal, 0.25, 0.25, 7)
    print(f"{dtype}, (Lq, Lk) in [{low}, {high}]: distinct compiles over {LENGTHS} lengths: "
          f"{counts(keys)}")
    assert set(keys) == {"_attn_fwd_kernel", "_attn_bwd_delta_kernel", "_attn_bwd_dkdv_kernel",
                         "_attn_bwd_dq_kernel"}
    return keys


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_attention_compiles_once_per_causal_flag(dtype):
    """Lengths past every block cap (64): one compile per kernel and causal flag (the D =
    rowsum(dO O) kernel: one), where each length used to compile its own (Lq, Lk and NB
    specialised mod 16, ALIGNED4 flipping with Lk % 4)."""
    got = counts(attention_launches(dtype, 64, 160))
    assert got == {"_attn_bwd_delta_kernel": 1, "_attn_bwd_dkdv_kernel": 2,
                   "_attn_bwd_dq_kernel": 2, "_attn_fwd_kernel": 2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_attention_short_lengths_compile_per_block_size_only(dtype):
    """Any lengths (1 included): the constexprs alone (the power-of-two blocks the wrapper picks
    up to its cap, the flags) select the compile, so at most 3 block sizes per tile dim."""
    keys = attention_launches(dtype, 1, 300)
    for name, variants in keys.items():
        assert len(variants) == len(set(variants.values())), (
            f"{name}: a non-constexpr argument selected a compile: {len(variants)} keys for "
            f"{len(set(variants.values()))} constexpr configurations")
        assert len(variants) <= 2 * 3 * 3, name


def test_row_kernels_compile_once():
    """reparam_kl and cycle_loss at 20 random row counts >= 256 (batch x length; D fixed):
    one compile per kernel (the row block is capped from 256 rows of D = 16 on)."""
    gen = torch.Generator().manual_seed(0)
    D = 16
    with compile_keys(execute=False) as keys:
        for rows, _ in lengths(256, 5000, seed=2):
            mu, lv = (torch.randn(rows, D, generator=gen) for _ in range(2))
            mask = torch.rand(rows, generator=gen) < 0.8
            z, kl = RK.reparam_kl_forward(mu, lv, None, None, None, mask, 11, RK.PHILOX_NOISE)
            RK.reparam_kl_backward(torch.ones_like(z), torch.ones_like(kl), mu, lv, None, None,
                                   None, mask, 11, RK.PHILOX_NOISE, False, False)
            x = [torch.randn(rows, D, generator=gen) for _ in range(4)]
            terms = CL.cycle_loss_forward(*x, mask, CL.MSE, 1.0)
            CL.cycle_loss_backward(torch.ones_like(terms), *x, mask, CL.MSE, 1.0, 15)
    got = counts(keys)
    print(f"distinct compiles over {LENGTHS} row counts: {got}")
    assert got == {"_cycle_bwd_kernel": 1, "_cycle_fwd_kernel": 1,
                   "_reparam_kl_bwd_kernel": 1, "_reparam_kl_fwd_kernel": 1}
