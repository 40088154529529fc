"""Benchmarks: `pytest benches --benchmark-enable --benchmark-group-by=group` (pytest-benchmark).
Each file compares, in one run, this package's backend with the eager reference,
torch.compile(reference) and the strongest PyTorch peer; one group per case and phase.
`robustmm bench OP` prints the same comparison as one table with ratios."""
import pytest
import torch

from robustmm_fast.bench.runner import settle_cpu_allocator


@pytest.fixture(scope="session", autouse=True)
def _settled_allocator():
    """Every implementation starts from the same CPU allocator state (see settle_cpu_allocator)."""
    if not torch.cuda.is_available():
        settle_cpu_allocator()
