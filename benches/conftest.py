"""Benchmarks: `pytest benches --benchmark-enable --benchmark-group-by=group` (pytest-benchmark).
Each file compares, in one run, this package's backend with the eager reference,
torch.compile(reference) and the strongest PyTorch peer; one group per case and phase.
`robustmm bench OP` prints the same comparison as one table with ratios."""
import importlib

import pytest
import torch

from robustmm_fast.bench.runner import settle_cpu_allocator

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session", autouse=True)
def _settled_allocator():
    """Every implementation starts from the same CPU allocator state (see settle_cpu_allocator)."""
    if not torch.cuda.is_available():
        settle_cpu_allocator()


def run_benchmark(benchmark, op: str, case, impl, phase: str, device: torch.device) -> None:
    """Time one (case, implementation, phase) of `op` with pytest-benchmark; fwd+bwd also
    records its peak memory."""
    from robustmm_fast.bench.runner import peak_memory_mb
    made = impl.make(case)
    if made is None:
        pytest.skip(f"{impl.name} does not apply to {case.name}")
    fn = made[0] if phase == "fwd" else made[1]
    benchmark.group = f"{op} {case.name} {phase}"
    if phase == "fwd+bwd":
        benchmark.extra_info["peak_mib"] = peak_memory_mb(fn, device)
    if device.type == "cuda":
        def timed():
            fn()
            torch.cuda.synchronize()
        benchmark.pedantic(timed, warmup_rounds=2, rounds=20)
    else:
        benchmark.pedantic(fn, warmup_rounds=2, rounds=7)


def benchmark_test(op: str):
    """The pytest-benchmark test of robustmm_fast.bench.<op>: every case x implementation x
    phase on DEVICE (a bench file binds it to a test_* name)."""
    module = importlib.import_module(f"robustmm_fast.bench.{op}")
    cases = module.cases()
    impls = module.implementations(DEVICE)[0]

    @pytest.mark.parametrize("phase", ["fwd", "fwd+bwd"])
    @pytest.mark.parametrize("impl", impls, ids=[i.name for i in impls])
    @pytest.mark.parametrize("case", cases, ids=[c.name for c in cases])
    def test(benchmark, case, impl, phase):
        run_benchmark(benchmark, op, case, impl, phase, DEVICE)

    test.__name__ = test.__qualname__ = f"test_{op}"
    return test
