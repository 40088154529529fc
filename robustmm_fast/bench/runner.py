"""Timing and peak-memory measurement, and the result table.

Time: median of `repeat` runs after `warmup` runs (CUDA: synchronized around each run).
Peak memory: on CUDA, torch.cuda.max_memory_allocated above the baseline; on CPU, the
running total of the allocations and frees that torch.profiler(profile_memory=True) records
(each one, in time order): the most bytes the run held live at once beyond what existed before.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch


@dataclass
class Impl:
    """One implementation: `make(case)` returns (forward_fn, forward_backward_fn), or None to skip."""
    name: str
    make: Callable


@dataclass
class Case:
    name: str
    params: dict = field(default_factory=dict)


@dataclass
class Result:
    case: str
    impl: str
    fwd_ms: float | None
    fwd_bwd_ms: float | None
    peak_mb: float | None
    note: str = ""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable, device: torch.device, warmup: int = 2, repeat: int = 7) -> float:
    """Median milliseconds of fn()."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def peak_memory_mb(fn: Callable, device: torch.device) -> float | None:
    """Peak bytes held live by one fn() call beyond the bytes live before it, in MiB."""
    fn()  # warm (compilation, caches) outside the measurement
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        _sync(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    try:  # every allocation and free, with its size (the op-level view nets them out)
        raw = prof.profiler.kineto_results.events()
    except AttributeError:
        return None
    events = sorted((e.start_ns(), e.nbytes()) for e in raw if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak / 2**20


def run_cases(cases: list[Case], impls: list[Impl], device: torch.device, *, warmup: int = 2,
              repeat: int = 7, memory: bool = True, log: Callable[[str], None] | None = None) -> list[Result]:
    results = []
    for case in cases:
        for impl in impls:
            made = impl.make(case)
            if made is None:
                continue
            fwd, fwd_bwd = made
            # warm both phases first: the allocator's first large blocks and any compilation
            # would otherwise be charged to whichever phase runs first
            for fn in (fwd, fwd_bwd) * warmup:
                if fn is not None:
                    fn()
            _sync(device)
            fwd_ms = time_fn(fwd, device, 1, repeat) if fwd is not None else None
            fb_ms = time_fn(fwd_bwd, device, 1, repeat) if fwd_bwd is not None else None
            peak = peak_memory_mb(fwd_bwd, device) if memory and fwd_bwd is not None else None
            results.append(Result(case.name, impl.name, fwd_ms, fb_ms, peak))
            if log is not None:
                log(f"  {case.name:<32} {impl.name:<22} fwd {fwd_ms or float('nan'):9.3f} ms  "
                    f"fwd+bwd {fb_ms or float('nan'):9.3f} ms")
            del made, fwd, fwd_bwd
    return results


def format_table(results: list[Result], ours: str, baselines: tuple[str, ...]) -> str:
    """Markdown table; for each case, `ours`'s speed-up over each baseline (fwd+bwd and fwd)."""
    def fmt(x, spec=".3f"):
        return "-" if x is None else format(x, spec)

    by_case: dict[str, dict[str, Result]] = {}
    for r in results:
        by_case.setdefault(r.case, {})[r.impl] = r
    head = ["case", "impl", "fwd ms", "fwd+bwd ms", "peak MiB"]
    ratio_cols = [f"{ours} speed-up vs {b} (fwd / fwd+bwd)" for b in baselines]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    ratio_lines = ["| case | " + " | ".join(ratio_cols) + " |", "|---|" + "---|" * len(ratio_cols)]
    for case, rows in by_case.items():
        for impl, r in rows.items():
            lines.append(f"| {case} | {impl} | {fmt(r.fwd_ms)} | {fmt(r.fwd_bwd_ms)} | {fmt(r.peak_mb, '.1f')} |")
        mine = rows.get(ours)
        cells = []
        for b in baselines:
            other = rows.get(b)
            if mine is None or other is None:
                cells.append("-")
                continue
            f = other.fwd_ms / mine.fwd_ms if mine.fwd_ms and other.fwd_ms else None
            fb = other.fwd_bwd_ms / mine.fwd_bwd_ms if mine.fwd_bwd_ms and other.fwd_bwd_ms else None
            cells.append(f"{fmt(f, '.2f')}x / {fmt(fb, '.2f')}x")
        ratio_lines.append(f"| {case} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n" + "\n".join(ratio_lines)
