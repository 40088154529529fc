"""Benchmarks: `pytest benches --benchmark-enable --benchmark-group-by=group` (pytest-benchmark).
Each file compares, in one run, this package's backend with the eager reference,
torch.compile(reference) and the strongest PyTorch peer; one group per case and phase.
`robustmm bench OP` prints the same comparison as one table with ratios."""
