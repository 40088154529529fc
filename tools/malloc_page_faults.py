"""Page faults and kernel time of a large CPU training step, with glibc's default malloc and
with robustmm_fast.train.keep_freed_memory (the numbers in train/memory.py and the README).

    python tools/malloc_page_faults.py            # glibc's default
    python tools/malloc_page_faults.py --keep     # keep freed memory (what `robustmm` does)

One CyIN training step (its default config: the official MOSI widths, stage 2) on a batch of
128 synthetic MOSI-shaped samples (50 tokens; text 768, audio 5, vision 20), one thread, three
times; per step: wall seconds, user and system CPU seconds and minor page faults (getrusage).
2026-12-07, 2-core VM: default 45-75 s, sys 12-20 s, 3.1-3.6 M faults; --keep, from the second
step: 29.5 s, sys 0.6 s, 0.24 M faults.
"""
import argparse
import resource
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="call keep_freed_memory() first")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    if args.keep:
        from robustmm_fast.train import keep_freed_memory
        print("keep_freed_memory:", keep_freed_memory())
    torch.set_num_threads(1)
    from robustmm_fast.data import make_synthetic
    from robustmm_fast.models import get_method
    data = make_synthetic(preset="mosi", num_samples=2000, seed=1111)
    method = get_method("cyin")
    config = method.config(data.name, {"epochs": 1})
    torch.manual_seed(0)
    model, recipe = method.build(data, config), method.recipe(config)
    optimizers = recipe.optimizers(model)
    model.train()
    batch = next(iter(data.batches("train", recipe.batch_size, shuffle=False)))
    stage = recipe.stage(0)
    for step in range(args.steps):
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        recipe.train_step(model, batch, optimizers, epoch=0, step=step, stage=stage)
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        print(f"step {step}: {time.perf_counter() - t0:.2f} s, user {r1.ru_utime - r0.ru_utime:.2f}"
              f" s, sys {r1.ru_stime - r0.ru_stime:.2f} s, "
              f"{r1.ru_minflt - r0.ru_minflt:,} minor faults", flush=True)


if __name__ == "__main__":
    main()
