"""cycle_reconstruction_loss: forward and forward+backward of this package's backends beside the
eager reference, torch.compile(reference) and torch.nn.functional's losses on the included rows,
at (P, B, L, D) = (9, 64, 50, 128) and (3, 256, 1, 1024), fp32, every distance, with a
modality-presence mask and without.

    pytest benches/bench_cycle_loss.py --benchmark-enable --benchmark-group-by=group
"""
from conftest import benchmark_test

test_cycle_loss = benchmark_test("cycle_loss")
