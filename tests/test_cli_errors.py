"""Every user error of the `robustmm` command is one line on stderr, `robustmm <command>: error:
...` naming the flag, key or file, exit status 2, found before any training (fit is replaced by
a function that fails the test if it is called)."""
import pytest
import torch

from robustmm_fast import cli


@pytest.fixture()
def files(tmp_path):
    (tmp_path / "bad.toml").write_text("lr = = 3\n")
    (tmp_path / "conf.yaml").write_text("lr: 3\n")
    (tmp_path / "a_file").write_text("x")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    (tmp_path / "garbage.pt").write_bytes(b"\x00\x01not a checkpoint" * 10)
    return tmp_path


# (argv, a part of the message naming the bad part); {d} is a temporary directory
BAD = [
    ("run --seeds abc", "--seeds"),
    ("run --seeds 5-1", "--seeds"),
    ("run --protocol eta:2", "--protocol"),
    ("run --protocol instance:-1", "--protocol"),
    ("run --protocol eta:abc", "--protocol"),
    ("run --protocol everything", "--protocol"),
    ("run --methods foo", "'foo'"),
    ("train --method nope", "--method"),
    ("train", "--method"),
    ("run --set lr=abc --methods late_fusion", "'lr'"),
    ("run --set lr=abc", "'lr'"),
    ("run --set nope=1 --methods cyin", "nope"),
    ("run --set nope=1", "nope"),
    ("run --set =3", "--set"),
    ("run --set epochs=0 --methods late_fusion", "epochs"),
    ("run --set modality_dropout=2 --methods late_fusion", "modality_dropout"),
    ("train --method dmrnet --set hard_k=1.5", "hard_k"),
    ("run --config {d}/missing.toml", "missing.toml"),
    ("run --config {d}/bad.toml", "bad.toml"),
    ("run --config {d}/conf.yaml", "conf.yaml"),
    ("run --data bogus", "--data"),
    ("run --data mmsa:", "--data"),
    ("run --data mmsa:{d}/missing.pkl", "missing.pkl"),
    ("run --data avmnist:{d}/nodir", "nodir"),
    ("run --data synthetic:nope", "--data"),
    ("run --device tpu", "--device"),
    ("run --device cuda:x", "--device"),
    ("run --out {d}/a_file", "--out"),
    ("run --out /proc/robustmm-x", "--out"),
    ("eval {d}/missing.pt", "missing.pt"),
    ("eval {d}/foreign.pt", "foreign.pt"),
    ("eval {d}/garbage.pt", "garbage.pt"),
    ("eval {d}/foreign.pt --protocol eta:7", "--protocol"),
    ("bench reparam_kl --repeat 0", "--repeat"),
    ("bench masked_attention --shape 2x3", "--shape"),
    ("bench reparam_kl --shape 2xq", "--shape"),
    ("bench reparam_kl --output {d}", "--output"),
    ("bench nope", "nope"),
    ("bench harness --data mosi:x --baseline none", "--data"),
    ("bench harness --data imagenet --baseline none", "--data"),
    ("bench harness --method nope --baseline none", "--method"),
    ("bench harness --shape 2x3", "--shape"),
    ("bench harness --baseline no-such-revision-xyz --no-main-job", "--baseline"),
    ("bench models --method early_fusion", "--method"),
    ("bench reparam_kl --baseline HEAD", "--baseline"),
    ("bench harness --output {d}", "--output"),
    ("bench harness --device cuda", "--device"),
    ("bench harness --max-seconds 0", "--max-seconds"),
    ("run --seeds 99999999999", "--seeds"),
    ("run --seeds 1111,1111", "--seeds"),
    ("run --methods cyin cyin", "--methods"),
    ("run --set lr=-1 --methods late_fusion", "lr"),
    ("run --set lr=NaN --methods late_fusion", "lr"),
    ("run --set weight_decay=-1 --methods mim", "weight_decay"),
    ("run --protocol complete+", "--protocol"),
    ("run --config {d}", "config file"),
    ("run --data avmnist:{d}/a_file", "a_file"),
    ("train --method cyin --quick", "robustmm train: error: unrecognized arguments: --quick"),
    ("eval {d}", "checkpoint"),
]
if not torch.cuda.is_available():
    BAD += [("run --device cuda", "--device"), ("eval {d}/foreign.pt --device cuda", "--device"),
            ("bench reparam_kl --device cuda", "--device")]


@pytest.mark.parametrize("argv,names", BAD, ids=[a for a, _ in BAD])
def test_bad_invocation_is_one_line_exit_2_before_training(argv, names, files, capsys,
                                                           monkeypatch):
    import robustmm_fast.train as train

    def no_training(*args, **kwargs):
        raise AssertionError("training started before the arguments were checked")

    monkeypatch.setattr(train, "fit", no_training)
    monkeypatch.chdir(files)
    args = argv.format(d=files).split() + (["--no-progress"] if argv.startswith(("run", "train"))
                                           else [])
    try:
        code = cli.main(args)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith("robustmm") and ": error: " in lines[0], err
    assert names in lines[0], err
    assert "Traceback" not in err
    assert not (files / "robustmm-results").exists() or not any(
        p.is_dir() and p.name != "masks" for p in (files / "robustmm-results").iterdir())


def test_debug_shows_the_traceback(files, monkeypatch):
    monkeypatch.chdir(files)
    from robustmm_fast.usage import UsageError
    with pytest.raises(UsageError, match="--protocol"):
        cli.main(["--debug", "run", "--protocol", "eta:2"])
    with pytest.raises(UsageError, match="--protocol"):
        cli.main(["run", "--protocol", "eta:2", "--debug"])


def test_typed_config_values_are_checked_with_their_key():
    from robustmm_fast.models.registry import get_method
    with pytest.raises(ValueError, match="'lr' must be a number, got 'abc'"):
        get_method("cyin").config(None, {"lr": "abc"})
    with pytest.raises(ValueError, match="'epochs' must be an integer, got 2.5"):
        get_method("mim").config(None, {"epochs": 2.5})
    with pytest.raises(ValueError, match="'epochs' must be an integer, got True"):
        get_method("late_fusion").config(None, {"epochs": True})
    assert get_method("cyin").config(None, {"lr": 1})["lr"] == 1  # an int is a number
