"""Measure the effect of each place CyIN's defaults depart from the official code (issue 13).

    OMP_NUM_THREADS=1 python tools/measure_cyin_departures.py [--seeds 1111-1113]
        [--out /tmp/cyin_departures] [--md benches/results/cyin-departures-handwritten-DATE.md]
        [--only NAME ...] [--reuse]

Each variant is one `robustmm run --methods cyin` on Handwritten (the `handwritten` preset,
protocol complete+subsets+eta:0.5) with the --set overrides listed below; the table gives, per
variant, the test accuracy on complete data, the mean over the 63 fixed subsets and at a
dataset-level missing rate of 0.5, mean ± std (unbiased) over the seeds, as `robustmm run`
reports them, plus the wall time. --reuse takes a variant's earlier results from --out.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from departures import pct, run_variant

# name -> (--set overrides, what it measures)
VARIANTS = {
    "defaults": ([], "ours: handwritten preset (fusion mult, ours for every quirk option)"),
    "fusion=joint": (["fusion=joint"], "our joint fusion (one softmax over all sources per "
                                       "target, memory of width d) instead of MulT's"),
    "official": (["official=true"], "every quirk official: sigmoid decoders, summed "
                                    "translations, z sampled at test, a sample per IB term, "
                                    "the last epoch's model"),
    "decoder_sigmoid=true": (["decoder_sigmoid=true"], "defaults, official sigmoid decoders"),
    "combine=sum": (["combine=sum"], "defaults, official summed translations"),
    "stochastic_test=true": (["stochastic_test=true"], "defaults, official sampling at test"),
    "ib_samples=per_pair": (["ib_samples=per_pair"], "defaults, official sample per IB term"),
    "select_last=true": (["select_last=true"], "defaults, official last-epoch model"),
    "objective=grouped": (["objective=grouped"], "the pre-issue-13 translation objective"),
    "modality_dropout=0": (["modality_dropout=0"], "the official complete-data training "
                                                   "(the preset's modality dropout 0.3 off)"),
}


PROTOCOL = "complete+subsets+eta:0.5"


def measure(seeds: str, out_root: Path, only: list[str], reuse: bool = False) -> list[dict]:
    rows = []
    for name, (sets, what) in VARIANTS.items():
        if only and name not in only:
            continue
        result, wall, cmd = run_variant("cyin", PROTOCOL, seeds,
                                        out_root / name.replace("=", "-"), sets, reuse)
        summary = result["summary"]["cyin"]
        eta = next(v for k, v in summary.items() if k.startswith("eta"))
        rows.append({"name": name, "what": what, "complete": summary["complete"],
                     "subsets": summary["subset_mean"], "eta": eta, "wall": wall,
                     "command": cmd})
        print(f"{name:24s} complete {pct(summary['complete'])}  subsets "
              f"{pct(summary['subset_mean'])}  eta 0.5 {pct(eta)}  ({wall:.0f} s)", flush=True)
    return rows


def table(rows: list[dict], seeds: str) -> str:
    lines = [f"CyIN on Handwritten (`handwritten` preset), seeds {seeds}: test accuracy, mean ± "
             "std (unbiased) over the seeds; 'mean of subsets' is the mean over the 63 fixed "
             "non-empty view combinations; η = 0.5 the dataset-level missing rate.", "",
             "| variant | --set | complete (%) | mean of subsets (%) | η=0.5 (%) | wall (s) | "
             "what |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        sets = " ".join(f"`{s}`" for s in VARIANTS[r["name"]][0]) or "(none)"
        lines.append(f"| {r['name']} | {sets} | {pct(r['complete'])} | {pct(r['subsets'])} | "
                     f"{pct(r['eta'])} | {r['wall']:.0f} | {r['what']} |")
    lines += ["", "Commands:", "", "```"] + [r["command"] for r in rows] + ["```"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="1111-1113")
    ap.add_argument("--out", default="/tmp/cyin_departures", type=Path)
    ap.add_argument("--md", type=Path, help="write the table (markdown) here")
    ap.add_argument("--only", nargs="*", default=[], choices=list(VARIANTS))
    ap.add_argument("--reuse", action="store_true")
    args = ap.parse_args(argv)
    rows = measure(args.seeds, args.out, args.only, args.reuse)
    text = table(rows, args.seeds)
    print(text)
    if args.md:
        args.md.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
