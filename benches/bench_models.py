"""Whole methods: one training step (forward + backward + optimizer steps) and one inference
forward of CyIN, DMRNet and MIM on MOSI-like synthetic data (B=32, L=50, text 768, audio 74,
vision 35), the fused backends beside the reference backend, each also under torch.compile of
the model.

    pytest benches/bench_models.py --benchmark-enable --benchmark-group-by=group
"""
import pytest
import torch

from robustmm_fast.bench import models as cases_module
from conftest import run_benchmark

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CASES = cases_module.cases()
IMPLS, OURS, _ = cases_module.implementations(DEVICE)


@pytest.mark.parametrize("phase", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("impl", IMPLS, ids=[i.name for i in IMPLS])
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_models(benchmark, case, impl, phase):
    run_benchmark(benchmark, "models", case, impl, phase, DEVICE)
