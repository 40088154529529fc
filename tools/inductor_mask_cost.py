"""Why the small MLP methods (early_fusion, late_fusion, ume_mma) train slower under
torch.compile on CPU: what inductor's generated C++ costs for the two element-wise patterns
they are made of, beside eager, one thread, (64, 128) fp32 (a Handwritten batch x hidden 128).

    python tools/inductor_mask_cost.py

  bool out        x <= 0 returned as a bool tensor (the mask relu's backward saves)
  relu            relu(x) * 2 (float out only)
  dropout fwd+bwd dropout(relu(x), 0.1).sum().backward(): inductor's per-element Philox
                  (normalized_rand_cpu) and its masks; with fallback_random=True (eager's
                  bernoulli_) as well
Reports the median of 2000 calls in microseconds.
"""
import torch
import torch.nn.functional as F

from robustmm_fast.bench.runner import time_fn


def median_us(fn, calls=2000):
    return time_fn(fn, torch.device("cpu"), warmup=20, repeat=calls) * 1e3


def dropout_step(x):
    F.dropout(torch.relu(x), 0.1, True).sum().backward()


def main():
    torch.set_num_threads(1)
    x = torch.randn(64, 128)
    xg = x.clone().requires_grad_()
    cases = {
        "bool out": (lambda t: t <= 0, x),
        "relu": (lambda t: torch.relu(t) * 2, x),
    }
    print("| case | eager (us) | compiled (us) | compiled / eager |")
    print("|---|---|---|---|")
    for name, (fn, arg) in cases.items():
        torch._dynamo.reset()
        eager = median_us(lambda: fn(arg))
        compiled_fn = torch.compile(fn)
        compiled = median_us(lambda: compiled_fn(arg))
        print(f"| {name} | {eager:.1f} | {compiled:.1f} | {compiled / eager:.2f} |", flush=True)
    eager = median_us(lambda: dropout_step(xg), 500)
    for fallback in (False, True):
        torch._dynamo.reset()
        torch._inductor.config.fallback_random = fallback
        compiled_fn = torch.compile(dropout_step)
        compiled = median_us(lambda: compiled_fn(xg), 500)
        label = "dropout fwd+bwd" + (" (fallback_random)" if fallback else "")
        print(f"| {label} | {eager:.1f} | {compiled:.1f} | {compiled / eager:.2f} |", flush=True)


if __name__ == "__main__":
    main()
