"""benches/gpu_check.sh and benches/gpu_smoke.py, checked on CPU (issue 14: the GPU validation
script's logic, dry-run without a GPU).

- the dry run exits 0, names every step (the GPU-only ones printed, the rest run on CPU) and its
  smoke table has no FAIL;
- a failing step does not stop the later ones, and the exit status is then non-zero;
- a step left without time is reported NOT RUN and fails the check;
- the smoke test fails (exit 1, FAIL rows) when a backend's output is wrong (--perturb).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benches" / "gpu_check.sh"
SMOKE = ROOT / "benches" / "gpu_smoke.py"
STEPS = ("env", "build", "smoke", "pytest", "bench-masked_attention-bfloat16",
         "bench-reparam_kl-bfloat16", "bench-cycle_loss-bfloat16", "bench-masked_attention-float32",
         "bench-reparam_kl-float32", "bench-cycle_loss-float32")

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="bash + coreutils timeout")


def _env(**extra) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHON=sys.executable)
    # what .ci/run (ROBUSTMM_REQUIRE_EXT=1) or a GPU shell exports must not leak into the
    # commands the script is checked to pass on
    for name in ("TRITON_INTERPRET", "ROBUSTMM_REQUIRE_EXT", "TORCH_CUDA_ARCH_LIST", "MAX_JOBS"):
        env.pop(name, None)
    env.update(extra)
    return env


def _check(*args, timeout=120, **env) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=_env(**env), text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout)


def _summary(out_dir: Path) -> dict[str, str]:
    rows = {}
    for line in (out_dir / "summary.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 4 and cells[0] not in ("step", "---"):
            rows[cells[0]] = cells[3]
    return rows


def test_dry_run_lists_every_step_and_passes(tmp_path):
    run = _check("--dry-run", "--out", str(tmp_path))
    assert run.returncode == 0, run.stdout[-4000:]
    for step in STEPS:
        assert f"=== {step} " in run.stdout, f"step {step} not listed"
    # the GPU commands it would run are printed in full
    assert "pip install --no-build-isolation --no-deps -v -e" in run.stdout
    assert "ROBUSTMM_REQUIRE_EXT=1" in run.stdout and "-m pytest -m gpu -x -q" in run.stdout
    assert "gpu_smoke.py --device cuda --require" in run.stdout
    assert "robustmm_fast.cli bench reparam_kl --device cuda --dtype bfloat16 --shape 256x50x1024" in run.stdout
    summary = _summary(tmp_path)
    assert summary["env"] == summary["smoke"] == summary["pytest-collect"] == summary["bench-flags"] == "PASS"
    assert summary["build"].startswith("DRY RUN")
    # the smoke test ran on CPU: every op, no FAIL, at least the reference rows PASS
    table = (tmp_path / "smoke.md").read_text()
    assert "| FAIL |" not in table
    for op in ("reparam_kl", "masked_attention", "cycle_loss"):
        assert re.search(rf"\| {op} \| [^|]+ \| reference \| float32 \| PASS \|", table), op
    assert (tmp_path / "header.md").read_text().count("- torch: ") == 1


def test_a_failing_step_does_not_stop_the_later_ones(tmp_path):
    run = _check("--dry-run", "--out", str(tmp_path), timeout=60, PYTHON="false")
    assert run.returncode == 1, run.stdout[-4000:]
    summary = _summary(tmp_path)
    for step in ("env", "smoke", "pytest-collect", "bench-flags"):
        assert summary[step].startswith("FAIL"), (step, summary)
    assert "SOME STEPS FAILED" in run.stdout


def test_a_step_out_of_time_is_not_run_and_fails(tmp_path):
    run = _check("--dry-run", "--out", str(tmp_path), timeout=60, GPU_CHECK_BUDGET_S="6")
    assert run.returncode == 1, run.stdout[-4000:]
    assert _summary(tmp_path)["bench-flags"] == "NOT RUN (no time left)"


def test_gpu_run_commands_with_a_stand_in_python(tmp_path):
    """The real (non-dry) path's wiring: a stand-in python records every call, and reports a
    GPU of capability 9.0."""
    calls = tmp_path / "calls.log"
    fake = tmp_path / "python"
    fake.write_text('#!/usr/bin/env bash\n'
                    'echo "ARCH=${TORCH_CUDA_ARCH_LIST:-} JOBS=${MAX_JOBS:-} REQ=${ROBUSTMM_REQUIRE_EXT:-} $*" >> "$CALLS"\n'
                    '[ "$1" = -c ] && echo "fake-gpu 9.0"\n'
                    'exit 0\n')
    fake.chmod(0o755)
    out = tmp_path / "results"
    run = _check("--out", str(out), timeout=60, PYTHON=str(fake), CALLS=str(calls), MAX_JOBS="3")
    assert run.returncode == 0, run.stdout[-4000:]
    log = calls.read_text()
    assert f"ARCH=9.0 JOBS=3 REQ= -m pip install --no-build-isolation --no-deps -v -e {ROOT}" in log
    assert f"benches/gpu_smoke.py --device cuda --require --output {out}/smoke.md" in log
    assert f"REQ=1 -m pytest -m gpu -x -q -p no:cacheprovider --junitxml {out}/pytest-gpu.xml" in log
    for dtype in ("bfloat16", "float32"):
        for op in ("reparam_kl", "cycle_loss"):
            assert (f"-m robustmm_fast.cli bench {op} --device cuda --dtype {dtype} --shape 256x50x1024"
                    in log), (op, dtype)
        assert f"attention_bench.py --device cuda --dtype {dtype} --output {out}/bench-masked_attention-{dtype}.md" in log
    summary = _summary(out)
    assert set(STEPS) <= set(summary) and set(summary.values()) == {"PASS"}, summary
    assert "# GPU check: fake-gpu" in (out / "header.md").read_text()


def _smoke(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SMOKE), "--device", "cpu", "--size", "tiny", *args],
                          cwd=ROOT, env=_env(), text=True, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, timeout=120)


def test_smoke_fails_when_a_backend_is_wrong():
    run = _smoke("--op", "cycle_loss", "--dtype", "float32", "--dtype", "bfloat16",
                 "--perturb", "cycle_loss:reference", "--perturb", "cycle_loss:cpp")
    assert run.returncode == 1, run.stdout[-4000:]
    rows = re.findall(r"^\| cycle_loss \| (\w+) \| (\w+) \| (\w+) \| (\w+) \|", run.stdout, re.M)
    assert len(rows) == 4 * 2 * 2  # distances x dtypes x backends
    for distance, backend, dtype, status in rows:
        assert status == "FAIL" or (backend == "cpp" and status == "SKIP"), (distance, backend, dtype, status)


def test_smoke_rejects_a_malformed_perturb():
    run = _smoke("--perturb", "nonsense")
    assert run.returncode == 2 and "OP:BACKEND" in run.stdout
