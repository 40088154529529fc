"""The training engine (robustmm_fast.train): learning, selection on the validation split only,
exact resume, atomic checkpoints, the non-finite-loss stop, scoring, and DDP with 2 processes.

The tiny dataset and model live in tests/_ddp_worker.py (shared with the torchrun worker)."""
from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from _ddp_worker import DDP_RUNS, SEED, TinyModel, builder, ddp_config, make_data
from robustmm_fast.train import (NonFiniteLossError, Recipe, evaluate, fit, load_best,
                                 load_checkpoint, load_trained, predict, save_atomic)
from robustmm_fast.train import checkpoint as ckpt_mod
from robustmm_fast.train import distributed, engine

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().parent / "_ddp_worker.py"


def _fit(ds, cfg, *, seed=5, out_dir=None, recipe=None, **model_kw):
    return fit(None, ds, model=builder(**model_kw), recipe=recipe or Recipe(cfg), seed=seed,
               out_dir=out_dir, progress=False)


def _same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def _no_time(history):
    return [{k: v for k, v in h.items() if k != "time"} for h in history]


# ---------------------------------------------------------------- learning and selection

def test_fit_learns_and_returns_the_selected_epoch(tmp_path):
    ds = make_data(n_train=150, n_valid=60, n_test=60, seed=1)
    torch.manual_seed(5)
    assert evaluate(builder()(ds, {}), ds, "valid")["accuracy"] < 0.7  # untrained: near chance
    res = _fit(ds, {"epochs": 6, "batch_size": 32, "lr": 2e-2}, out_dir=tmp_path)
    assert res.best_valid["accuracy"] >= 0.9
    assert evaluate(res.model, ds, "test")["accuracy"] >= 0.85
    assert res.history[-1]["train"]["loss"] < res.history[0]["train"]["loss"]
    assert [h["epoch"] for h in res.history] == list(range(6))
    assert set(res.history[0]) == {"epoch", "stage", "train", "valid", "selected", "time"}
    assert set(res.history[0]["train"]) == {"loss", "task", "l2"}
    # selection: the best validation accuracy, ties going to the lower validation loss; its
    # weights returned
    ranked = sorted(res.history, key=lambda h: (-h["valid"]["accuracy"], h["valid"]["loss"],
                                                 h["epoch"]))
    assert res.best_epoch == ranked[0]["epoch"]
    assert evaluate(res.model, ds, "valid") == res.best_valid
    assert not res.model.training
    best = load_best(tmp_path / "best.pt")
    assert best["best_epoch"] == res.best_epoch and best["method"] == "custom:TinyModel"
    assert _same_state(best["model"], res.model.state_dict())
    assert best["data"]["modalities"] == {"a": [1, 4], "b": [3, 2]}


class _WarmupRecipe(Recipe):
    """Epochs 0-1 are a 'warmup' stage that may not be selected."""

    def stage(self, epoch):
        return "warmup" if epoch < 2 else "main"

    def selects(self, epoch):
        return epoch >= 2


def test_fit_respects_stages_and_selects():
    ds = make_data(seed=3)
    res = _fit(ds, None, recipe=_WarmupRecipe({"epochs": 4, "batch_size": 16, "lr": 3e-2}))
    assert [h["stage"] for h in res.history] == ["warmup", "warmup", "main", "main"]
    assert res.best_epoch >= 2
    assert not any(h["selected"] for h in res.history[:2])

    class Never(Recipe):
        def selects(self, epoch):
            return False
    with pytest.raises(ValueError, match="selects no epoch"):
        _fit(ds, None, recipe=Never({"epochs": 2}))


def test_fit_never_reads_the_test_split(monkeypatch):
    ds = make_data(seed=2)
    test_rows = set(ds.splits["test"].tolist())
    for x in ds.inputs.values():  # scoring the test split would give NaN logits
        x[ds.splits["test"]] = float("nan")
    seen = []
    original = ds.batch

    def spy(index, present=None):
        seen.append(index.clone())
        return original(index, present)
    monkeypatch.setattr(ds, "batch", spy)
    res = _fit(ds, {"epochs": 3, "batch_size": 16, "lr": 1e-2, "modality_dropout": 0.3})
    rows = set(torch.cat(seen).tolist())
    assert not rows & test_rows
    assert rows == set(ds.splits["train"].tolist()) | set(ds.splits["valid"].tolist())
    for h in res.history:
        assert set(h) == {"epoch", "stage", "train", "valid", "selected", "time"}
        assert all(math.isfinite(v) for v in h["valid"].values())
        assert h["valid"]["n"] == ds.split_size("valid")


def test_fit_with_a_method_config_and_load_trained(tmp_path):
    ds = make_data(seed=6)
    method = SimpleNamespace(
        name="tiny", defaults={"epochs": 2, "batch_size": 16, "lr": 1e-2, "hidden": 8},
        presets={"tiny": {"lr": 2e-2}},
        build=lambda dataset, cfg: builder(hidden=cfg["hidden"])(dataset, cfg),
        recipe=lambda cfg: Recipe({k: cfg[k] for k in ("epochs", "batch_size", "lr")}))
    res = fit(method, ds, config={"hidden": 12, "select_on": "random:0.5"}, seed=3,
              out_dir=tmp_path, progress=False)
    assert res.config == {"epochs": 2, "batch_size": 16, "lr": 2e-2, "hidden": 12,
                          "select_on": "random:0.5"}
    assert res.model.head.in_features == 12
    # selection scored the validation split under the seeded random-missing mask
    from robustmm_fast.missing import random_missing
    mask = random_missing(ds.split_size("valid"), 2, 0.5, 3)
    assert evaluate(res.model, ds, "valid", present=mask) == res.best_valid
    rebuilt = load_trained(tmp_path / "best.pt", ds, method=method)
    assert _same_state(rebuilt.state_dict(), res.model.state_dict())
    other = make_data(seed=6)
    other.inputs["a"] = torch.zeros(other.num_samples, 1, 5)
    with pytest.raises(ValueError, match="modalities"):
        load_trained(tmp_path / "best.pt", other, method=method)
    with pytest.raises(ValueError, match="select_on"):
        fit(method, ds, config={"select_on": "sometimes"}, progress=False)
    with pytest.raises(ValueError, match="either a method or model="):
        fit(method, ds, model=builder(), recipe=Recipe({}), progress=False)


def test_progress_bar_shows_loss_and_metric(capsys):
    _fit(make_data(seed=7), {"epochs": 1, "batch_size": 16})  # progress=False: silent
    assert capsys.readouterr().err == ""
    fit(None, make_data(seed=7), model=builder(), recipe=Recipe({"epochs": 1, "batch_size": 16}),
        progress=True)
    err = capsys.readouterr().err
    assert "loss=" in err and "accuracy=" in err and "1/1" in err


# ---------------------------------------------------------------- resume exactness

class _CrashAt(Recipe):
    """Raises in on_epoch_end of `crash` -- before that epoch's checkpoint is written."""

    def __init__(self, config, crash):
        super().__init__(config)
        self.crash = crash

    def on_epoch_end(self, model, epoch, stage):
        if epoch == self.crash:
            raise RuntimeError("simulated crash")


RESUME_CFG = {"epochs": 4, "batch_size": 16, "lr": 1e-2, "modality_dropout": 0.3}


def _crash_and_resume(ds, out_dir):
    with pytest.raises(RuntimeError, match="simulated crash"):
        _fit(ds, None, out_dir=out_dir, recipe=_CrashAt(RESUME_CFG, crash=2), dropout=0.3)
    assert load_checkpoint(out_dir / "checkpoint.pt")["epoch"] == 1  # epochs 0 and 1 are saved
    assert not (out_dir / "best.pt").exists()
    torch.manual_seed(12345)  # a new process's RNG would be anywhere: restoring it must matter
    torch.rand(1000)
    return _fit(ds, RESUME_CFG, out_dir=out_dir, dropout=0.3)


def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path, monkeypatch):
    ds = make_data(seed=4)
    full = _fit(ds, RESUME_CFG, out_dir=tmp_path / "full", dropout=0.3)
    resumed = _crash_and_resume(ds, tmp_path / "resumed")
    a = load_checkpoint(tmp_path / "full" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "resumed" / "checkpoint.pt")
    assert a["epoch"] == b["epoch"] == 3
    assert _same_state(a["model"], b["model"])                       # last epoch's weights
    assert _same_state(full.model.state_dict(), resumed.model.state_dict())  # selected weights
    for k in a["optimizers"]["main"]["state"]:
        assert _same_state(a["optimizers"]["main"]["state"][k], b["optimizers"]["main"]["state"][k])
    assert _no_time(full.history) == _no_time(resumed.history)
    assert full.best_epoch == resumed.best_epoch and full.best_valid == resumed.best_valid

    # the control: the same crash and resume without restoring the RNG (dropout draws) differs,
    # so the equality above is not vacuous
    monkeypatch.setattr(engine, "_set_rng_state", lambda state, device: None)
    broken = _crash_and_resume(ds, tmp_path / "no-rng")
    c = load_checkpoint(tmp_path / "no-rng" / "checkpoint.pt")
    assert _no_time(broken.history[:2]) == _no_time(full.history[:2])  # same until the crash
    assert not _same_state(a["model"], c["model"])
    monkeypatch.undo()

    # a finished run resumes to its result without training again
    class NoTraining(Recipe):
        def train_step(self, *args, **kwargs):
            raise AssertionError("a finished run must not train")
    again = _fit(ds, None, out_dir=tmp_path / "full", recipe=NoTraining(RESUME_CFG), dropout=0.3)
    assert _no_time(again.history) == _no_time(full.history)
    assert _same_state(again.model.state_dict(), full.model.state_dict())


def test_resume_refuses_a_checkpoint_of_another_run(tmp_path):
    ds = make_data(seed=8)
    cfg = {"epochs": 1, "batch_size": 16, "lr": 1e-2}
    _fit(ds, cfg, out_dir=tmp_path)
    before = (tmp_path / "checkpoint.pt").read_bytes()
    with pytest.raises(ValueError, match=r"checkpoint\.pt belongs to another run.*config\['lr'\]"):
        _fit(ds, {**cfg, "lr": 2e-2}, out_dir=tmp_path)
    with pytest.raises(ValueError, match=r"seed: checkpoint has 5, this run has 6"):
        _fit(ds, cfg, out_dir=tmp_path, seed=6)
    with pytest.raises(ValueError, match=r"data: "):
        _fit(make_data(n_train=40, seed=8), cfg, out_dir=tmp_path)
    assert (tmp_path / "checkpoint.pt").read_bytes() == before
    with pytest.warns(UserWarning, match="overwritten"):
        fit(None, ds, model=builder(), recipe=Recipe({**cfg, "lr": 2e-2}), seed=5,
            out_dir=tmp_path, progress=False, resume=False)
    assert load_checkpoint(tmp_path / "checkpoint.pt")["identity"]["config"]["lr"] == 2e-2


# ---------------------------------------------------------------- checkpoint files

class _Unpicklable:
    def __reduce__(self):
        raise RuntimeError("boom while pickling")


def test_save_atomic_failure_leaves_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_atomic(path, {"v": torch.arange(3)})
    with pytest.raises(RuntimeError, match="boom"):
        save_atomic(path, {"v": torch.zeros(100_000), "x": _Unpicklable()})

    def partial_save(obj, f):  # a crash after part of the bytes hit the disk
        f.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt
    monkeypatch.setattr(ckpt_mod.torch, "save", partial_save)
    with pytest.raises(KeyboardInterrupt):
        save_atomic(path, {"v": torch.ones(3)})
    monkeypatch.undo()
    assert torch.equal(torch.load(path, weights_only=True)["v"], torch.arange(3))
    assert os.listdir(tmp_path) == ["checkpoint.pt"]  # no temporary file left behind


def test_sigkill_during_saves_never_truncates(tmp_path):
    """A process saving in a loop is SIGKILLed (almost surely mid-save): the file is whole."""
    path = tmp_path / "checkpoint.pt"
    script = textwrap.dedent(f"""
        import sys, torch
        from robustmm_fast.train.checkpoint import save_atomic
        i = 0
        while True:
            save_atomic({str(path)!r}, {{"i": i, "x": torch.full((1_000_000,), float(i))}})
            print(i, flush=True)
            i += 1
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, env=env)
    try:
        for expected in (b"0", b"1", b"2"):  # three saves done: the fourth is under way
            assert proc.stdout.readline().strip() == expected
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    obj = torch.load(path, weights_only=True)
    assert obj["i"] >= 2 and torch.equal(obj["x"], torch.full((1_000_000,), float(obj["i"])))
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".tmp")] == ["checkpoint.pt"]


def test_load_checkpoint_rejects_bad_files(tmp_path):
    good = {"format": ckpt_mod.CHECKPOINT_FORMAT, "version": ckpt_mod.VERSION, "identity": {},
            "epoch": 0, "epochs": 1, "model": {"w": torch.ones(1000)}, "optimizers": {},
            "recipe": {}, "rng": [], "world_size": 1, "best": None, "history": []}
    save_atomic(tmp_path / "good.pt", good)
    assert load_checkpoint(tmp_path / "good.pt")["epochs"] == 1
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint at all")
    (tmp_path / "truncated.pt").write_bytes((tmp_path / "good.pt").read_bytes()[:2000])
    save_atomic(tmp_path / "other.pt", {"format": "something else"})
    save_atomic(tmp_path / "future.pt", {**good, "version": 99})
    save_atomic(tmp_path / "partial.pt", {k: v for k, v in good.items() if k != "history"})
    save_atomic(tmp_path / "code.pt", {"format": ckpt_mod.CHECKPOINT_FORMAT, "x": SimpleNamespace()})
    cases = {"garbage.pt": "not a readable", "truncated.pt": "not a readable",
             "other.pt": "expected a 'robustmm_fast.checkpoint'", "future.pt": "version 99",
             "partial.pt": r"missing \['history'\]", "code.pt": "not a readable",
             "absent.pt": "no such checkpoint"}
    for name, why in cases.items():
        with pytest.raises(ValueError, match=rf"{name}: .*{why}"):
            load_checkpoint(tmp_path / name)


# ---------------------------------------------------------------- non-finite loss

class _PoisonAfterFirstEpoch(Recipe):
    def on_epoch_end(self, model, epoch, stage):
        model.nan_loss = True


def test_non_finite_loss_stops_naming_the_term(tmp_path):
    ds = make_data(seed=9)
    with pytest.raises(NonFiniteLossError, match=r"epoch 1, step 0: task=nan;") as err:
        _fit(ds, None, out_dir=tmp_path,
             recipe=_PoisonAfterFirstEpoch({"epochs": 3, "batch_size": 16}))
    assert "l2" not in str(err.value)
    last = load_checkpoint(tmp_path / "checkpoint.pt")  # the last good epoch stays
    assert last["epoch"] == 0
    assert all(torch.isfinite(v).all() for v in last["model"].values())
    assert not (tmp_path / "best.pt").exists()


# ---------------------------------------------------------------- predict / evaluate

def test_predict_and_evaluate_match_a_direct_forward():
    ds = make_data(seed=10)
    torch.manual_seed(0)
    model = builder(dropout=0.5)(ds, {})
    model.train()
    idx = ds.splits["test"]
    out, labels = predict(model, ds, "test", batch_size=7)
    assert model.training  # mode restored
    assert out.shape == (idx.numel(), 3) and torch.equal(labels, ds.labels[idx])
    model.eval()
    with torch.no_grad():
        b = ds.batch(idx)
        direct = model(b.inputs, b.present, padding=b.padding).logits
    model.train()
    torch.testing.assert_close(out, direct)
    metrics = evaluate(model, ds, "test", batch_size=4)
    assert metrics["n"] == idx.numel()
    assert metrics["accuracy"] == pytest.approx(float((direct.argmax(1) == labels).float().mean()))
    # a protocol mask: modality b absent everywhere == a forward with b absent
    mask = torch.ones(idx.numel(), 2, dtype=torch.bool)
    mask[:, 1] = False
    out_a, _ = predict(model, ds, "test", present=mask)
    with torch.no_grad():
        direct_a = model.eval()(b.inputs, mask, padding=b.padding).logits
    torch.testing.assert_close(out_a, direct_a)
    assert not torch.allclose(out_a, out)
    with pytest.raises(TypeError, match="bool"):
        predict(model, ds, "test", present=mask.int())


def test_evaluate_regression_uses_regression_metrics():
    ds = make_data(seed=11)
    ds = type(ds)("tiny-reg", "regression", ds.inputs, ds.labels.float() - 1.0, ds.splits,
                  lengths=ds.lengths)
    model = TinyModel({"a": (1, 4), "b": (3, 2)}, "regression", 0)
    pred, y = predict(model, ds, "valid")
    assert pred.shape == (ds.split_size("valid"),)
    metrics = evaluate(model, ds, "valid")
    # MMSA reports MAE rounded to 4 decimals
    assert metrics["MAE"] == pytest.approx(float((pred - y).abs().mean()), abs=5e-5 + 1e-7)


# ---------------------------------------------------------------- DDP

def test_shard_arithmetic_gives_the_global_mean():
    assert distributed.shard_slices(5, 2) == [(0, 3), (3, 5)]
    assert distributed.shard_slices(1, 2) == [(0, 1), (1, 1)]
    assert distributed.shard_slices(7, 3) == [(0, 3), (3, 5), (5, 7)]
    ds = make_data(seed=12)
    batch = ds.batch(ds.splits["train"][:9])
    x = torch.randn(9, dtype=torch.float64)
    for B, W in ((9, 2), (7, 3), (1, 2), (2, 3)):
        sub = ds.batch(batch.index[:B])
        total = 0.0
        for r in range(W):
            ctx = distributed.DistContext(rank=r, world_size=W)
            local, n, factor = distributed.shard(sub, ctx)
            start, stop = distributed.shard_slices(B, W)[r]
            rows = torch.arange(start, stop) if n else torch.arange(1)
            assert n == stop - start and torch.equal(local.index, sub.index[rows])
            assert factor == W * n / B
            for m in sub.inputs:  # "b" holds NaN in its padding
                torch.testing.assert_close(local.inputs[m], sub.inputs[m][rows], rtol=0, atol=0,
                                           equal_nan=True)
            assert torch.equal(local.padding["b"], sub.padding["b"][rows])
            total += factor / W * float(x[rows].mean())  # what the weighted hook sums
        assert total == pytest.approx(float(x[:B].mean()), abs=1e-12)


def test_model_output_is_a_pytree_for_ddp():
    import torch.utils._pytree as pytree
    from robustmm_fast.models.base import ModelOutput
    distributed._register_model_output()
    distributed._register_model_output()  # idempotent
    out = ModelOutput(logits=torch.ones(2, 3), losses={"task": torch.tensor(1.0)},
                      extras={"side": torch.zeros(2)})
    leaves, spec = pytree.tree_flatten(out)
    assert sum(isinstance(v, torch.Tensor) for v in leaves) == 3
    back = pytree.tree_unflatten(leaves, spec)
    assert isinstance(back, ModelOutput) and back.losses["task"] is out.losses["task"]


def _ddp_unavailable() -> str | None:
    import torch.distributed as dist
    if not dist.is_available():
        return "this torch build has no torch.distributed"
    if not dist.is_gloo_available():
        return "this torch build has no gloo backend"
    return None


@pytest.mark.skipif(_ddp_unavailable() is not None, reason=str(_ddp_unavailable()))
def test_ddp_two_processes_match_one_process(tmp_path):
    """torchrun, 2 CPU processes (gloo), 2 epochs; the same runs in this process.

    Tolerance atol=2e-6 on weights of magnitude <= ~0.7: the two runs compute the same gradient
    of the same global batches, summed in a different order (two chunk means averaged vs one
    mean), a float32 rounding difference of ~1e-7 relative per step; AdamW's step m/sqrt(v) is
    scale-invariant, so the same relative error reaches the weights, ~1e-7 after 10 steps (6e-8
    observed). (This holds because the tiny model has no parameter with an analytically zero
    gradient -- e.g. an attention key bias -- where Adam would turn rounding noise into
    lr-sized steps.) A real error moves the weights far more: the control, DDP's plain average
    of the uneven 5 + 4 chunks of the last batch, is off by ~4e-3.
    """
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    out = tmp_path / "ddp"
    out.mkdir()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           "--standalone", str(WORKER), str(out)],
                          env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    for name, (bs, weighted) in DDP_RUNS.items():
        assert _same_state(torch.load(out / f"{name}_rank0.pt"), torch.load(out / f"{name}_rank1.pt"))
    single = {}
    for bs in (16, 10):
        _fit(make_data(), ddp_config(bs), seed=SEED, out_dir=tmp_path / f"single{bs}", side=True)
        single[bs] = load_checkpoint(tmp_path / f"single{bs}" / "checkpoint.pt")
    for name, (bs, weighted) in DDP_RUNS.items():
        ddp = load_checkpoint(out / name / "checkpoint.pt")
        assert ddp["world_size"] == 2 and len(ddp["rng"]) == 2
        assert ddp["identity"] == single[bs]["identity"]
        diff = _max_diff(ddp["model"], single[bs]["model"])
        if not weighted:
            assert diff > 1e-4, f"{name}: the control should differ, max |diff| = {diff}"
            continue
        assert diff <= 2e-6, f"{name}: max |diff| = {diff}"
        for h_ddp, h_one in zip(ddp["history"], single[bs]["history"]):
            # the weights agree to ~1e-7 relative, not bit for bit: so does the validation loss
            # (1 ulp apart with the fused AdamW); the metrics of the predictions are equal
            assert {k: v for k, v in h_ddp["valid"].items() if k != "loss"} == \
                {k: v for k, v in h_one["valid"].items() if k != "loss"}
            assert h_ddp["valid"]["loss"] == pytest.approx(h_one["valid"]["loss"], rel=1e-6)
            for k, v in h_one["train"].items():
                assert h_ddp["train"][k] == pytest.approx(v, rel=1e-5)


@pytest.mark.parametrize("mode", ["value", "norm"])
def test_grad_clip_modes(mode):
    """grad_clip_mode "value" is clip_grad_value_ (CyIN's: every entry in [-c, c]), "norm" is
    clip_grad_norm_ (the total norm <= c); the gradients left after the step show it."""
    from robustmm_fast.contract import ModelOutput
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    recipe = Recipe({"grad_clip": 0.01, "grad_clip_mode": mode, "lr": 1e-3})
    x = torch.randn(16, 8) * 100
    out = ModelOutput(losses={"task": model(x).square().mean()})
    recipe.optimize(model, out, recipe.optimizers(model), epoch=0, step=0)
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    if mode == "value":
        assert grads.abs().max() <= 0.01 + 1e-9 and (grads.abs() == 0.01).any()
    else:
        assert grads.norm() == pytest.approx(0.01, rel=1e-4)
    with pytest.raises(ValueError, match="grad_clip_mode"):
        Recipe({"grad_clip_mode": "max"})
