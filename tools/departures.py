"""Shared by tools/measure_*_departures.py: one `robustmm run` per variant of a method's
config (--set overrides), its results.json read back, and the mean ± std cell format."""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import time
from pathlib import Path


def command(method: str, protocol: str, seeds: str, out: Path, sets: list[str]) -> list[str]:
    cmd = ["robustmm", "run", "--methods", method, "--seeds", seeds, "--out", str(out),
           "--protocol", protocol, "--no-progress"]
    for s in sets:
        cmd += ["--set", s]
    return cmd


def run_variant(method: str, protocol: str, seeds: str, out: Path, sets: list[str],
                reuse: bool = False) -> tuple[dict, float, str]:
    """(results.json, wall seconds, the command line) of one variant, on one thread;
    reuse: read an earlier run in `out` instead of rerunning."""
    cmd = command(method, protocol, seeds, out, sets)
    if reuse and (out / "wall.json").exists():
        wall = json.loads((out / "wall.json").read_text())["wall_s"]
    else:
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                       stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - t0
        (out / "wall.json").write_text(json.dumps({"wall_s": wall}))
    result = json.loads((out / "results.json").read_text())
    return result, wall, "OMP_NUM_THREADS=1 " + shlex.join(cmd)


def pct(ms: dict) -> str:
    return f"{100 * ms['mean']:.2f} ± {100 * ms['std']:.2f}"
