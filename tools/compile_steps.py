"""Compile time and training-step time of each method, eager vs torch.compile (inductor), on
Handwritten with its default configuration (batch 64), the fused backend (auto), one thread.

    python tools/compile_steps.py --method dmrnet --method mim [--steps 30]

Every method's training forward is one graph (tools/compile_report.py; MIM's BiLSTM is
nn/traceable_lstm.TraceableLSTM, which dynamo traces). For cold compile times run it with
TORCHINDUCTOR_FORCE_DISABLE_CACHES=1 (otherwise inductor's on-disk cache serves a rerun).
"""
import argparse
import statistics
import time

import torch

from robustmm_fast.data.handwritten import load_handwritten
from robustmm_fast.models.registry import METHODS, get_method


def measure(name: str, compiled: bool, steps: int, batch_size: int = 64):
    data = load_handwritten(seed=1111)
    batch = data.batch(data.splits["train"][:batch_size])
    method = get_method(name)
    config = method.config(None, {})
    torch.manual_seed(0)
    model = method.build(data, config)
    recipe = method.recipe(config)
    optimizers = recipe.optimizers(model)
    net = torch.compile(model) if compiled else model
    stage = recipe.stage(recipe.epochs - 1)

    def step():
        recipe.train_step(net, batch, optimizers, epoch=recipe.epochs - 1, step=0, stage=stage)

    start = time.perf_counter()
    step()
    first = time.perf_counter() - start
    for _ in range(3):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return first, statistics.median(times)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--method", action="append", choices=list(METHODS))
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| method | eager step (ms) | compiled step (ms) | compiled / eager | first compiled step (s) |")
    print("|---|---|---|---|---|")
    for name in args.method or list(METHODS):
        torch._dynamo.reset()
        _, eager = measure(name, False, args.steps)
        first, comp = measure(name, True, args.steps)
        print(f"| {name} | {eager * 1e3:.2f} | {comp * 1e3:.2f} | {comp / eager:.2f} | "
              f"{first:.1f} |", flush=True)


if __name__ == "__main__":
    main()
