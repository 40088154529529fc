"""Measure the effect of each of MIM's default departures from the official code on Handwritten.

    OMP_NUM_THREADS=1 python tools/measure_mim_departures.py --out /tmp/mim_departures \
        [--seeds 1111-1113] [--only NAME ...] [--markdown benches/results/FILE.md]

Runs `robustmm run --methods mim --protocol complete+subsets` once per variant (the
defaults, each departure switched to the official value alone, all of them at once), reads each
results.json and prints (or writes) one table: test accuracy on the complete test set and the
mean over the 63 non-empty modality subsets, mean ± std (ddof 1) over the seeds, with the exact
command of every row. A variant whose results.json exists is read, not re-run.
"""
from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

# name: (--set overrides, what it switches)
VARIANTS = {
    "defaults": ([], "ours: every departure at our value"),
    "stochastic_test": (["stochastic_test=true"],
                        "official: hard-concrete noise at test too (model.py:144-161)"),
    "inter_weighting": (["inter_weighting=teacher"],
                        "official: inter = (10 alpha_t)^2 mean_s KL_s (train.py:45-50)"),
    "gates_from_main": (["gates_from_main=true"],
                        "official: main losses reach the UPN and the encoders through it; the "
                        "main Adam also steps the UPN (train.py:62, 140-150)"),
    "mult_encoder": (["mult_encoder=true"],
                     "official: MulT encoder (sqrt(H) scale, FFN 4H, xavier) (transformer.py)"),
    "mask_padding": (["mask_padding=false"],
                     "official: padded steps are steps (no padding on Handwritten: a no-op)"),
    "official": (["official=true"], "all five departures at the official value"),
    "official_det_test": (["official=true", "stochastic_test=false"],
                          "official=true but deterministic test gates"),
    "pool_tanh": (["pool_activation=tanh"],
                  "pool_activation tanh (official `activate` unpublished; a commented candidate)"),
    "pool_relu": (["pool_activation=relu"],
                  "pool_activation relu (official `activate` unpublished; a commented candidate)"),
    "official_hparams": (["official=true", "epochs=100", "batch_size=16", "lr=1e-5",
                          "weight_decay=0.0", "modality_dropout=0.0", "hidden=80", "layers=3",
                          "heads=5", "conv_kernel=3", "dropout=0.3", "attn_dropout=0.5",
                          "embed_dropout=0.2"],
                         "official=true with the official MOSI numbers (README.md:37-41, "
                         "model.py:76-89) on Handwritten"),
}


def command(name: str, out: Path, seeds: str) -> list[str]:
    sets = [a for kv in VARIANTS[name][0] for a in ("--set", kv)]
    return ["robustmm", "run", "--methods", "mim", "--seeds", seeds, "--protocol",
            "complete+subsets", "--out", str(out / name), "--no-progress", *sets]


def summarize(path: Path) -> tuple[tuple[float, float], tuple[float, float], int]:
    """((complete mean, std), (mean of subsets mean, std)) in %, and the number of seeds."""
    per_seed = json.loads(path.read_text())["per_seed"]["mim"]
    complete, subsets = [], []
    for points in per_seed.values():
        complete.append(100 * points["complete"]["accuracy"])
        subs = [v["accuracy"] for k, v in points.items() if k.startswith("subset:")]
        subsets.append(100 * sum(subs) / len(subs))
    stat = lambda xs: (statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0)  # noqa
    return stat(complete), stat(subsets), len(per_seed)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seeds", default="1111-1113")
    ap.add_argument("--only", nargs="*", choices=list(VARIANTS), default=None)
    ap.add_argument("--markdown", type=Path, default=None, help="also write the table here")
    args = ap.parse_args(argv)
    names = args.only or [n for n in VARIANTS if n != "official_hparams"]
    rows = []
    for name in names:
        cmd = command(name, args.out, args.seeds)
        result = args.out / name / "results.json"
        wall = None
        if not result.exists():
            t0 = time.time()
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            wall = time.time() - t0
        (c, cs), (s, ss), n = summarize(result)
        rows.append((name, c, cs, s, ss, n, wall, cmd))
        print(f"{name:18s} complete {c:6.2f} ± {cs:4.2f}   subsets {s:6.2f} ± {ss:4.2f}"
              f"   ({n} seeds{'' if wall is None else f', {wall:.0f} s'})", flush=True)
    base = next((r for r in rows if r[0] == "defaults"), None)
    lines = ["| variant | switches | complete (%) | mean of 63 subsets (%) | Δ complete | "
             "Δ subsets |", "|---|---|---|---|---|---|"]
    for name, c, cs, s, ss, n, _, _ in rows:
        d = ("", "") if base is None or name == "defaults" else (f"{c - base[1]:+.2f}",
                                                                  f"{s - base[3]:+.2f}")
        lines.append(f"| {name} | {VARIANTS[name][1]} | {c:.2f} ± {cs:.2f} | {s:.2f} ± {ss:.2f} "
                     f"| {d[0]} | {d[1]} |")
    lines += ["", "Commands (OMP_NUM_THREADS=1):", "", "```"]
    lines += [shlex.join(r[7]) for r in rows] + ["```"]
    table = "\n".join(lines)
    print("\n" + table)
    if args.markdown is not None:
        args.markdown.write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
