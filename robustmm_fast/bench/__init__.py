"""Benchmark harness shared by ``robustmm bench`` and the pytest-benchmark files in benches/.

Each op's module here lists its cases (shapes, eps modes) and implementations (this package's
backend, the eager reference, torch.compile of the reference, the strongest PyTorch peer);
``run_cases`` times them side by side in one process and prints one table with ratios.
"""
from .runner import Case, Impl, Result, format_table, run_cases  # noqa: F401
