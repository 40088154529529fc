"""Median train-step time (ms) of each method's default model on Handwritten (batch 64), eager.

    python tools/step_times.py dmrnet,mim 200     (PYTHONPATH=<checkout> to time another)
"""
import sys

import torch

import robustmm_fast
from compile_steps import measure  # the same model, batch and step as the compile timings

torch.set_num_threads(1)
steps = int(sys.argv[2]) if len(sys.argv) > 2 else 60
times = {name: measure(name, False, steps)[1] * 1e3 for name in sys.argv[1].split(",")}
print(robustmm_fast.__file__, {k: round(v, 3) for k, v in times.items()})
