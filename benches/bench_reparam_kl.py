"""reparameterize_kl: forward and forward+backward of this package's backends beside the eager
reference, torch.compile(reference) and torch.distributions, at (64, 50, 128), (256, 50, 1024)
and (4096, 256), fp32, eps drawn inside and given.

    pytest benches/bench_reparam_kl.py --benchmark-enable --benchmark-group-by=group
"""
import pytest
import torch

from robustmm_fast.bench import reparam_kl as cases_module
from robustmm_fast.bench.runner import peak_memory_mb

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CASES = cases_module.cases()
IMPLS, OURS, _ = cases_module.implementations(DEVICE)


@pytest.mark.parametrize("phase", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("impl", IMPLS, ids=[i.name for i in IMPLS])
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_reparam_kl(benchmark, case, impl, phase):
    made = impl.make(case)
    if made is None:
        pytest.skip(f"{impl.name} does not apply to {case.name}")
    fn = made[0] if phase == "fwd" else made[1]
    benchmark.group = f"reparam_kl {case.name} {phase}"
    if phase == "fwd+bwd":
        benchmark.extra_info["peak_mib"] = peak_memory_mb(fn, DEVICE)
    if DEVICE.type == "cuda":
        def timed():
            fn()
            torch.cuda.synchronize()
        benchmark.pedantic(timed, warmup_rounds=2, rounds=20)
    else:
        benchmark.pedantic(fn, warmup_rounds=2, rounds=7)
