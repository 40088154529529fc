"""cycle_reconstruction_loss: forward and forward+backward of this package's backends beside the
eager reference, torch.compile(reference) and torch.nn.functional's losses on the included rows,
at (P, B, L, D) = (9, 64, 50, 128) and (3, 256, 1, 1024), fp32, every distance, with a
modality-presence mask and without.

    pytest benches/bench_cycle_loss.py --benchmark-enable --benchmark-group-by=group
"""
import pytest
import torch

from robustmm_fast.bench import cycle_loss as cases_module
from conftest import run_benchmark

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CASES = cases_module.cases()
IMPLS, OURS, _ = cases_module.implementations(DEVICE)


@pytest.mark.parametrize("phase", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("impl", IMPLS, ids=[i.name for i in IMPLS])
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_cycle_loss(benchmark, case, impl, phase):
    run_benchmark(benchmark, "cycle_loss", case, impl, phase, DEVICE)
