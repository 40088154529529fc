"""One measurement of `robustmm bench harness`, run as a script in its own process so that the
same code times this package and a baseline checkout (whichever `robustmm_fast` PYTHONPATH
puts first). It uses only what both engines have: the registry, `train.fit`, `run.score`,
`run.protocol_masks`, `data.make_synthetic` / `data.load_handwritten`.

    python harness_probe.py '{"task": "train", "data": "handwritten", "method": "cyin"}'

prints one JSON line: the task's fields and its measurements (seconds, rows, rows per second,
and which robustmm_fast it imported).

Tasks:
  train  fit() for one epoch per stage (EPOCHS below; DMRNet: one warm-up and one hard epoch,
         UME-MMA: one unimodal and one fine-tuning epoch), checkpoints written, validation
         after each epoch. rows_per_s: training rows over the fastest epoch's time (its steps
         and its validation: the steady state); fit_rows_per_s: over the whole fit (model
         build, first-call warm-up and the last checkpoint write included).
  score  an untrained model (seed 1111) scored on every mask of complete+subsets+eta over the
         test split with `run.score` (the numbers are meaningless, the time is not).
  flops  the floating-point operations of one training step (batch of the method's size) and
         of one scoring forward per row, by torch.utils.flop_counter (matmuls, convolutions,
         SDPA; elementwise work and our custom attention op are not counted).
Data: "handwritten"; "mosi:N" (synthetic MOSI-shaped: text 50x768, audio 50x5, vision 50x20,
regression, N samples); "m:M" (synthetic, M modalities of 20 tokens x 32 features,
classification, 2,000 samples).
"""
from __future__ import annotations

import json
import sys
import tempfile
import time

# per method: the config keys that make fit() run one epoch per stage
EPOCHS = {"ume_mma": {"unimodal_epochs": 1, "finetune_epochs": 1},
          "dmrnet": {"epochs": 2, "warmup_epochs": 1}}
ONE_EPOCH = {"epochs": 1}


def load(spec: str, seed: int = 1111):
    from robustmm_fast import data
    kind, _, arg = spec.partition(":")
    if kind == "handwritten":
        return data.load_handwritten(seed=seed)
    if kind == "mosi":
        return data.make_synthetic(preset="mosi", num_samples=int(arg), seed=seed)
    if kind == "m":
        mods = {f"m{i}": (20, 32) for i in range(int(arg))}
        return data.make_synthetic(modalities=mods, num_samples=2000, task="classification",
                                   seed=seed)
    raise ValueError(f"unknown data {spec!r}")


def _train(task: dict, dataset) -> dict:
    from robustmm_fast.models import get_method
    from robustmm_fast.train import fit
    method = task["method"]
    overrides = EPOCHS.get(method, ONE_EPOCH)
    n_train = int(dataset.splits["train"].numel())
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        result = fit(get_method(method), dataset, config=dict(overrides), seed=1111,
                     out_dir=out, progress=False)
        seconds = time.perf_counter() - t0
    epochs = len(result.history)
    fastest = min(h["time"] for h in result.history)  # one epoch: steps + validation
    return {"seconds": seconds, "rows": n_train * epochs, "epochs": epochs,
            "fit_rows_per_s": n_train * epochs / seconds, "rows_per_s": n_train / fastest}


def _model(task: dict, dataset):
    import torch
    from robustmm_fast.models import get_method
    method = get_method(task["method"])
    torch.manual_seed(1111)
    return method, method.build(dataset, method.config(dataset.name))


def _score(task: dict, dataset) -> dict:
    from robustmm_fast import run
    _, model = _model(task, dataset)
    model.eval()
    masks = run.protocol_masks(dataset, run.parse_protocol("complete+subsets+eta"), 1111)
    rows = sum(int(m.shape[0]) for m in masks.values())
    t0 = time.perf_counter()
    run.score(model, dataset, masks)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "rows": rows, "masks": len(masks), "rows_per_s": rows / seconds}


def _flops(task: dict, dataset) -> dict:
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    method, model = _model(task, dataset)
    config = method.config(dataset.name)
    recipe = method.recipe(config)
    optimizers = recipe.optimizers(model)
    batch = next(iter(dataset.batches("train", recipe.batch_size, shuffle=False)))
    stage = recipe.stage(recipe.epochs - 1)  # the last stage: every loss term on
    model.train()
    counter = FlopCounterMode(display=False)
    with counter:
        recipe.train_step(model, batch, optimizers, epoch=recipe.epochs - 1, step=0, stage=stage)
    train_step = counter.get_total_flops()
    model.eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(batch.inputs, batch.present, padding=batch.padding)
    return {"train_step_flops": train_step, "batch_size": len(batch), "epochs": recipe.epochs,
            "n_train": dataset.split_size("train"), "n_valid": dataset.split_size("valid"),
            "n_test": dataset.split_size("test"), "modalities": dataset.num_modalities,
            "train_flops_per_row": train_step / len(batch),
            "score_flops_per_row": counter.get_total_flops() / len(batch)}


def main(argv=None) -> None:
    task = json.loads((argv or sys.argv)[1])
    import torch
    torch.set_num_threads(int(task.get("threads", 1)))
    import robustmm_fast
    try:  # what `robustmm run` does in its processes (this engine; the baseline has none)
        from robustmm_fast.train.memory import keep_freed_memory
        malloc = keep_freed_memory()
    except ImportError:
        malloc = False
    dataset = load(task["data"])
    out = {"train": _train, "score": _score, "flops": _flops}[task["task"]](task, dataset)
    print(json.dumps({**task, **out, "package": robustmm_fast.__file__,
                      "keep_freed_memory": malloc}), flush=True)


if __name__ == "__main__":
    main()
