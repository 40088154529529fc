"""The (method, seed) grid of `robustmm run`: each cell fit and scored once, written as soon as it
finishes, skipped by a rerun that finds it finished, and run in parallel -- in worker processes
(``--jobs N``) or spread over torchrun's ranks.

A cell's result, ``out/<method>/seed-<seed>/scores.json``, holds its identity (method, seed,
data spec, full config, protocol and a digest of the test masks) and its scores; it is written
atomically after scoring. A rerun with the same identity reads it instead of training; another
identity is an error naming the file and what differs (nothing is overwritten). A cell killed
while training resumes from its ``checkpoint.pt`` (robustmm_fast.train.fit), so a killed and
rerun grid gives the same results as an uninterrupted one.

Threads: a cell's numbers depend on the number of intra-op threads it ran with (a reduction
split over T threads adds in another order). ``jobs`` workers get ``threads`` threads each
(default: the usable cores // jobs, at least 1); a serial run (jobs = 1) with the same threads
gives the same table bit for bit, and so does a resumed run, since the threads per cell do not
depend on how many cells are left.

Under torchrun (WORLD_SIZE > 1) rank 0 reads which cells are finished and broadcasts the rest;
they are dealt to the ranks (longest first, each to the least loaded rank), each rank runs its
share in its own process without DDP, the scores are gathered over a gloo group, and rank 0
writes the tables. The output directory must be one all ranks see (as fit's checkpoints).
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

__all__ = ["Cell", "GridSpec", "usable_cores", "default_jobs", "masks_digest", "run_grid"]

CELL_FORMAT = "robustmm_fast.cell"
CELL_VERSION = 1

# Scheduling only (longest cells first, so the last cell to start is a short one): relative
# seconds per cell of `robustmm run` on Handwritten, one thread (benches/results/
# robustmm-run-profile-1seed-2026-12-03.md). Unknown methods count 1. Results never depend on it.
_COST_HINT = {"cyin": 6.0, "mim": 1.5, "dmrnet": 1.1, "ume_mma": 1.1, "late_fusion": 0.8,
              "early_fusion": 0.7}


@dataclass(frozen=True, order=True)
class Cell:
    method: str
    seed: int

    def directory(self, out: Path) -> Path:
        return Path(out) / self.method / f"seed-{self.seed}"


@dataclass
class GridSpec:
    """What every cell needs (picklable: it travels to the workers). configs: {method: the
    full config}; masks: {seed: {point: (n_test, M) bool}}; metric: the primary one (logs)."""
    data: str
    protocol: str
    configs: dict
    masks: dict
    out: Path
    metric: str
    device: str = "cpu"


def usable_cores() -> int:
    """CPUs this process may run on (its affinity mask, else os.cpu_count())."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def default_jobs(device: str) -> int:
    """One worker per usable core on the CPU (one thread each: the small models of the
    harness are bound by per-op overhead, which threads do not share); 1 on a GPU."""
    return usable_cores() if torch.device(device).type == "cpu" else 1


def masks_digest(masks: dict) -> str:
    """SHA-256 over the masks' names, shapes and bits, in order."""
    h = hashlib.sha256()
    for name, mask in masks.items():
        m = torch.as_tensor(mask).to(torch.bool).contiguous()
        h.update(f"{name}:{tuple(m.shape)};".encode())
        h.update(m.numpy().tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------- one cell

def cell_identity(spec: GridSpec, cell: Cell) -> dict:
    from .train.checkpoint import canonical
    return canonical({"method": cell.method, "seed": cell.seed, "data": spec.data,
                      "config": spec.configs[cell.method], "protocol": spec.protocol,
                      "masks": masks_digest(spec.masks[cell.seed])})


def _cell_file(spec: GridSpec, cell: Cell) -> Path:
    return cell.directory(spec.out) / "scores.json"


def read_finished(spec: GridSpec, cell: Cell) -> Optional[dict]:
    """The cell's saved record, or None if it has not finished; ValueError if the file belongs
    to another run or is not one of ours."""
    path = _cell_file(spec, cell)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{path}: not a readable cell result ({type(e).__name__}: {e}); delete "
                         "it to rerun the cell") from None
    if not isinstance(record, dict) or record.get("format") != CELL_FORMAT \
            or record.get("version") != CELL_VERSION or not isinstance(record.get("scores"), dict):
        raise ValueError(f"{path}: not a {CELL_FORMAT} version {CELL_VERSION} file; delete it to "
                         "rerun the cell")
    expected = cell_identity(spec, cell)
    saved = record.get("identity") if isinstance(record.get("identity"), dict) else {}
    diff = [k for k in expected if saved.get(k) != expected[k]]
    if diff:
        raise ValueError(f"{path} belongs to another run (it differs in {', '.join(diff)}); "
                         "use another --out, or delete it")
    return record


def run_cell(spec: GridSpec, cell: Cell, dataset=None, progress: bool = False) -> dict:
    """Fit and score one cell and write its scores.json; returns the record (as read back from
    JSON, so a fresh and a reread cell carry the same floats)."""
    from .models.registry import METHODS
    from .run import score
    from .train import fit
    from .train.checkpoint import write_text_atomic
    t0 = time.perf_counter()
    if dataset is None:
        dataset = _worker_dataset(spec.data, cell.seed)
    fitted = fit(METHODS[cell.method], dataset, config=spec.configs[cell.method],
                 seed=cell.seed, out_dir=cell.directory(spec.out), device=spec.device,
                 progress=progress, distributed=False)
    scores = score(fitted.model, dataset, spec.masks[cell.seed], device=spec.device)
    record = {"format": CELL_FORMAT, "version": CELL_VERSION,
              "identity": cell_identity(spec, cell), "best_epoch": fitted.best_epoch,
              "scores": scores, "seconds": time.perf_counter() - t0}
    text = json.dumps(record, indent=1, allow_nan=True)
    write_text_atomic(_cell_file(spec, cell), text)
    return json.loads(text)


_DATASETS: dict = {}
_KEEP_DATASETS = 2  # a worker's cells alternate between seeds; more would hold more memory


def _worker_dataset(data: str, seed: int):
    """load_data(data, seed), the last _KEEP_DATASETS kept for the worker's next cells."""
    from .run import load_data
    key = (data, seed)
    if key not in _DATASETS:
        while len(_DATASETS) >= _KEEP_DATASETS:
            _DATASETS.pop(next(iter(_DATASETS)))
        _DATASETS[key] = load_data(data, seed)
    _DATASETS[key] = _DATASETS.pop(key)  # most recently used last
    return _DATASETS[key]


def _init_worker(threads: int, parent: int) -> None:
    """Threads per worker; and die with the parent: a SIGKILLed run must not leave workers
    writing checkpoints under the rerun's feet. Freed memory is kept for reuse, as in the
    CLI's own process (train/memory.py)."""
    from .train.memory import keep_freed_memory
    keep_freed_memory()
    torch.set_num_threads(threads)
    try:
        import ctypes
        import signal
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the parent-pid check below still runs
        pass
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def _worker_cell(spec: GridSpec, cell: Cell) -> dict:
    return run_cell(spec, cell)


# ---------------------------------------------------------------- many cells

def _by_cost(cells: Sequence[Cell]) -> list[Cell]:
    return sorted(cells, key=lambda c: -_COST_HINT.get(c.method, 1.0))  # stable: ties in order


def _deal(cells: Sequence[Cell], ranks: int) -> list[list[Cell]]:
    """Longest first, each to the least loaded rank (ties: the lowest rank)."""
    load = [0.0] * ranks
    shares: list[list[Cell]] = [[] for _ in range(ranks)]
    for cell in _by_cost(cells):
        r = min(range(ranks), key=lambda i: (load[i], i))
        shares[r].append(cell)
        load[r] += _COST_HINT.get(cell.method, 1.0)
    return shares


def _run_cells(spec: GridSpec, cells: Sequence[Cell], jobs: int, threads: int,
               datasets: dict, log: Callable[[str], None], progress: bool) -> dict:
    """{cell: record} of `cells`, in `jobs` worker processes (1: in this process)."""
    done: dict = {}
    start = time.perf_counter()

    def report(cell: Cell, record: dict) -> None:
        done[cell] = record
        log(_cell_line(cell, record, spec.metric, time.perf_counter() - start, len(done),
                       len(cells)))

    if not cells:
        return done
    if jobs <= 1:
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            for cell in cells:
                report(cell, run_cell(spec, cell, datasets.get(cell.seed), progress=progress))
        finally:
            torch.set_num_threads(before)
        return done
    import multiprocessing
    pool = ProcessPoolExecutor(max_workers=min(jobs, len(cells)),
                               mp_context=multiprocessing.get_context("spawn"),
                               initializer=_init_worker, initargs=(threads, os.getpid()))
    futures: dict[Future, Cell] = {}
    try:
        for cell in _by_cost(cells):
            futures[pool.submit(_worker_cell, spec, cell)] = cell
        pending = set(futures)
        while pending:
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for f in finished:
                report(futures[f], f.result())  # a worker's exception is raised here
    except BaseException:
        for process in list(getattr(pool, "_processes", {}).values()):
            process.kill()  # the cells in flight stop; their checkpoints let a rerun resume
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    return done


def _cell_line(cell: Cell, record: dict, metric: str, elapsed: float, k: int, n: int) -> str:
    scores = record["scores"]
    last = [p for p in scores if p.startswith("eta:")]
    value = scores.get("complete", {}).get(metric, float("nan"))
    return (f"[{elapsed:6.0f}s] {k}/{n} {cell.method:<12} seed {cell.seed}: {metric} complete "
            f"{value:.4f}" + (f", {last[-1]} {scores[last[-1]][metric]:.4f}" if last else "")
            + f" (best epoch {record['best_epoch']}, {record['seconds']:.0f}s)")


def run_grid(spec: GridSpec, methods: Sequence[str], seeds: Sequence[int], *,
             jobs: Optional[int] = None, threads: Optional[int] = None,
             datasets: Optional[dict] = None, log: Callable[[str], None] = print,
             progress: bool = False) -> Optional[dict]:
    """Every (method, seed) cell's record; {method: {seed: scores}} in the order of `methods`
    and `seeds`. Finished cells are read back, the rest run (jobs workers of `threads` threads;
    defaults: default_jobs(device), usable_cores() // jobs). Under torchrun the cells are
    spread over the ranks: rank 0 returns the grid, the other ranks None.
    datasets: {seed: dataset} already loaded here (used by in-process cells; workers load
    their own). progress: the epoch bars of in-process cells (workers show none)."""
    from .train import distributed as dist_utils
    cells = [Cell(m, s) for s in seeds for m in methods]
    world = dist_utils._env_int("WORLD_SIZE", 1)
    jobs = jobs or (1 if world > 1 else default_jobs(spec.device))
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    threads = threads or (torch.get_num_threads() if jobs == 1 else max(1, usable_cores() // jobs))
    if world > 1:
        return _run_grid_torchrun(spec, cells, methods, seeds, jobs, threads, datasets or {},
                                  log, progress)
    finished = _finished(spec, cells, log)
    todo = [c for c in cells if c not in finished]
    finished.update(_run_cells(spec, todo, jobs, threads, datasets or {}, log, progress))
    return _as_grid(finished, methods, seeds)


def _finished(spec: GridSpec, cells: Sequence[Cell], log: Callable[[str], None]) -> dict:
    """{cell: record} of the cells already finished in spec.out."""
    finished = {c: r for c in cells if (r := read_finished(spec, c)) is not None}
    if finished:
        log(f"{len(finished)} of {len(cells)} cells already finished in {spec.out}: not rerun")
    return finished


def _as_grid(records: dict, methods, seeds) -> dict:
    return {m: {s: records[Cell(m, s)]["scores"] for s in seeds} for m in methods}


def _run_grid_torchrun(spec, cells, methods, seeds, jobs, threads, datasets, log, progress):
    import datetime
    import torch.distributed as dist
    from .train import distributed as dist_utils
    if not dist.is_initialized():
        # gloo for the objects whatever the device; a long timeout: ranks finish their shares
        # at different times and wait for the slowest in the gather below
        dist.init_process_group("gloo", timeout=datetime.timedelta(days=7))
    rank, world = dist.get_rank(), dist.get_world_size()
    if torch.device(spec.device).type == "cuda":
        local = dist_utils._env_int("LOCAL_RANK", 0)
        spec = replace(spec, device=f"cuda:{local}")
    # one rank decides, before any rank writes a cell
    box = [_finished(spec, cells, log) if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    finished = box[0]
    todo = [c for c in cells if c not in finished]
    mine = _deal(todo, world)[rank]
    quiet = log if rank == 0 else (lambda line: print(f"[rank {rank}] {line}", flush=True))
    records = _run_cells(spec, mine, jobs, threads, datasets, quiet, progress)
    gathered: list = [None] * world
    dist.all_gather_object(gathered, records)
    for part in gathered:
        finished.update(part)
    return _as_grid(finished, methods, seeds) if rank == 0 else None
