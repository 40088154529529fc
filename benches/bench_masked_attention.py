"""masked_cross_attention: forward and forward+backward of this package's backends beside the
eager reference, torch.compile(reference) and F.scaled_dot_product_attention with the equivalent
boolean mask, at B=64, H=8, Lq=50, keys 3x50, d=32/64, fp32, with 0, 1 and 2 of 3 modalities
absent, and a long case (Lq=500, keys 3x500).

    pytest benches/bench_masked_attention.py --benchmark-enable --benchmark-group-by=group
"""
import pytest
import torch

from robustmm_fast.bench import masked_attention as cases_module
from conftest import run_benchmark

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CASES = cases_module.cases()
IMPLS, OURS, _ = cases_module.implementations(DEVICE)


@pytest.mark.parametrize("phase", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("impl", IMPLS, ids=[i.name for i in IMPLS])
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_masked_attention(benchmark, case, impl, phase):
    run_benchmark(benchmark, "masked_attention", case, impl, phase, DEVICE)
