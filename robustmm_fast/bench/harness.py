"""`robustmm bench harness`: the training harness's own speed, this engine beside a baseline
engine (a git revision of this project, default the engine before issue 15) in the same run.

Measured per method, each in a fresh process with one intra-op thread (what a `robustmm run`
worker gets on a CPU), by robustmm_fast/bench/harness_probe.py (the same script for both
engines):
  - training throughput: rows per second of fit() over one epoch per stage, end to end
    (batching, augmentation, steps, validation, checkpoints);
  - scoring throughput: rows per second of run.score over the 69 (Handwritten) masks of
    complete + subsets + eta on the test split;
  - this engine only: the FLOPs of a training step and of a scored row (torch's FlopCounter),
    and the rows per second they would allow at the machine's measured GEMM rate: how far
    the harness is from what the hardware allows.
Data: Handwritten; synthetic MOSI-shaped at N = 2,000 and 20,000 (how time grows with N);
synthetic with M = 2, 3, 6 modalities of 20 x 32 (how time grows with M).
Then the main job (`robustmm run`, defaults) of both engines, wall time.

    robustmm bench harness --output benches/results/harness-cpu-2core-DATE.md
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

__all__ = ["DEFAULT_BASELINE", "DEFAULT_DATA", "baseline_checkout", "probe", "main_job",
           "gemm_rate", "run_harness_bench", "format_report", "report_from_raw"]

PROBE = Path(__file__).with_name("harness_probe.py")
# the engine `robustmm run` had when issue 15 measured it (335 s quiet on 2 cores)
DEFAULT_BASELINE = "a533ae7"
DEFAULT_DATA = ("handwritten", "mosi:2000", "mosi:20000", "m:2", "m:3", "m:6")
METHODS = ("early_fusion", "late_fusion", "ume_mma", "cyin", "dmrnet", "mim")


def _root() -> Path:
    return Path(__file__).resolve().parents[2]


def baseline_checkout(ref: str, cache: Optional[Path] = None,
                      log: Callable[[str], None] = print) -> Path:
    """A source tree of this project at git revision `ref`, with its C++ extension built in
    place, under the cache (~/.cache/robustmm_fast/engines/<sha>); built once and reused.
    ValueError when this package is not a git checkout or `ref` is unknown."""
    root = _root()
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "--verify", f"{ref}^{{commit}}"],
                             check=True, capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError) as e:
        why = (getattr(e, "stderr", "") or str(e)).strip().splitlines() or ["git failed"]
        raise ValueError(f"--baseline {ref}: not a revision of the git checkout at {root} "
                         f"({why[-1]}); --baseline none measures this engine alone") from None
    cache = Path(cache or os.environ.get("ROBUSTMM_CACHE", Path.home() / ".cache/robustmm_fast"))
    tree = cache / "engines" / sha
    if not any(tree.glob("robustmm_fast/_C*.so")):
        log(f"baseline {ref} ({sha[:10]}): extracting and building its C++ extension in {tree}")
        tree.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile() as archive:
            subprocess.run(["git", "-C", str(root), "archive", sha], stdout=archive, check=True)
            archive.seek(0)
            with tarfile.open(fileobj=archive) as tar:
                tar.extractall(tree, filter="data")
        subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=tree,
                       check=True, stdout=subprocess.DEVNULL)
    return tree


def _env(engine: Optional[Path]) -> dict:
    """One intra-op thread; `engine` (a source tree) first on the path, else this package."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join(
        [str(engine or _root())] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def probe(task: dict, engine: Optional[Path] = None, timeout: float = 3600) -> dict:
    """Run one harness_probe task in a fresh process; its JSON result, or {"error": ...}."""
    try:
        proc = subprocess.run([sys.executable, str(PROBE), json.dumps(task)], env=_env(engine),
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**task, "error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {**task, "error": tail[:200]}
    result = json.loads(lines[-1])
    expected = str(engine or _root())
    if not result["package"].startswith(expected):  # the engine we meant, not another install
        raise RuntimeError(f"the probe imported {result['package']}, expected one under {expected}")
    return result


def main_job(engine: Optional[Path]) -> float:
    """Wall seconds of `robustmm run` (its defaults) with `engine` first on the path; the
    threads are the command's own defaults (this engine: one worker per core, one thread
    each; the baseline: one process, torch's default threads)."""
    env = {**os.environ, "PYTHONPATH": str(engine or _root())}
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        # cwd=out: `python -m` puts the working directory first on the path, and it must not
        # be a checkout of another engine
        subprocess.run([sys.executable, "-m", "robustmm_fast.cli", "run", "--out", out,
                        "--no-progress"], env=env, check=True, cwd=out,
                       stdout=subprocess.DEVNULL)
        return time.perf_counter() - t0


def gemm_rate(threads: int = 1) -> float:
    """FLOP/s of a (128 x 960) @ (960 x 960) fp32 linear on `threads` threads (the largest
    GEMM of CyIN's Handwritten step): a practical peak for the FLOP floor."""
    import torch
    import torch.nn.functional as F
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x, w = torch.randn(128, 960), torch.randn(960, 960)
        for _ in range(5):
            F.linear(x, w)
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(20):
                F.linear(x, w)
            best = min(best, (time.perf_counter() - t0) / 20)
        return 2 * 128 * 960 * 960 / best
    finally:
        torch.set_num_threads(old)


# the rate a table reports: training over the whole fit, scoring over all masks
_KEY = {"train": "fit_rows_per_s", "score": "rows_per_s"}


def _append(raw: Optional[Path], record: dict) -> None:
    if raw is not None:
        with open(raw, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def _floor_seconds(flops: dict, task: str, rate: float) -> Optional[float]:
    """The FLOP floor of one probe measurement: its rows (training: one epoch per stage, at
    most two; scoring: 69 masks for 6 modalities, 2^M - 1 + 6 in general) times the FLOPs
    per row, at `rate`; None when the FLOPs were not counted. The split sizes come with the
    flops probe's record (loading the data here again cost a 3 GB MOSI-shaped set per row)."""
    if "error" in flops:
        return None
    if task == "train":
        return 2 * flops["n_train"] * flops["train_flops_per_row"] / rate
    masks = 2 ** flops["modalities"] - 1 + 6
    return masks * flops["n_test"] * flops["score_flops_per_row"] / rate


def _job_floor(results: dict, methods: Sequence[str], rate: float, seeds: int = 5,
               cores: Optional[int] = None) -> list[str]:
    """The main job's FLOP floor on Handwritten: per method and seed, the training steps
    (epochs x train rows x FLOPs per row, every epoch counted at its last stage's FLOPs), the
    validation after every epoch and the scoring of every mask, at `rate` per core, the
    cells spread perfectly over the cores."""
    cores = cores or os.cpu_count() or 1
    rows, total = [], 0.0
    for m in methods:
        fl = results.get(("this", "flops", "handwritten", m)) or {}
        if "epochs" not in fl:
            continue
        masks = 2 ** fl["modalities"] - 1 + 6
        flops = (fl["epochs"] * (fl["n_train"] * fl["train_flops_per_row"]
                                 + fl["n_valid"] * fl["score_flops_per_row"])
                 + masks * fl["n_test"] * fl["score_flops_per_row"])
        total += seeds * flops
        rows.append(f"| {m} | {fl['epochs']} | {flops / 1e9:,.0f} | {flops / rate:.1f} |")
    if not rows:
        return []
    return ["## The main job's FLOP floor (Handwritten, per seed)", "",
            "| method | epochs | GFLOP per seed | seconds per seed at the GEMM rate |",
            "|---|---|---|---|", *rows, "",
            f"All {seeds} seeds: {total / 1e12:.2f} TFLOP, {total / rate:.0f} s on one core, "
            f"{total / rate / cores:.0f} s on {cores} cores with no overhead at all (every "
            "epoch counted at its last stage's FLOPs, so stage 1 of CyIN and UME-MMA's "
            "unimodal epochs are over-counted).", ""]


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ratio(new: Optional[float], old: Optional[float]) -> str:
    return f"{new / old:.2f}x" if new and old else "-"


def _rate(r: Optional[dict], key: str = "rows_per_s") -> str:
    if r is None:
        return "-"
    return "error: " + r["error"] if "error" in r else f"{r[key]:,.0f}"


def run_harness_bench(*, baseline: Optional[str] = DEFAULT_BASELINE,
                      data: Sequence[str] = DEFAULT_DATA, methods: Sequence[str] = METHODS,
                      tasks: Sequence[str] = ("train", "score"), with_main_job: bool = True,
                      max_seconds: float = 300.0, log: Callable[[str], None] = print,
                      raw: Optional[Path] = None) -> str:
    """Measure everything (see the module docstring) and return the markdown report. A
    measurement whose FLOP floor alone (its FLOPs at the GEMM rate) exceeds `max_seconds`
    is skipped and reported as such (CyIN at MOSI's official widths: ~14 GFLOP per row).
    raw: a JSON-lines file that gets every measurement as it is made."""
    engines: dict[str, Optional[Path]] = {"this": None}
    if baseline:
        engines["baseline"] = baseline_checkout(baseline, log=log)
    rate = gemm_rate(1)
    _append(raw, {"task": "gemm_rate", "flops_per_s": rate, "baseline": baseline,
                  "sha": _head()})
    results: dict = {}
    for d in data:
        for m in methods:
            fl = results[("this", "flops", d, m)] = probe({"task": "flops", "data": d,
                                                            "method": m})
            _append(raw, {"engine": "this", **fl})
            for task in tasks:
                floor = _floor_seconds(fl, task, rate)
                for name, engine in engines.items():
                    if floor is not None and floor > max_seconds:
                        r = {"task": task, "data": d, "method": m,
                             "error": f"skipped: its FLOP floor is {floor:.0f} s"}
                    else:
                        r = probe({"task": task, "data": d, "method": m}, engine)
                    results[(name, task, d, m)] = r
                    _append(raw, {"engine": name, **r})
                    extra = (f" (fastest epoch {_rate(r)})" if task == "train" else "")
                    log(f"{name:8s} {task:5s} {d:12s} {m:12s} {_rate(r, _KEY[task])} rows/s{extra}")
    jobs = {}
    if with_main_job:
        for name, engine in engines.items():
            jobs[name] = main_job(engine)
            _append(raw, {"engine": name, "task": "main_job", "seconds": jobs[name]})
            log(f"{name:8s} robustmm run: {jobs[name]:.1f} s")

    return format_report(results, jobs, rate, baseline=baseline, data=data, methods=methods,
                         tasks=tasks, sha=_head())


def _head() -> str:
    """This checkout's commit (short), or "unknown"."""
    return subprocess.run(["git", "-C", str(_root()), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True).stdout.strip() or "unknown"


def report_from_raw(raw: Path) -> str:
    """The report of the measurements in a JSON-lines file that run_harness_bench wrote (a run
    that was stopped included: what it measured)."""
    results, jobs, rate, data, methods, baseline, sha = {}, {}, None, [], [], None, "unknown"
    for line in Path(raw).read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        if r["task"] == "gemm_rate":
            rate, baseline, sha = r["flops_per_s"], r.get("baseline"), r.get("sha", sha)
        elif r["task"] == "main_job":
            jobs[r["engine"]] = r["seconds"]
        else:
            results[(r["engine"], r["task"], r["data"], r["method"])] = r
            data += [r["data"]] * (r["data"] not in data)
            methods += [r["method"]] * (r["method"] not in methods)
    if rate is None:
        raise ValueError(f"{raw}: no gemm_rate record")
    return format_report(results, jobs, rate, baseline=baseline, data=data, methods=methods,
                         sha=sha)


def format_report(results: dict, jobs: dict, rate: float, *, baseline: Optional[str],
                  data: Sequence[str], methods: Sequence[str],
                  tasks: Sequence[str] = ("train", "score"), sha: str = "unknown") -> str:
    """The markdown report of measured `results` {(engine, task, data, method): record} and
    main-job seconds `jobs` {engine: s}, at GEMM rate `rate` (FLOP/s), of engine `sha`.
    A (data, method) row appears when something of it was measured."""
    import torch
    engines = ["this"] + ["baseline"] * bool(baseline)
    lines = [f"# `robustmm bench harness` ({time.strftime('%Y-%m-%d')})", "",
             f"Machine: {_cpu_name()}, "
             f"{os.cpu_count()} CPUs; torch {torch.__version__}; this engine {sha}"
             + (f", baseline {baseline}" if baseline else "") + ". One intra-op thread per "
             f"measurement, each in a fresh process; GEMM rate {rate / 1e9:.1f} GFLOP/s "
             "(fp32, 1 thread).", ""]
    if jobs:
        lines += ["## The main job: `robustmm run` (defaults), wall time", "",
                  "| engine | seconds | speed-up |", "|---|---|---|"]
        for name in engines:
            lines.append(f"| {name} | {jobs[name]:.1f} | "
                         f"{_ratio(jobs.get('baseline'), jobs[name]) if name == 'this' else ''} |")
        lines.append("")
    for task, title in (("train", "Training throughput (rows/s over the whole fit: one epoch per "
                                  "stage, validation and checkpoints included; in brackets the "
                                  "fastest epoch's steps and validation)"),
                        ("score", "Scoring throughput (rows/s, complete + subsets + eta)")):
        if task not in tasks:
            continue
        lines += [f"## {title}", "", "| data | method | this | baseline | speed-up | "
                  "FLOP floor (rows/s at the GEMM rate) |", "|---|---|---|---|---|---|"]
        key = _KEY[task]
        for d in data:
            for m in methods:
                new, old = results.get(("this", task, d, m)), results.get(("baseline", task, d, m))
                if new is None and old is None:
                    continue
                fl = results.get(("this", "flops", d, m)) or {}
                per_row = fl.get("train_flops_per_row" if task == "train" else "score_flops_per_row")
                floor = f"{rate / per_row:,.0f}" if per_row else "-"
                cells = [_rate(r, key) + (f" ({_rate(r)})" if task == "train" and r and "error"
                                          not in r else "") for r in (new, old)]
                lines.append(f"| {d} | {m} | {cells[0]} | {cells[1]} | "
                             f"{_ratio((new or {}).get(key), (old or {}).get(key))} | {floor} |")
        lines.append("")
    if "handwritten" in data:
        lines += _job_floor(results, methods, rate)
    lines += ["The FLOP floor counts matmuls, convolutions and SDPA only (torch.utils."
              "flop_counter); elementwise work, the optimizer and our custom attention op are "
              "not counted, so it is a bound no engine reaches.", ""]
    return "\n".join(lines)
