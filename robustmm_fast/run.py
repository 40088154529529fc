"""The main job, `robustmm run`: train methods, score each on the same missing-modality masks,
print one table and write results.json, results.csv and a robustness-curve PNG.

For every seed: load the data (Handwritten's split depends on the seed), draw the protocols'
masks over the test split once (saved under out/masks/, so every method is scored on the same
masks), then for every method fit (model selection on the validation split only) and evaluate:
complete test set, every non-empty modality subset (63 for 6 views), and the random missing
rate eta = 0.1 ... 0.5 (CPM-Nets' protocol; eta = 0 is the complete set).
Reported per method: mean ± std over seeds of the primary metric at each point, the mean over
the fixed subsets, the area under the eta curve and MultiBench's relative and effective
robustness (effective: against late fusion's curve, when late fusion ran).
"""
from __future__ import annotations

import csv
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

__all__ = ["load_data", "parse_protocol", "protocol_masks", "score", "run", "format_table"]

DEFAULT_ETAS = (0.1, 0.2, 0.3, 0.4, 0.5)
DEFAULT_SEEDS = (1111, 1112, 1113, 1114, 1115)


def load_data(spec: str, seed: int):
    """handwritten | mmsa:PATH | avmnist:DIR | synthetic[:mosi|mosei] -> MultimodalDataset."""
    from . import data
    kind, _, arg = spec.partition(":")
    kind = kind.strip().lower()
    if kind == "handwritten":
        return data.load_handwritten(seed=seed)
    if kind == "mmsa":
        if not arg:
            raise ValueError("--data mmsa needs a path: mmsa:PATH/TO/aligned_50.pkl")
        return data.load_mmsa(arg)
    if kind == "avmnist":
        if not arg:
            raise ValueError("--data avmnist needs a directory: avmnist:DIR")
        return data.load_avmnist(arg)
    if kind == "synthetic":
        return data.make_synthetic(preset=arg or None, seed=seed)
    raise ValueError(f"--data must be handwritten, mmsa:PATH, avmnist:DIR or synthetic[:preset], "
                     f"got {spec!r}")


def parse_protocol(spec: str) -> list[tuple[str, Optional[float]]]:
    """'complete', 'subsets', 'eta' (0.1..0.5) or 'eta:0.1,0.3', 'instance:0.3', joined by '+'
    -> [(kind, value), ...]. The protocols are CyIN's (see robustmm_fast.missing):
    subsets = every non-empty modality combination, given to every sample; eta = dataset-level
    missing rate (fraction of missing entries, each sample keeps >= 1; eta >= (M-1)/M keeps
    exactly one per sample); instance:p = with probability p a sample gets one of the 2^M - 2
    incomplete non-empty patterns, uniformly, otherwise it is complete. Values lie in [0, 1]."""
    out: list[tuple[str, Optional[float]]] = []
    for part in spec.split("+"):
        kind, _, values = part.strip().lower().partition(":")
        if kind in ("complete", "subsets"):
            if values:
                raise ValueError(f"protocol {kind!r} takes no value, got {part!r}")
            out.append((kind, None))
        elif kind in ("eta", "instance"):
            try:
                nums = [float(v) for v in values.split(",")] if values else (
                    list(DEFAULT_ETAS) if kind == "eta" else [])
            except ValueError:
                raise ValueError(f"protocol {part!r}: values must be numbers, e.g. eta:0.1,0.3") from None
            if not nums:
                raise ValueError(f"protocol {kind!r} needs a probability, e.g. instance:0.3")
            for v in nums:
                if not 0.0 <= v <= 1.0:  # also rejects nan
                    raise ValueError(f"protocol {part!r}: values must be in [0, 1], got {v!r}")
            out.extend((kind, v) for v in nums)
        else:
            raise ValueError(f"protocol must be complete, subsets, eta[:v,...] or instance:v "
                             f"(joined by '+'), got {part!r}")
    return out


def protocol_masks(dataset, protocol: Sequence[tuple[str, Optional[float]]], seed: int,
                   split: str = "test") -> dict[str, torch.Tensor]:
    """{point name: (n_split, M) bool} for every point of the protocol, drawn once per seed
    over the whole split (`seed` seeds every random point), so every method meets the same
    masks. Names: "complete", "subset:<a+b>", "eta:<v>", "instance:<v>"."""
    from .missing import fixed_subsets, instance_missing, random_missing, subset_name
    n, M = dataset.split_size(split), dataset.num_modalities
    masks: dict[str, torch.Tensor] = {}
    for kind, value in protocol:
        if kind == "complete":
            masks["complete"] = torch.ones(n, M, dtype=torch.bool)
        elif kind == "subsets":
            for row in fixed_subsets(M):
                masks["subset:" + subset_name(row, dataset.modalities)] = row.expand(n, M).clone()
        elif kind == "eta":
            masks[f"eta:{value:g}"] = (torch.ones(n, M, dtype=torch.bool) if value == 0
                                       else random_missing(n, M, value, seed))
        else:
            masks[f"instance:{value:g}"] = instance_missing(n, M, value, seed)
    return masks


def score(model, dataset, masks: dict[str, torch.Tensor], split: str = "test",
          device="cpu") -> dict[str, dict]:
    """{point name: metrics dict} of a trained model on every mask (train.evaluate_masks: all
    masks in few passes, the metrics of one evaluate() per mask)."""
    from .train import evaluate_masks
    return evaluate_masks(model, dataset, masks, split, device=device)


@dataclass
class RunResult:
    """per_seed[method][seed] = {point: metrics}; summary[method] = aggregated numbers."""
    metric: str
    higher_is_better: bool
    per_seed: dict = field(default_factory=dict)
    summary: dict = field(default_factory=dict)
    etas: tuple = ()
    meta: dict = field(default_factory=dict)


def _mean_std(values: list[float]) -> tuple[float, float]:
    t = torch.tensor(values, dtype=torch.float64)
    return float(t.mean()), float(t.std(unbiased=True)) if len(values) > 1 else 0.0


def summarize(result: RunResult) -> None:
    """Fill result.summary from result.per_seed."""
    from .metrics import curve_area, effective_robustness, relative_robustness, subset_mean
    key = result.metric
    curves: dict[str, list[list[float]]] = {}
    for method, seeds in result.per_seed.items():
        s: dict = {}
        points = list(next(iter(seeds.values())))
        for point in points:
            s[point] = _mean_std([seeds[sd][point][key] for sd in seeds])
        subset_points = [p for p in points if p.startswith("subset:")]
        if subset_points:
            s["subset_mean"] = _mean_std([subset_mean([seeds[sd][p][key] for p in subset_points])
                                          for sd in seeds])
        if result.etas:
            xs = [0.0] + list(result.etas)
            curve = [[seeds[sd]["complete"][key]] + [seeds[sd][f"eta:{e:g}"][key] for e in result.etas]
                     for sd in seeds]
            curves[method] = curve
            s["eta_area"] = _mean_std([curve_area(xs, c) for c in curve])
            s["relative_robustness"] = _mean_std([relative_robustness(c) for c in curve])
        result.summary[method] = s
    baseline = curves.get("late_fusion")
    if baseline is not None:
        base = [sum(col) / len(col) for col in zip(*baseline)]
        for method, curve in curves.items():
            result.summary[method]["effective_robustness"] = _mean_std(
                [effective_robustness(c, base) for c in curve])


DEFAULT_PROTOCOL = "complete+subsets+eta"


def run(methods: Optional[Sequence[str]] = None, *, data: str = "handwritten",
        seeds: Sequence[int] = DEFAULT_SEEDS, protocol: str = DEFAULT_PROTOCOL,
        out: str | Path = "robustmm-results", quick: bool = False,
        overrides: Optional[dict] = None, config_file: Optional[dict] = None,
        device: str = "cpu", progress: bool = True,
        log: Callable[[str], None] = print, first_dataset=None,
        jobs: Optional[int] = None, threads: Optional[int] = None,
        torchrun: str = "cells") -> Optional[RunResult]:
    """Train and score every method on every seed; write out/results.json, results.csv,
    results.md and robustness.png.

    The (method, seed) cells run as robustmm_fast.grid describes: each written to
    out/<method>/seed-<seed>/scores.json when it finishes, skipped by a rerun, in `jobs` worker
    processes of `threads` threads (defaults: one per usable core, one thread each, on the
    CPU; 1 on a GPU). The table does not depend on jobs, only on the threads per cell.
    torchrun: under torchrun, "cells" spreads the cells over the ranks (rank 0 writes the
    tables, the other ranks return None); "ddp" trains every cell on all ranks with DDP.
    first_dataset: load_data(data, seeds[0]) when the caller has loaded it already (the CLI
    does, to check --data before anything else), so it is not read twice; None loads it."""
    from .grid import GridSpec, run_grid
    from .metrics import primary_metric
    from .missing import save_masks
    from .models.registry import METHODS
    from .train import distributed as dist_utils
    if torchrun not in ("cells", "ddp"):
        raise ValueError(f"torchrun must be 'cells' or 'ddp', got {torchrun!r}")
    methods = list(methods or METHODS)
    out = Path(out)
    points = parse_protocol(protocol)
    if ("complete", None) not in points:
        points.insert(0, ("complete", None))  # every table starts from the complete test set
    etas = [v for k, v in points if k == "eta" and v > 0]
    # a bad spec, file or config fails here, before training
    first = load_data(data, seeds[0]) if first_dataset is None else first_dataset
    configs = method_configs(methods, first.name, overrides=overrides, config_file=config_file,
                             quick=quick)
    key, higher = primary_metric(first.task)
    result = RunResult(key, higher, etas=tuple(etas),
                       meta={"data": data, "dataset": first.name, "seeds": list(seeds),
                             "methods": methods, "quick": quick, "modalities": first.modalities})
    distributed = dist_utils._env_int("WORLD_SIZE", 1) > 1
    is_main = dist_utils._env_int("RANK", 0) == 0
    out.mkdir(parents=True, exist_ok=True)
    datasets, masks = {}, {}
    for seed in seeds:  # the masks of every seed first: every cell of a seed meets the same
        datasets[seed] = first if seed == seeds[0] else load_data(data, seed)
        masks[seed] = protocol_masks(datasets[seed], points, seed)
        if is_main:
            save_masks(out / "masks" / f"seed-{seed}.npz", masks[seed],
                       {"seed": seed, "data": data, "modalities": first.modalities,
                        "split": "test", "protocol": protocol})
    spec = GridSpec(data, protocol, configs, masks, out, key, device)
    if distributed and torchrun == "ddp":
        grid = _run_ddp(spec, methods, seeds, datasets, log, progress)
    else:
        with _OutLock(out, enabled=not distributed):
            grid = run_grid(spec, methods, seeds, jobs=jobs, threads=threads,
                            datasets=datasets, log=log, progress=progress)
    if grid is None or not is_main:
        return None
    result.per_seed = grid
    summarize(result)
    write_results(result, out, log)
    return result


def _run_ddp(spec, methods, seeds, datasets, log, progress) -> dict:
    """Every cell on all ranks together (fit's DDP), one after another; robustmm train."""
    from .grid import Cell, _cell_line
    from .models.registry import METHODS
    from .train import fit
    grid: dict = {}
    start = time.perf_counter()
    for k, (seed, method) in enumerate((s, m) for s in seeds for m in methods):
        t0 = time.perf_counter()
        fitted = fit(METHODS[method], datasets[seed], config=spec.configs[method], seed=seed,
                     out_dir=spec.out / method / f"seed-{seed}", device=spec.device,
                     progress=progress)
        scores = json.loads(json.dumps(score(fitted.model, datasets[seed], spec.masks[seed],
                                             device=spec.device)))
        grid.setdefault(method, {})[seed] = scores
        record = {"scores": scores, "best_epoch": fitted.best_epoch,
                  "seconds": time.perf_counter() - t0}
        log(_cell_line(Cell(method, seed), record, spec.metric, time.perf_counter() - start,
                       k + 1, len(seeds) * len(methods)))
    return grid


class _OutLock:
    """An exclusive lock on out/.robustmm-run.lock for the run (fcntl.flock, released by the
    kernel if the process dies): two runs writing one directory would race on its cells."""

    def __init__(self, out: Path, enabled: bool = True):
        self.path, self.enabled, self.fd = out / ".robustmm-run.lock", enabled, None

    def __enter__(self):
        if not self.enabled:
            return self
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock
            return self
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            from .usage import UsageError
            os.close(self.fd)
            self.fd = None
            raise UsageError(f"another robustmm run is writing to {self.path.parent}; wait for "
                               "it to finish or use another --out") from None
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            os.close(self.fd)  # closing releases the flock
            self.fd = None
        return False


def method_configs(methods: Sequence[str], dataset_name: str, *,
                   overrides: Optional[dict] = None, config_file: Optional[dict] = None,
                   quick: bool = False) -> dict[str, dict]:
    """{method: its full config on this dataset}: defaults, the dataset's preset, the config
    file's shared keys and the method's table, then overrides; checked (keys and typed values)
    as fit will use it. With several methods a shared key goes to the methods that have it,
    and one that none has is an error."""
    from .config import merge, select
    from .contract import ENGINE_KEYS
    from .models.registry import METHODS, default_config
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"unknown method {m!r}; known: {sorted(METHODS)}")
    shared = merge({k: v for k, v in (config_file or {}).items() if k not in METHODS},
                   overrides or {})
    if len(methods) > 1:
        unknown = sorted(k for k in shared if k not in ENGINE_KEYS
                         and not any(k in METHODS[m].defaults for m in methods))
        if unknown:
            raise ValueError(f"config key(s) {unknown} belong to none of the methods {methods}")
    configs = {}
    for method in methods:
        own = merge(select(config_file or {}, method, METHODS), overrides or {})
        if len(methods) > 1:
            own = {k: v for k, v in own.items()
                   if k in METHODS[method].defaults or k in ENGINE_KEYS or k not in shared}
        engine = {k: v for k, v in own.items() if k in ENGINE_KEYS}
        cfg = merge(default_config(method, dataset_name), own)
        # the method's own keys checked now (typed values), the engine's keys by the engine
        METHODS[method].config(dataset_name, {k: v for k, v in cfg.items() if k not in engine})
        configs[method] = _quick(cfg) if quick else cfg
    return configs


def _quick(cfg: dict) -> dict:
    """A smoke run: a few epochs of every stage."""
    cfg = dict(cfg)
    for key, value in cfg.items():
        if key.endswith("epochs") and isinstance(value, int) and value > 0:
            cfg[key] = max(1, min(value, 3))
    return cfg


def _pm(ms: tuple[float, float], scale: float, digits: int = 2) -> str:
    mean, std = ms
    if math.isnan(mean):
        return "nan"
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"


_EXTRA_NAMES = {"eta_area": "η-curve area", "relative_robustness": "relative robustness",
                "effective_robustness": "effective robustness (vs late fusion)"}


def format_table(result: RunResult) -> str:
    """Markdown: one row per method; complete, subset mean, each eta, area, robustness."""
    pct = 100.0 if result.metric in ("accuracy", "f1_macro", "f1_weighted", "uar") else 1.0
    first = next(iter(result.summary.values()), {})
    cols = ["complete"] + (["subset_mean"] if "subset_mean" in first else [])
    cols += [f"eta:{e:g}" for e in result.etas]
    cols += [p for p in first if p.startswith("instance:")]
    names = [{"complete": "complete", "subset_mean": "mean of subsets"}.get(c, c.replace(
        "eta:", "η=").replace("instance:", "p=")) for c in cols]
    extra = [c for c in ("eta_area", "relative_robustness", "effective_robustness")
             if any(c in s for s in result.summary.values())]
    unit = " (%)" if pct == 100.0 else ""
    lines = [f"| method | " + " | ".join(f"{n}{unit}" for n in names)
             + "".join(f" | {_EXTRA_NAMES[c]}{unit if c == 'eta_area' else ''}" for c in extra)
             + " |",
             "|---" * (1 + len(cols) + len(extra)) + "|"]
    for method, s in result.summary.items():
        row = [_pm(s[c], pct) if c in s else "–" for c in cols]
        row += [(_pm(s[c], pct) if c == "eta_area" else _pm(s[c], 1.0, 3)) if c in s else "–"
                for c in extra]
        lines.append(f"| {method} | " + " | ".join(row) + " |")
    seeds = result.meta.get("seeds", [])
    return (f"{result.meta.get('dataset')}: {result.metric} on the test split, mean ± std over "
            f"{len(seeds)} seed(s) {seeds}\n\n" + "\n".join(lines))


def write_results(result: RunResult, out: Path, log: Callable[[str], None] = print) -> None:
    table = format_table(result)
    log("\n" + table)
    (out / "results.md").write_text(table + "\n")
    payload = {"metric": result.metric, "higher_is_better": result.higher_is_better,
               "etas": list(result.etas), "meta": result.meta,
               "summary": {m: {k: {"mean": v[0], "std": v[1]} for k, v in s.items()}
                           for m, s in result.summary.items()},
               "per_seed": {m: {str(sd): pts for sd, pts in seeds.items()}
                            for m, seeds in result.per_seed.items()}}
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(payload, indent=1))
    tmp.replace(out / "results.json")
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "seed", "point", "metric", "value"])
        for m, seeds in result.per_seed.items():
            for sd, pts in seeds.items():
                for point, metrics in pts.items():
                    for k, v in metrics.items():
                        w.writerow([m, sd, point, k, v])
    log(f"\nwritten: {out / 'results.json'}, {out / 'results.csv'}, {out / 'results.md'}")
    png = plot_curves(result, out / "robustness.png")
    log(f"          {png}" if png else "          (no robustness.png: `pip install matplotlib` "
                                        "for the curve plot)")


def plot_curves(result: RunResult, path: Path) -> Optional[Path]:
    """The eta curve per method (mean ± std band); None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    if not result.etas:
        return None
    xs = [0.0] + list(result.etas)
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    for method, s in result.summary.items():
        pts = [s["complete"]] + [s[f"eta:{e:g}"] for e in result.etas]
        mean = [p[0] for p in pts]
        std = [p[1] for p in pts]
        ax.plot(xs, mean, marker="o", label=method)
        ax.fill_between(xs, [m - d for m, d in zip(mean, std)], [m + d for m, d in zip(mean, std)],
                        alpha=0.15)
    ax.set_xlabel("missing rate η")
    ax.set_ylabel(result.metric)
    ax.set_title(f"{result.meta.get('dataset')}: robustness to missing modalities")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
