"""`robustmm bench harness` (robustmm_fast.bench.harness) and the CLI's malloc setting
(robustmm_fast.train.memory): the probe measures this package (not another install), the
report carries every table, and keep_freed_memory really stops the page faults it is for."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from robustmm_fast.bench import harness

LINUX_GLIBC = sys.platform.startswith("linux") and os.confstr("CS_GNU_LIBC_VERSION") is not None


def test_probe_measures_this_package_in_a_fresh_process():
    r = harness.probe({"task": "train", "data": "m:2", "method": "late_fusion"})
    assert "error" not in r, r
    assert r["package"].startswith(str(harness._root()))
    assert r["epochs"] == 1 and r["rows"] == 1400  # 70 % of 2,000 synthetic samples, one epoch
    assert r["rows_per_s"] > 0 and r["fit_rows_per_s"] > 0
    s = harness.probe({"task": "score", "data": "m:2", "method": "late_fusion"})
    assert s["masks"] == 2 ** 2 - 1 + 1 + 5  # subsets, complete, eta 0.1 ... 0.5
    assert s["rows"] == s["masks"] * 400
    f = harness.probe({"task": "flops", "data": "m:2", "method": "late_fusion"})
    assert f["train_flops_per_row"] > f["score_flops_per_row"] > 0  # backward costs FLOPs too


def test_probe_reports_a_failing_task_instead_of_raising():
    r = harness.probe({"task": "train", "data": "m:2", "method": "no_such_method"})
    assert "no_such_method" in r["error"]


def test_report_has_every_table_and_is_rebuilt_from_its_raw_file(monkeypatch, tmp_path):
    def fake_probe(task, engine=None, timeout=0):
        if task["task"] == "flops":
            return {**task, "train_flops_per_row": 3e6, "score_flops_per_row": 1e6, "epochs": 2,
                    "n_train": 1440, "n_valid": 160, "n_test": 400, "modalities": 6}
        rate = 2000.0 if engine is None else 1000.0
        return {**task, "rows_per_s": rate, "fit_rows_per_s": rate / 2}
    monkeypatch.setattr(harness, "probe", fake_probe)
    monkeypatch.setattr(harness, "baseline_checkout", lambda ref, log=print: "/baseline")
    monkeypatch.setattr(harness, "main_job", lambda engine: 100.0 if engine is None else 300.0)
    raw = tmp_path / "raw.jsonl"
    report = harness.run_harness_bench(data=("handwritten",), methods=("late_fusion",),
                                       log=lambda s: None, raw=raw)
    assert harness.report_from_raw(raw).split("\n", 1)[1] == report.split("\n", 1)[1]
    assert "| this | 100.0 | 3.00x |" in report
    assert "| handwritten | late_fusion | 1,000 (2,000) | 500 (1,000) | 2.00x |" in report
    assert "| handwritten | late_fusion | 2,000 | 1,000 | 2.00x |" in report  # scoring
    assert "The main job's FLOP floor" in report


def test_a_measurement_beyond_its_flop_floor_limit_is_skipped(monkeypatch):
    calls = []

    def fake_probe(task, engine=None, timeout=0):
        calls.append(task["task"])
        if task["task"] == "flops":
            return {**task, "train_flops_per_row": 1e15, "score_flops_per_row": 1.0,
                    "n_train": 1400, "n_test": 400, "modalities": 2}
        return {**task, "rows_per_s": 1.0, "fit_rows_per_s": 1.0}
    monkeypatch.setattr(harness, "probe", fake_probe)
    report = harness.run_harness_bench(baseline=None, data=("m:2",), methods=("cyin",),
                                       with_main_job=False, log=lambda s: None)
    assert calls == ["flops", "score"]  # training skipped, scoring measured
    assert "skipped: its FLOP floor is" in report


def _faults_script(call: bool) -> str:
    return textwrap.dedent(f"""
        import resource, torch
        from robustmm_fast.train.memory import keep_freed_memory
        print(keep_freed_memory() if {call} else None)
        for _ in range(2):                      # warm: the heap holds the block after this
            torch.ones(16 * 2**20).sum()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(10):                     # 64 MiB allocated, touched and freed
            torch.ones(16 * 2**20).sum()
        print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    """)


@pytest.mark.skipif(not LINUX_GLIBC, reason="mallopt is glibc's")
def test_keep_freed_memory_stops_the_page_faults_of_large_blocks():
    env = {k: v for k, v in os.environ.items() if k != "ROBUSTMM_MALLOC"}
    runs = {}
    for call in (False, True):
        out = subprocess.run([sys.executable, "-c", _faults_script(call)], env=env, check=True,
                             capture_output=True, text=True).stdout.split()
        runs[call] = (out[0], int(out[1]))
    assert runs[True][0] == "True"
    pages = 10 * 64 * 2**20 // 4096             # every page of every block, faulted again
    assert runs[False][1] > pages // 2, runs    # glibc's default: mmap'd and unmapped each time
    assert runs[True][1] < pages // 50, runs    # kept: reused without faults


@pytest.mark.skipif(not LINUX_GLIBC, reason="mallopt is glibc's")
def test_keep_freed_memory_can_be_turned_off():
    env = {**os.environ, "ROBUSTMM_MALLOC": "default"}
    out = subprocess.run([sys.executable, "-c", _faults_script(True)], env=env, check=True,
                         capture_output=True, text=True).stdout.split()
    assert out[0] == "False"
    assert int(out[1]) > 10 * 64 * 2**20 // 4096 // 2


def test_the_cli_keeps_freed_memory_in_run_and_its_workers():
    from robustmm_fast import cli, grid
    assert "keep_freed_memory" in cli._command.__code__.co_names
    assert "keep_freed_memory" in grid._init_worker.__code__.co_names
