"""The `robustmm` command: `robustmm info`, `robustmm bench OP`."""
from __future__ import annotations

import argparse
import importlib
import sys

BENCH_OPS = ("reparam_kl",)


def _bench(args) -> int:
    import torch

    from .bench import format_table, run_cases
    module = importlib.import_module(f"robustmm_fast.bench.{args.op}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("robustmm bench: --device cuda but no CUDA device is visible", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    kwargs = {"dtype": dtype}
    if args.shape:
        kwargs["shapes"] = [tuple(int(x) for x in s.split("x")) for s in args.shape]
    cases = module.cases(**kwargs)
    impls, ours, baselines = module.implementations(device)
    print(f"robustmm bench {args.op} on {device} ({_device_name(device)}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; median of {args.repeat} runs", flush=True)
    results = run_cases(cases, impls, device, repeat=args.repeat, memory=not args.no_memory,
                        log=lambda s: print(s, flush=True))
    print()
    print(format_table(results, ours, baselines))
    return 0


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
    bench.add_argument("--shape", action="append", help="override shapes, e.g. --shape 64x50x128 (repeatable)")
    bench.add_argument("--repeat", type=int, default=7, help="timed runs per measurement (median)")
    bench.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    args = parser.parse_args(argv)
    if args.command == "info":
        from .info import main as info_main
        info_main()
        return 0
    return _bench(args)


if __name__ == "__main__":
    sys.exit(main())
