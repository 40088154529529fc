"""`robustmm bench models` (robustmm_fast/bench/models.py): every benchmarked method's timed
training step and inference forward run eagerly on the fused and on the reference backend, and
the closures refuse to time a step in which a fused op did not run on the backend asked for."""
from __future__ import annotations

import pytest
import torch

from robustmm_fast import cli
from robustmm_fast.bench import models as bench_models

from conftest import require_cpp


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("method", ["dmrnet", "mim"])
def test_training_step_runs_on_the_backend_asked_for(method, backend):
    """CyIN's official MOSI configuration takes seconds per step here, so only DMRNet and MIM
    (its closures are the same code)."""
    ops = bench_models.METHODS[method][2]
    if backend == "auto":
        for op in ops:
            require_cpp(op)
    (case,) = bench_models.cases(methods=(method,))
    closures = bench_models._step_closures(case, torch.device("cpu"), backend, compiled=False)
    assert closures is not None
    forward, train_step = closures
    train_step()
    out = forward()
    assert torch.isfinite(out.output).all() and out.output.shape[0] == bench_models.BATCH


def test_cli_method_choices_are_the_benchmarked_methods(capsys):
    assert set(cli.BENCH_METHODS) == set(bench_models.METHODS)
    # --method is shared with `bench harness` (any registered method), so models checks its own
    assert cli.main(["bench", "models", "--method", "no-such-method"]) == 2
    err = capsys.readouterr().err
    assert "no-such-method" in err and "--method" in err and "cyin_joint" in err
    assert cli.main(["bench", "reparam_kl", "--method", "dmrnet"]) == 2   # models only
