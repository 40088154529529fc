"""Median fwd+bwd time per call (us) of each fused op at a tiny shape: the per-call overhead.

    python tools/op_call_overhead.py     (PYTHONPATH=<checkout> to time another)
"""
import time, statistics, torch
torch.set_num_threads(1)
import robustmm_fast
from robustmm_fast.ops import reparameterize_kl, cycle_reconstruction_loss, masked_cross_attention
torch.manual_seed(0)
mu = torch.randn(32, 64, requires_grad=True); lv = torch.randn(32, 64, requires_grad=True)
xs = [torch.randn(3, 32, 64, requires_grad=True) for _ in range(4)]
q = torch.randn(4, 2, 8, 16, requires_grad=True); k = torch.randn(4, 2, 16, 16, requires_grad=True)
v = torch.randn(4, 2, 16, 16, requires_grad=True); present = torch.tensor([[1, 0], [1, 1], [0, 1], [1, 1]], dtype=torch.bool)
cases = {
    "reparam_kl (32,64)": lambda: reparameterize_kl(mu, lv, reduction="mean")[1].backward(),
    "cycle_loss (3,32,64)": lambda: cycle_reconstruction_loss(*xs).backward(),
    "masked_attention B4 H2 8x16 d16": lambda: masked_cross_attention(q, k, v, present=present, key_lengths=(8, 8)).sum().backward(),
}
res = {}
for name, f in cases.items():
    for _ in range(200): f()
    ts = []
    for _ in range(2000):
        t = time.perf_counter(); f(); ts.append(time.perf_counter() - t)
    res[name] = round(statistics.median(ts) * 1e6, 1)
print(robustmm_fast.__file__.split("/")[2], res)
