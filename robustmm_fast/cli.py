"""The `robustmm` command: `robustmm info`, `robustmm bench OP`."""
from __future__ import annotations

import argparse
import importlib
import inspect
import sys

BENCH_OPS = ("reparam_kl", "cycle_loss", "masked_attention")


def _bench(args) -> int:
    import torch

    from .bench import format_table, run_cases
    from .bench.runner import peak_bandwidth, timing_method
    module = importlib.import_module(f"robustmm_fast.bench.{args.op}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("robustmm bench: --device cuda but no CUDA device is visible", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    kwargs = {"dtype": dtype}
    if args.shape:
        if args.op == "masked_attention":
            print("robustmm bench: --shape does not apply to masked_attention", file=sys.stderr)
            return 2
        kwargs["shapes"] = args.shape
    for option, name in ((args.distance, "distances"), (args.mask, "masks")):
        if option:
            if name not in inspect.signature(module.cases).parameters:
                print(f"robustmm bench: --{name[:-1]} does not apply to {args.op}", file=sys.stderr)
                return 2
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="robustmm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions and backend availability")
    bench = sub.add_parser("bench", help="time an op against eager, torch.compile and PyTorch peers")
    bench.add_argument("op", choices=BENCH_OPS)
    bench.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    bench.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16", "float64"))
    bench.add_argument("--shape", action="append", type=_shape, help="override shapes, e.g. --shape 64x50x128 (repeatable)")
    bench.add_argument("--distance", action="append", choices=("mse", "l1", "smooth_l1", "cosine"),
                       help="cycle_loss: only these distances (repeatable)")
    bench.add_argument("--mask", action="append", choices=("present", "none"),
                       help="cycle_loss: only these row masks (repeatable)")
    bench.add_argument("--repeat", type=int, default=7, help="timed runs per measurement (median)")
    bench.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    bench.add_argument("--output", metavar="FILE",
                       help="also write the report (a header with device, versions and date, then "
                            "the tables) to FILE, e.g. benches/results/reparam_kl-h100-bf16.md")
    args = parser.parse_args(argv)
    if args.command == "info":
        from .info import main as info_main
        info_main()
        return 0
    return _bench(args)


if __name__ == "__main__":
    sys.exit(main())
