"""masked_cross_attention: forward and forward+backward of this package's backends beside the
eager reference, torch.compile(reference) and F.scaled_dot_product_attention with the equivalent
boolean mask, at B=64, H=8, Lq=50, keys 3x50, d=32/64, fp32, with 0, 1 and 2 of 3 modalities
absent, and a long case (Lq=500, keys 3x500).

    pytest benches/bench_masked_attention.py --benchmark-enable --benchmark-group-by=group
"""
from conftest import benchmark_test

test_masked_attention = benchmark_test("masked_attention")
