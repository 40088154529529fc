"""The `robustmm` command.

    robustmm run     the main job: train every method on the embedded Handwritten data and score
                     it complete, on every modality subset and at missing rates 0.1 ... 0.5
    robustmm train   train one method (--method) on --data for --seeds, score it on --protocol
    robustmm eval    score a trained model (best.pt) on --data with --protocol
    robustmm bench   time an op against eager, torch.compile and PyTorch peers; `harness`: the
                     training harness beside a baseline revision
    robustmm info    versions and backend availability
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import sys

BENCH_OPS = ("reparam_kl", "cycle_loss", "masked_attention", "models", "harness")
BENCH_METHODS = ("cyin", "cyin_joint", "dmrnet", "mim")  # robustmm_fast.bench.models.METHODS (imported lazily)


_HARNESS_DEFAULTS = {"baseline": "a533ae7", "data": None, "no_main_job": False,
                     "max_seconds": 300.0}  # baseline: bench/harness.py DEFAULT_BASELINE


def _bench_harness(args) -> int:
    """robustmm bench harness: the engine's training and scoring throughput and the main job's
    wall time, beside a baseline revision (robustmm_fast.bench.harness)."""
    from pathlib import Path

    from .bench import harness
    from .models.registry import METHODS
    from .usage import UsageError, check_out
    for option in ("shape", "distance", "mask"):
        if getattr(args, option):
            raise UsageError(f"--{option} does not apply to harness")
    for option, default in (("device", "cpu"), ("dtype", "float32"), ("repeat", 7)):
        if getattr(args, option) != default:  # the harness is the CPU job of `robustmm run`
            raise UsageError(f"--{option} does not apply to harness (it measures the CPU "
                             "harness, fp32, one measurement per process)")
    if not args.max_seconds > 0:
        raise UsageError(f"--max-seconds: expected a number > 0, got {args.max_seconds}")
    methods = tuple(args.methods or harness.METHODS)
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise UsageError(f"--method: unknown method(s) {unknown}; known: {sorted(METHODS)}")
    data = tuple(d for part in (args.data or [",".join(harness.DEFAULT_DATA)])
                 for d in part.split(",") if d)
    for d in data:
        kind, _, arg = d.partition(":")
        if not (d == "handwritten" or kind in ("mosi", "m") and arg.isdigit() and int(arg) >= 1):
            raise UsageError(f"--data: expected handwritten, mosi:N or m:M, got {d!r}")
    out = raw = None
    if args.output:
        out = Path(args.output)
        if out.is_dir():
            raise UsageError(f"--output {args.output}: is a directory (expected a file name)")
        check_out(str(out.parent), "--output")
        raw = out.with_suffix(".jsonl")  # every measurement as it is made, beside the report
        raw.unlink(missing_ok=True)
    baseline = None if args.baseline.lower() == "none" else args.baseline
    try:
        report = harness.run_harness_bench(baseline=baseline, data=data, methods=methods,
                                           with_main_job=not args.no_main_job,
                                           max_seconds=args.max_seconds,
                                           log=lambda s: print(s, flush=True), raw=raw)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    print()
    print(report)
    if out is not None:
        out.write_text(report + "\n")
        print(f"\nwritten to {out}")
    return 0


def _bench(args) -> int:
    if args.op == "harness":
        return _bench_harness(args)
    import torch

    from .bench import format_table, run_cases
    from .bench.runner import peak_bandwidth, timing_method
    module = importlib.import_module(f"robustmm_fast.bench.{args.op}")
    from .usage import UsageError, check_device, check_out
    device = check_device(args.device)
    if args.repeat < 1:
        raise UsageError(f"--repeat: expected an integer >= 1, got {args.repeat}")
    if args.output:
        from pathlib import Path
        if Path(args.output).is_dir():
            raise UsageError(f"--output {args.output}: is a directory (expected a file name)")
        check_out(str(Path(args.output).parent), "--output")
    dtype = getattr(torch, args.dtype)
    kwargs = {"dtype": dtype}
    if args.shape:
        if args.op in ("masked_attention", "models"):
            raise UsageError(f"--shape does not apply to {args.op}")
        kwargs["shapes"] = args.shape
    if args.methods and set(args.methods) - set(BENCH_METHODS):
        raise UsageError(f"--method: {args.op} times {list(BENCH_METHODS)}, got {args.methods}")
    for option in ("baseline", "data", "no_main_job", "max_seconds"):
        if getattr(args, option) != _HARNESS_DEFAULTS[option]:
            raise UsageError(f"--{option.replace('_', '-')} applies to harness only")
    for option, name in ((args.distance, "distances"), (args.mask, "masks"),
                         (args.methods, "methods")):
        if option:
            if name not in inspect.signature(module.cases).parameters:
                raise UsageError(f"--{name[:-1]} does not apply to {args.op}")
            kwargs[name] = tuple(option)
    cases = module.cases(**kwargs)
    impls, ours, baselines = module.implementations(device)
    peak = peak_bandwidth(device)
    header = _header(args, device, peak, timing_method(device, args.repeat))
    print(header, flush=True)
    results = run_cases(cases, impls, device, repeat=args.repeat, memory=not args.no_memory,
                        log=lambda s: print(s, flush=True))
    tables = format_table(results, ours, baselines, peak)
    print()
    print(tables)
    if args.output:
        from pathlib import Path
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(f"{header}\n\n{tables}\n")
        print(f"\nwritten to {out}")
    return 0


def _shape(text: str) -> tuple[int, ...]:
    """'64x50x128' -> (64, 50, 128)."""
    try:
        shape = tuple(int(x) for x in text.lower().split("x"))
    except ValueError:
        shape = ()
    if not shape or any(d <= 0 for d in shape):
        raise argparse.ArgumentTypeError(f"expected positive sizes joined by 'x', e.g. 64x50x128, got {text!r}")
    return shape


def _versions() -> str:
    import importlib.metadata

    import torch
    from . import __version__
    parts = [f"robustmm_fast {__version__}", f"torch {torch.__version__}"]
    if torch.version.cuda:
        parts.append(f"CUDA {torch.version.cuda}")
    for dist in ("triton", "pytorch-triton"):
        try:
            parts.append(f"triton {importlib.metadata.version(dist)}")
            break
        except importlib.metadata.PackageNotFoundError:
            continue
    else:
        parts.append("triton not installed")
    return ", ".join(parts)


def _header(args, device, peak, timing) -> str:
    """The report's first line: what ran where, with which versions, when, and how it was timed."""
    from datetime import datetime, timezone

    import torch
    where = f"{device} ({_device_name(device)}"
    where += f", peak DRAM bandwidth {peak / 1e9:.0f} GB/s)" if peak else ")"
    return (f"robustmm bench {args.op} --dtype {args.dtype} on {where}; {_versions()}; "
            f"{torch.get_num_threads()} CPU threads; "
            f"{datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}; {timing}")


def _device_name(device) -> str:
    import platform

    import torch
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def _seeds(text: str) -> list[int]:
    """'1111,1112' or '1111-1115' -> [ints]."""
    try:
        if "-" in text:
            lo, hi = (int(x) for x in text.split("-", 1))
            seeds = list(range(lo, hi + 1))
        else:
            seeds = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        seeds = []
    if not seeds:
        raise argparse.ArgumentTypeError(f"expected seeds like 1111,1112 or 1111-1115, got {text!r}")
    bad = [s for s in seeds if not 0 <= s < 2 ** 32]  # numpy's and torch's seed range
    if bad:
        raise argparse.ArgumentTypeError(f"seeds must be integers in [0, 2**32), got {bad[0]}")
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"a seed is given twice in {text!r}")
    return seeds


def _positive(flag: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} must be an integer >= 1, got {text!r}") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"{flag} must be an integer >= 1, got {value}")
        return value
    parse.__name__ = flag.lstrip("-")
    return parse


def _harness_args(p, *, default_protocol: str, default_out: str) -> None:
    from .run import DEFAULT_SEEDS
    p.add_argument("--data", default="handwritten",
                   help="handwritten (embedded, default) | mmsa:PATH.pkl | avmnist:DIR | "
                        "synthetic[:mosi|mosei]")
    p.add_argument("--protocol", default=default_protocol,
                   help="missing-modality points to score, joined by '+' (CyIN's protocols): "
                        "complete; subsets (every non-empty combination, one per point); "
                        "eta[:0.1,0.3] (dataset-level missing rate: fraction of missing "
                        "entries, each sample keeps >= 1, eta >= (M-1)/M keeps exactly one; "
                        "default 0.1..0.5); instance:P[,P] (instance-level: with probability "
                        "P a sample gets one of the 2^M-2 incomplete patterns, uniformly) "
                        f"(default {default_protocol})")
    p.add_argument("--seeds", type=_seeds, default=None,
                   help="e.g. 1111,1112 or 1111-1115 (default "
                        f"{','.join(map(str, DEFAULT_SEEDS))}; --quick: {DEFAULT_SEEDS[0]})")
    p.add_argument("--out", default=default_out, help="output directory (default %(default)s)")
    p.add_argument("--config", metavar="FILE", help="hyperparameters, .toml or .json (a table per "
                                                    "method allowed)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", dest="overrides",
                   help="override one hyperparameter (repeatable), e.g. --set lr=1e-3")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--jobs", type=_positive("--jobs"), default=None,
                   help="(method, seed) cells trained at once, each in its own process (default: "
                        "one per usable CPU core, 1 on a GPU); the table depends only on "
                        "--threads, not on --jobs")
    p.add_argument("--threads", type=_positive("--threads"), default=None,
                   help="intra-op threads per cell (default: cores // jobs, at least 1; with "
                        "--jobs 1, torch's default)")


def _harness(args) -> int:
    from .config import load_config, parse_overrides
    from .run import DEFAULT_SEEDS, run
    from .usage import (UsageError, check_configs, check_data, check_device, check_methods,
                        check_out, check_protocol)
    try:
        config_file = load_config(args.config)
        overrides = parse_overrides(args.overrides)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.command == "run":
        methods = check_methods(args.methods, "--methods") if args.methods else None
    else:
        methods = check_methods([args.method], "--method")
    quick = getattr(args, "quick", False)
    seeds = args.seeds or list(DEFAULT_SEEDS[:1] if quick else DEFAULT_SEEDS)
    check_protocol(args.protocol)
    device = check_device(args.device)
    dataset = check_data(args.data, seeds[0])
    from .models.registry import METHODS
    check_configs(methods or list(METHODS), dataset, overrides, config_file, args.config)
    check_out(args.out)
    run(methods, data=args.data, seeds=seeds, protocol=args.protocol, out=args.out,
        quick=quick, overrides=overrides, config_file=config_file,
        device=str(device), progress=not args.no_progress, first_dataset=dataset,
        jobs=args.jobs, threads=args.threads,
        torchrun="cells" if args.command == "run" else "ddp")
    return 0


def _eval(args) -> int:
    from .run import protocol_masks, score
    from .models.registry import METHODS, get_method
    from .train import load_trained
    from .usage import UsageError, check_checkpoint, check_data, check_device, check_protocol
    points = check_protocol(args.protocol)
    device = check_device(args.device)
    saved = check_checkpoint(args.checkpoint).get("method")
    if not isinstance(saved, str) or not (saved.startswith("custom:") or saved in METHODS):
        raise UsageError(f"checkpoint {args.checkpoint}: its method {saved!r} is not one of "
                         f"ours ({', '.join(sorted(METHODS))})")
    method = None if saved.startswith("custom:") else get_method(saved)
    rows = []
    for i, seed in enumerate(args.seeds):
        dataset = check_data(args.data, seed)
        try:
            model = load_trained(args.checkpoint, dataset, method=method)
        except (ValueError, TypeError, KeyError) as exc:
            if i:
                raise
            raise UsageError(f"checkpoint {args.checkpoint} on --data {args.data}: {exc}") from None
        scores = score(model, dataset, protocol_masks(dataset, points, seed), device=str(device))
        for point, metrics in scores.items():
            rows.append((seed, point, metrics))
    import json
    for seed, point, metrics in rows:
        print(f"seed {seed} {point:<28} " + json.dumps({k: round(v, 4) if isinstance(v, float)
                                                        else v for k, v in metrics.items()}))
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line: `robustmm <command>: error: ...` (exit 2)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def main(argv=None) -> int:
    parser = _Parser(prog="robustmm", description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true",
                        help="show the Python traceback for errors in the arguments too")
    sub = parser.add_subparsers(dest="command", required=True)
    run_p = sub.add_parser("run", help="the main job: every method on Handwritten, complete, "
                                       "every subset and eta = 0.1..0.5, one table")
    _harness_args(run_p, default_protocol="complete+subsets+eta", default_out="robustmm-results")
    run_p.add_argument("--methods", nargs="+", metavar="METHOD",
                       help="methods to run (default: every registered method)")
    run_p.add_argument("--quick", action="store_true",
                       help="smoke run: one seed, at most 3 epochs per stage (about a minute)")
    train_p = sub.add_parser("train", help="train one method and score it")
    _harness_args(train_p, default_protocol="complete", default_out="robustmm-train")
    train_p.add_argument("--method", required=True, help="e.g. late_fusion, ume_mma")
    eval_p = sub.add_parser("eval", help="score a trained model (best.pt) on a protocol")
    eval_p.add_argument("checkpoint", help="a best.pt written by robustmm train/run")
    eval_p.add_argument("--data", default="handwritten")
    eval_p.add_argument("--protocol", default="complete+subsets+eta",
                        help="as for run/train: complete, subsets, eta[:v,...], instance:v[,...] "
                             "joined by '+' (default %(default)s)")
    eval_p.add_argument("--seeds", type=_seeds, default=[1111],
                        help="seeds of the data split and masks (default 1111)")
    eval_p.add_argument("--device", default="cpu")
    sub.add_parser("info", help="versions and backend availability")
    bench = sub.add_parser("bench", help="time an op against eager, torch.compile and PyTorch "
                                         "peers; `models`: a method's training step; `harness`: the "
                                         "training harness beside a baseline revision")
    bench.add_argument("op", choices=BENCH_OPS)
    bench.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    bench.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16", "float64"))
    bench.add_argument("--shape", action="append", type=_shape, help="override shapes, e.g. --shape 64x50x128 (repeatable)")
    bench.add_argument("--distance", action="append", choices=("mse", "l1", "smooth_l1", "cosine"),
                       help="cycle_loss: only these distances (repeatable)")
    bench.add_argument("--mask", action="append", choices=("present", "none"),
                       help="cycle_loss: only these row masks (repeatable)")
    bench.add_argument("--method", action="append", dest="methods",
                       help=f"models: only these methods, of {', '.join(BENCH_METHODS)}; "
                            "harness: only these registered methods (repeatable)")
    bench.add_argument("--baseline", default=_HARNESS_DEFAULTS["baseline"], metavar="REF",
                       help="harness: the git revision measured beside this engine (default "
                            "%(default)s, the engine before issue 15; 'none': this engine alone)")
    bench.add_argument("--data", action="append", default=_HARNESS_DEFAULTS["data"],
                       help="harness: handwritten, mosi:N, m:M, comma-separated or repeated "
                            "(default handwritten,mosi:2000,mosi:20000,m:2,m:3,m:6)")
    bench.add_argument("--no-main-job", action="store_true",
                       help="harness: skip timing the two engines' `robustmm run`")
    bench.add_argument("--max-seconds", type=float, default=_HARNESS_DEFAULTS["max_seconds"],
                       help="harness: skip a training measurement whose FLOP floor alone is "
                            "longer (default %(default)s)")
    bench.add_argument("--repeat", type=int, default=7, help="timed runs per measurement (median)")
    bench.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    bench.add_argument("--output", metavar="FILE",
                       help="also write the report (a header with device, versions and date, then "
                            "the tables) to FILE, e.g. benches/results/reparam_kl-h100-bf16.md")
    for p in sub.choices.values():
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show the Python traceback for errors in the arguments too")
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # named with the command they were given to, on one line
        sub.choices[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    from .usage import UsageError
    try:
        return _command(args)
    except UsageError as exc:  # the user's to fix: one line; our own bugs keep their traceback
        if args.debug:
            raise
        print(f"robustmm {args.command}: error: {exc}", file=sys.stderr)
        return 2


def _command(args) -> int:
    if args.command in ("run", "train", "eval"):  # before any tensor is allocated
        from .train.memory import keep_freed_memory
        keep_freed_memory()
    if args.command in ("run", "train"):
        return _harness(args)
    if args.command == "eval":
        return _eval(args)
    if args.command == "info":
        from .info import main as info_main
        info_main()
        return 0
    return _bench(args)


if __name__ == "__main__":
    sys.exit(main())
