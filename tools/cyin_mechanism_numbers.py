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
import torch.nn.functional as F

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
        model = with_t.model
        with torch.no_grad():
            train, test = ds.batch(ds.splits["train"]), ds.batch(ds.splits["test"])
            z_train = model(train.inputs, train.present).extras["latents"]
            z_test = model(test.inputs, test.present).extras["latents"]
            for i, m in enumerate(ds.modalities):
                present = torch.ones_like(test.present)
                present[:, i] = False
                rec, z = model(test.inputs, present).extras["reconstructed"][i], z_test[m]
                fill = z_train[m].mean(0, keepdim=True).expand_as(z)
                t, zero, mean = ((rec - z).pow(2).mean(), z.pow(2).mean(),
                                 (fill - z).pow(2).mean())
                cos_t = F.cosine_similarity(rec, z, dim=-1).mean()
                cos_m = F.cosine_similarity(fill, z, dim=-1).mean()
                print(f"| {seed} | {m} | {t / mean:.3f} | {t / zero:.3f} | {cos_t:.3f} | "
                      f"{cos_m:.3f} |")
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
