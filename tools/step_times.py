"""Median train-step time (ms) of each method's default model on Handwritten (batch 64), eager.

    python tools/step_times.py dmrnet,mim 200     (PYTHONPATH=<checkout> to time another)
"""
import sys, time, statistics, torch
torch.set_num_threads(1)
from robustmm_fast.models.registry import get_method
from robustmm_fast.data.handwritten import load_handwritten
import robustmm_fast
data = load_handwritten(seed=1111)
idx = data.splits["train"][:64]
batch = data.batch(idx)
out = {}
for name in sys.argv[1].split(","):
    method = get_method(name)
    config = method.config(None, {})
    torch.manual_seed(0)
    model = method.build(data, config)
    recipe = method.recipe(config)
    opts = recipe.optimizers(model)
    stage = recipe.stage(recipe.epochs - 1)
    def step():
        recipe.train_step(model, batch, opts, epoch=recipe.epochs - 1, step=0, stage=stage)
    for _ in range(10): step()
    ts = []
    for _ in range(int(sys.argv[2]) if len(sys.argv) > 2 else 60):
        t = time.perf_counter(); step(); ts.append(time.perf_counter() - t)
    out[name] = statistics.median(ts) * 1e3
print(robustmm_fast.__file__, {k: round(v, 3) for k, v in out.items()})
