"""reparameterize_kl: forward and forward+backward of this package's backends beside the eager
reference, torch.compile(reference) and torch.distributions, at (64, 50, 128), (256, 50, 1024)
and (4096, 256), fp32, eps drawn inside and given.

    pytest benches/bench_reparam_kl.py --benchmark-enable --benchmark-group-by=group
"""
from conftest import benchmark_test

test_reparam_kl = benchmark_test("reparam_kl")
