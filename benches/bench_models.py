"""Whole methods: one training step (forward + backward + optimizer steps) and one inference
forward of CyIN, DMRNet and MIM on MOSI-like synthetic data (B=32, L=50, text 768, audio 74,
vision 35), the fused backends beside the reference backend, each also under torch.compile of
the model.

    pytest benches/bench_models.py --benchmark-enable --benchmark-group-by=group
"""
from conftest import benchmark_test

test_models = benchmark_test("models")
