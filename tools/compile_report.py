"""Graph breaks of each method's forward under torch.compile (torch._dynamo.explain), on the
Handwritten data with each method's default configuration, train mode, batch 64, called as
the recipes call it in the last epoch (labels, so the losses too, and the stage).

    python tools/compile_report.py [--method cyin ...]

Prints per method: graphs, graph breaks and their reasons (file:line), and the time dynamo
took to trace the forward (explain runs no inductor, so this is not the full compile time).
"""
import argparse
import time

import torch

from robustmm_fast.data.handwritten import load_handwritten
from robustmm_fast.models.registry import METHODS, get_method


def explain(name: str, batch_size: int = 64):
    data = load_handwritten(seed=1111)
    batch = data.batch(data.splits["train"][:batch_size])
    method = get_method(name)
    config = method.config(None, {})
    torch.manual_seed(0)
    model = method.build(data, config).train()
    recipe = method.recipe(config)
    stage = recipe.stage(recipe.epochs - 1)
    torch._dynamo.reset()
    start = time.perf_counter()
    # the training call the recipes make: labels given, so every loss term is traced too
    result = torch._dynamo.explain(model)(batch.inputs, batch.present, labels=batch.labels,
                                          padding=batch.padding, stage=stage)
    return result, time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--method", action="append", choices=list(METHODS))
    args = parser.parse_args()
    for name in args.method or list(METHODS):
        result, seconds = explain(name)
        print(f"{name}: {result.graph_count} graph(s), {result.graph_break_count} graph "
              f"break(s), traced in {seconds:.1f} s")
        for reason in result.break_reasons:
            frame = reason.user_stack[-1] if reason.user_stack else None
            where = f"{frame.filename.split('robustmm_fast/')[-1]}:{frame.lineno}" if frame else "?"
            print(f"  break at {where}: {reason.reason.splitlines()[0][:160]}")


if __name__ == "__main__":
    main()
