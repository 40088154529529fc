"""Every number behind tests/test_cyin_mechanism.py's two checks (all seeds and modalities,
not only up to the first failing assertion), for a config variant.

    python tools/cyin_mechanism_numbers.py                       # the test's CONFIG
    python tools/cyin_mechanism_numbers.py fusion=joint memory_layers=0
"""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import torch

from robustmm_fast.data.synthetic import make_synthetic
from robustmm_fast.missing import random_missing
from robustmm_fast.models.registry import get_method
from robustmm_fast.train.engine import fit
from robustmm_fast.train.evaluate import evaluate

spec = importlib.util.spec_from_file_location(
    "mech", Path(__file__).resolve().parents[1] / "tests" / "test_cyin_mechanism.py")
mech = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mech)


def main(argv):
    over = {}
    for arg in argv:
        key, _, value = arg.partition("=")
        try:
            over[key] = json.loads(value)
        except json.JSONDecodeError:
            over[key] = value
    config = {**mech.CONFIG, **over}
    torch.set_num_threads(1)
    print(f"config overrides: {over or 'none'}")
    print("| seed | modality | MSE trans/mean fill | MSE trans/zero fill | cos trans | cos mean fill |")
    print("|---|---|---|---|---|---|")
    gaps = []
    for seed in mech.SEEDS:
        ds = make_synthetic(seed=seed, **mech.DATA)
        with_t = fit(get_method("cyin"), ds, config={**config, "translate": True}, seed=seed, progress=False)
        without = fit(get_method("cyin"), ds, config={**config, "translate": False}, seed=seed,
                      progress=False)
        for m, (mse, cos) in mech.reconstruction_stats(with_t.model, ds).items():
            print(f"| {seed} | {m} | {mse['translation'] / mse['mean']:.3f} | "
                  f"{mse['translation'] / mse['zero']:.3f} | {cos['translation']:.3f} | "
                  f"{cos['mean']:.3f} |")
        mask = random_missing(ds.split_size("test"), ds.num_modalities, mech.ETA, seed)
        mae_t = evaluate(with_t.model, ds, "test", present=mask)["MAE"]
        mae_f = evaluate(without.model, ds, "test", present=mask)["MAE"]
        gaps.append((seed, mae_t, mae_f))
    print("\n| seed | test MAE with translation | without | gap |\n|---|---|---|---|")
    for seed, a, b in gaps:
        print(f"| {seed} | {a:.3f} | {b:.3f} | {b - a:.3f} |")
    print(f"mean gap {sum(b - a for _, a, b in gaps) / len(gaps):.3f}")


if __name__ == "__main__":
    main(sys.argv[1:])
