"""Timing, peak-memory and bandwidth measurement, and the result table.

Time: median of `repeat` runs after `warmup` runs, synchronized around each run on CUDA; on CUDA
with triton importable, the median of `triton.testing.do_bench` instead (which also flushes the
L2 cache before each run, so a small case is not timed out of a warm cache).
Bandwidth: a case may state the bytes an ideal fused implementation moves (`Case.bytes_fwd`,
`Case.bytes_fwd_bwd`); every implementation is then reported at those bytes over its own time
("effective bandwidth", the same yardstick for all), and on CUDA as a share of the device's peak
DRAM bandwidth (`peak_bandwidth`).
Peak memory: on CUDA, torch.cuda.max_memory_allocated above the baseline; on CPU, the
running total of the allocations and frees that torch.profiler(profile_memory=True) records
(each one, in time order): the most bytes the run held live at once beyond what existed before.
"""
from __future__ import annotations

import contextlib
import inspect
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch


@dataclass
class Impl:
    """One implementation: `make(case)` returns (forward_fn, forward_backward_fn), or None to skip."""
    name: str
    make: Callable


def on_backend(op_fn: Callable, op: str, backend: str, device: torch.device) -> Callable | None:
    """`op_fn` run on `backend` (every call inside use_backend), or None where that backend
    cannot run `op` on `device` (the implementation is then skipped)."""
    from .. import _backend
    if _backend._unavailable_reason(backend, device, op) is not None:
        return None

    def fn(*args, **kwargs):
        with _backend.use_backend(backend):
            return op_fn(*args, **kwargs)
    return fn


def compiled(fn: Callable) -> Callable:
    """torch.compile(fn) with a fresh dynamo cache: one graph per case, as a model with fixed
    shapes gets."""
    torch._dynamo.reset()
    return torch.compile(fn, dynamic=False)


@dataclass
class Case:
    """One measured configuration. bytes_fwd / bytes_fwd_bwd: the bytes a fused implementation
    must read and write (None: no bandwidth column for this case)."""
    name: str
    params: dict = field(default_factory=dict)
    bytes_fwd: int | None = None
    bytes_fwd_bwd: int | None = None


@dataclass
class Result:
    case: str
    impl: str
    fwd_ms: float | None
    fwd_bwd_ms: float | None
    peak_mb: float | None
    note: str = ""
    bytes_fwd: int | None = None
    bytes_fwd_bwd: int | None = None

    @property
    def fwd_gbs(self) -> float | None:
        return gb_per_s(self.bytes_fwd, self.fwd_ms)

    @property
    def fwd_bwd_gbs(self) -> float | None:
        return gb_per_s(self.bytes_fwd_bwd, self.fwd_bwd_ms)


def gb_per_s(nbytes: int | None, ms: float | None) -> float | None:
    """Effective bandwidth in GB/s (1e9 bytes per second)."""
    if nbytes is None or not ms:
        return None
    return nbytes / (ms * 1e-3) / 1e9


# Peak DRAM bandwidth (bytes/s) of devices whose properties lack the memory clock, by name;
# the first entry whose words all occur in the device name wins.
_KNOWN_PEAK_BANDWIDTH = (
    (("H200",), 4.8e12),
    (("H100", "PCIE"), 2.0e12),
    (("H100", "NVL"), 3.9e12),
    (("H100",), 3.35e12),  # SXM5 (HBM3)
)


def peak_bandwidth(device: torch.device) -> float | None:
    """The device's peak DRAM bandwidth in bytes/s (None for CPUs and unknown GPUs):
    2 (double data rate) x memory clock x bus width, else a table of known devices."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(device)
    clock_khz = getattr(props, "memory_clock_rate", 0) or 0
    bus_bits = getattr(props, "memory_bus_width", 0) or 0
    if clock_khz > 0 and bus_bits > 0:
        return 2.0 * clock_khz * 1e3 * bus_bits / 8
    name = props.name.upper()
    for words, value in _KNOWN_PEAK_BANDWIDTH:
        if all(w in name for w in words):
            return value
    return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _do_bench():
    """triton.testing.do_bench, or None when triton is not importable."""
    try:
        from triton.testing import do_bench
    except Exception:  # not installed, or broken: fall back to synchronized wall-clock timing
        return None
    return do_bench


def timing_method(device: torch.device, repeat: int) -> str:
    """How time_fn measures on `device` (for the report's header)."""
    if device.type == "cuda" and _do_bench() is not None:
        return "median of triton.testing.do_bench (about 100 ms of runs, L2 flushed before each)"
    sync = " synchronized" if device.type == "cuda" else ""
    return f"median of {repeat}{sync} wall-clock runs"


def time_fn(fn: Callable, device: torch.device, warmup: int = 2, repeat: int = 7) -> float:
    """Median milliseconds of fn(). On CUDA with triton: triton.testing.do_bench (CUDA events,
    L2 flushed before each run, as many runs as fit in about 100 ms; `warmup` and `repeat` are
    then unused)."""
    do_bench = _do_bench() if device.type == "cuda" else None
    if do_bench is not None:
        median = ({"return_mode": "median"} if "return_mode" in inspect.signature(do_bench).parameters
                  else {"quantiles": [0.5]})
        with torch.cuda.device(device):
            return float(do_bench(fn, warmup=25, rep=100, **median))
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


@contextlib.contextmanager
def _quiet_stderr():
    """Silence file descriptor 2 (kineto prints a 'profiler_start/stop' line per profile)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


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
    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
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


def settle_cpu_allocator() -> None:
    """Allocate and free one 32 MiB block. glibc's malloc raises its mmap and trim thresholds to
    the largest block freed so far (up to 32 MiB and twice that), so whether a run's large
    tensors come back from the heap or page-fault in fresh from the kernel depends on what the
    process freed before. Doing this first puts every implementation in the same allocator
    state, the one a training process reaches after its first steps."""
    block = torch.empty((32 << 20) // 4 - 1024, dtype=torch.float32)
    block.fill_(0.0)
    del block


def run_cases(cases: list[Case], impls: list[Impl], device: torch.device, *, warmup: int = 2,
              repeat: int = 7, memory: bool = True, log: Callable[[str], None] | None = None) -> list[Result]:
    if device.type == "cpu":
        settle_cpu_allocator()
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
            r = Result(case.name, impl.name, fwd_ms, fb_ms, peak,
                       bytes_fwd=case.bytes_fwd, bytes_fwd_bwd=case.bytes_fwd_bwd)
            results.append(r)
            if log is not None:
                log(f"  {case.name:<32} {impl.name:<22} fwd {_ms_and_gbs(fwd_ms, r.fwd_gbs)}"
                    f"  fwd+bwd {_ms_and_gbs(fb_ms, r.fwd_bwd_gbs)}")
            del made, fwd, fwd_bwd
    return results


def _ms_and_gbs(ms: float | None, gbs: float | None) -> str:
    """A progress-line cell: the time, and the bandwidth when the case states its bytes."""
    text = f"{ms:9.3f} ms" if ms is not None else f"{'-':>9} ms"
    return text + (f" {gbs:9.3f} GB/s" if gbs is not None else "")


def format_table(results: list[Result], ours: str, baselines: tuple[str, ...],
                 peak_bytes_per_s: float | None = None) -> str:
    """Markdown table (time, effective bandwidth, its share of `peak_bytes_per_s` when given,
    peak memory); then for each case `ours`'s speed-up over each baseline (fwd and fwd+bwd)."""
    def fmt(x, spec=".3f"):
        return "-" if x is None else format(x, spec)

    def fmt_gbs(x):  # whole GB/s from 100 up, finer below (a tiny CPU case never shows 0.0)
        return "-" if x is None else format(x, ".0f" if x >= 100 else ".1f" if x >= 1 else ".3f")

    def pct(gbs):
        return None if gbs is None or not peak_bytes_per_s else 100 * gbs * 1e9 / peak_bytes_per_s

    by_case: dict[str, dict[str, Result]] = {}
    for r in results:
        by_case.setdefault(r.case, {})[r.impl] = r
    with_bw = any(r.bytes_fwd is not None or r.bytes_fwd_bwd is not None for r in results)
    with_pct = with_bw and bool(peak_bytes_per_s)
    head = ["case", "impl", "fwd ms", "fwd+bwd ms"]
    if with_bw:
        head += ["fwd GB/s", "fwd+bwd GB/s"]
    if with_pct:
        head += ["fwd % peak", "fwd+bwd % peak"]
    head += ["peak MiB"]
    ratio_cols = [f"{ours} speed-up vs {b} (fwd / fwd+bwd)" for b in baselines]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    ratio_lines = ["| case | " + " | ".join(ratio_cols) + " |", "|---|" + "---|" * len(ratio_cols)]
    for case, rows in by_case.items():
        for impl, r in rows.items():
            cells = [case, impl, fmt(r.fwd_ms), fmt(r.fwd_bwd_ms)]
            if with_bw:
                cells += [fmt_gbs(r.fwd_gbs), fmt_gbs(r.fwd_bwd_gbs)]
            if with_pct:
                cells += [fmt(pct(r.fwd_gbs), ".1f"), fmt(pct(r.fwd_bwd_gbs), ".1f")]
            cells += [fmt(r.peak_mb, ".1f")]
            lines.append("| " + " | ".join(cells) + " |")
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
