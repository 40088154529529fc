"""reparameterize_kl: forward and forward+backward of this package's backends beside the eager
reference, torch.compile(reference) and torch.distributions, at (64, 50, 128), (256, 50, 1024)
and (4096, 256), fp32, eps drawn inside and given.

    pytest benches/bench_reparam_kl.py --benchmark-enable --benchmark-group-by=group
"""
import pytest
import torch

from robustmm_fast.bench import reparam_kl as cases_module
from conftest import run_benchmark

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CASES = cases_module.cases()
IMPLS, OURS, _ = cases_module.implementations(DEVICE)


@pytest.mark.parametrize("phase", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("impl", IMPLS, ids=[i.name for i in IMPLS])
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_reparam_kl(benchmark, case, impl, phase):
    run_benchmark(benchmark, "reparam_kl", case, impl, phase, DEVICE)
