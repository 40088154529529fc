"""`robustmm bench models` without the torch.compile columns (compiling CyIN's official model
takes minutes per case on 2 CPU cores): the fused and reference backends, eager.

    python tools/bench_models_eager.py --method cyin --method mim --output FILE
    PYTHONPATH=/path/to/an/older/checkout python tools/bench_models_eager.py ...  # before/after

Works on any checkout with robustmm_fast.bench.models (it filters implementations()).
"""
import sys

from robustmm_fast import cli
from robustmm_fast.bench import models

_implementations = models.implementations


def eager_only(device):
    impls, ours, baselines = _implementations(device)
    keep = [i for i in impls if not i.name.startswith("compile(")]
    return keep, ours, tuple(b for b in baselines if not b.startswith("compile("))


models.implementations = eager_only

if __name__ == "__main__":
    sys.exit(cli.main(["bench", "models", *sys.argv[1:]]))
