"""The main job and the CLI (`robustmm run | train | eval`): protocol parsing, configs, the files
a run writes, the saved masks every method is scored on, and train -> eval round trips on the
embedded Handwritten data and on a small MMSA pickle in its real format."""
from __future__ import annotations

import csv
import json

import pytest
import torch

from robustmm_fast import cli
from robustmm_fast.config import load_config, parse_overrides, select
from robustmm_fast.missing import fixed_subsets, load_masks
from robustmm_fast.run import load_data, parse_protocol, protocol_masks

from test_data import mmsa_dict, write_pkl


pytestmark = pytest.mark.usefixtures("one_thread")


def test_parse_protocol():
    assert parse_protocol("complete") == [("complete", None)]
    assert parse_protocol("subsets+eta:0.1,0.3") == [("subsets", None), ("eta", 0.1), ("eta", 0.3)]
    assert parse_protocol("eta") == [("eta", v) for v in (0.1, 0.2, 0.3, 0.4, 0.5)]
    assert parse_protocol("instance:0.25") == [("instance", 0.25)]
    assert parse_protocol("eta:0.7,1") == [("eta", 0.7), ("eta", 1.0)]   # above (M-1)/M: accepted
    assert parse_protocol("instance:0.1,1.0") == [("instance", 0.1), ("instance", 1.0)]
    for bad, match in (("sometimes", "protocol must be"), ("instance", "needs a probability"),
                       ("eta:x", "must be numbers"), ("complete:1", "takes no value"),
                       ("eta:1.5", r"in \[0, 1\]"), ("instance:-0.1", r"in \[0, 1\]"),
                       ("instance:nan", r"in \[0, 1\]")):
        with pytest.raises(ValueError, match=match):
            parse_protocol(bad)


class _Split:
    """The three things protocol_masks reads from a dataset."""
    modalities = ["text", "audio", "vision"]
    num_modalities = 3

    def split_size(self, split):
        return 30000


def test_protocol_masks_follow_cyin():
    masks = protocol_masks(_Split(), parse_protocol("subsets+eta:0.3,0.7+instance:0.7"), seed=1111)
    assert [k for k in masks if k.startswith("subset:")] == [
        "subset:text", "subset:audio", "subset:text+audio", "subset:vision", "subset:text+vision",
        "subset:audio+vision", "subset:text+audio+vision"]
    assert all((m == m[0]).all() for k, m in masks.items() if k.startswith("subset:"))
    assert abs((~masks["eta:0.3"]).double().mean().item() - 0.3) <= 0.005
    assert (masks["eta:0.7"].sum(dim=1) == 1).all()     # 0.7 > 2/3: one modality per sample
    inst = masks["instance:0.7"]
    frac = (~inst.all(dim=1)).double().mean().item()  # CyIN: 70% incomplete, not 97%
    assert abs(frac - 0.7) <= 4 * (0.7 * 0.3 / 30000) ** 0.5 and inst.any(dim=1).all()


def test_protocol_masks_are_the_protocols():
    from robustmm_fast.data import load_handwritten
    ds = load_handwritten(seed=1111)
    masks = protocol_masks(ds, parse_protocol("complete+subsets+eta:0.5"), seed=1111)
    assert len([k for k in masks if k.startswith("subset:")]) == 63
    assert masks["complete"].all() and masks["complete"].shape == (400, 6)
    assert torch.equal(masks["subset:fac+pix"][0], torch.tensor([1, 0, 0, 0, 1, 0], dtype=torch.bool))
    eta = masks["eta:0.5"]
    assert abs((~eta).float().mean().item() - 0.5) <= 0.005 and eta.any(1).all()
    again = protocol_masks(ds, parse_protocol("eta:0.5"), seed=1111)["eta:0.5"]
    assert torch.equal(eta, again)  # same seed, same masks


def test_config_file_and_overrides(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('lr = 0.01\n[ume_mma]\nunimodal_epochs = 2\n[late_fusion]\nhidden = 16\n')
    cfg = load_config(str(path))
    assert select(cfg, "ume_mma", ["ume_mma", "late_fusion"]) == {"lr": 0.01, "unimodal_epochs": 2}
    assert select(cfg, "late_fusion", ["ume_mma", "late_fusion"]) == {"lr": 0.01, "hidden": 16}
    assert parse_overrides(["lr=1e-3", "widths=[64, 32]", "name=abc", "flag=true"]) == \
        {"lr": 1e-3, "widths": [64, 32], "name": "abc", "flag": True}
    with pytest.raises(ValueError, match="key=value"):
        parse_overrides(["lr"])
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        load_config(str(bad))
    with pytest.raises(ValueError, match="cannot read"):
        load_config(str(tmp_path / "absent.toml"))


def test_run_writes_results_masks_and_plot(tmp_path, capsys):
    out = tmp_path / "run"
    rc = cli.main(["run", "--methods", "late_fusion", "ume_mma", "--seeds", "1111", "--out", str(out),
                   "--no-progress", "--protocol", "complete+subsets+eta:0.2,0.5",
                   "--set", "epochs=2", "--set", "unimodal_epochs=1", "--set", "finetune_epochs=1"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| late_fusion |" in printed and "| ume_mma |" in printed
    result = json.loads((out / "results.json").read_text())
    assert result["metric"] == "accuracy" and result["etas"] == [0.2, 0.5]
    for method in ("late_fusion", "ume_mma"):
        points = result["per_seed"][method]["1111"]
        assert len([p for p in points if p.startswith("subset:")]) == 63
        assert {"complete", "eta:0.2", "eta:0.5"} <= set(points)
        summary = result["summary"][method]
        subset_accs = [points[p]["accuracy"] for p in points if p.startswith("subset:")]
        assert summary["subset_mean"]["mean"] == pytest.approx(sum(subset_accs) / 63)
        assert summary["complete"]["mean"] == points["complete"]["accuracy"]
        assert (out / method / "seed-1111" / "best.pt").exists()
    # effective robustness is measured against late fusion: 0 for late fusion itself
    assert result["summary"]["late_fusion"]["effective_robustness"]["mean"] == pytest.approx(0.0)
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert {r["method"] for r in rows} == {"late_fusion", "ume_mma"}
    assert (out / "robustness.png").stat().st_size > 1000
    masks, meta = load_masks(out / "masks" / "seed-1111.npz")
    assert meta["modalities"] == ["fac", "fou", "kar", "mor", "pix", "zer"]
    assert torch.equal(masks["subset:fac+fou+kar+mor+pix+zer"], masks["complete"])
    assert len(fixed_subsets(6)) == 63


def test_train_then_eval_round_trip(tmp_path, capsys):
    out = tmp_path / "train"
    assert cli.main(["train", "--method", "early_fusion", "--seeds", "1111", "--out", str(out),
                     "--no-progress", "--set", "epochs=2"]) == 0
    capsys.readouterr()
    trained = json.loads((out / "results.json").read_text())
    acc = trained["per_seed"]["early_fusion"]["1111"]["complete"]["accuracy"]
    assert cli.main(["eval", str(out / "early_fusion" / "seed-1111" / "best.pt"),
                     "--protocol", "complete"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("seed 1111 complete")
    assert json.loads(line.split(" ", 3)[3])["accuracy"] == round(acc, 4)


def test_train_unknown_key_is_a_clear_error(tmp_path, capsys):
    """One line naming the key, exit status 2 (tests/test_cli_errors.py has the full table)."""
    assert cli.main(["train", "--method", "late_fusion", "--seeds", "1111", "--out",
                     str(tmp_path), "--no-progress", "--set", "no_such_key=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("robustmm train: error: ") and "no_such_key" in err


def test_train_on_mmsa_format(tmp_path):
    """A small pickle in MMSA's real layout (unaligned, padded sequences): the transformer
    encoders, L1 regression and MMSA's metrics, end to end."""
    path = write_pkl(tmp_path / "unaligned_50.pkl", mmsa_dict(aligned=False))
    out = tmp_path / "mmsa"
    assert cli.main(["train", "--method", "late_fusion", "--data", f"mmsa:{path}", "--seeds", "1111",
                     "--out", str(out), "--no-progress", "--protocol", "complete+subsets",
                     "--set", "epochs=2", "--set", "hidden=8", "--set", "batch_size=2"]) == 0
    result = json.loads((out / "results.json").read_text())
    assert result["metric"] == "MAE" and not result["higher_is_better"]
    points = result["per_seed"]["late_fusion"]["1111"]
    assert len(points) == 1 + 7  # complete + the 7 subsets of 3 modalities
    for metrics in points.values():
        assert {"Has0_acc_2", "Non0_F1_score", "Mult_acc_7", "MAE", "Corr"} <= set(metrics)
        assert metrics["MAE"] == metrics["MAE"]  # finite, not NaN


def test_bad_data_spec(capsys):
    assert cli.main(["train", "--method", "late_fusion", "--data", "imagenet",
                     "--no-progress"]) == 2
    assert "--data must be" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--data must be"):  # the library API raises
        load_data("imagenet", 1111)


def test_the_picture_comes_with_a_plain_install():
    """matplotlib is a dependency, not an extra: the README's first command (pip install -e .
    then robustmm run) writes robustness.png."""
    from pathlib import Path

    from robustmm_fast.config import tomllib  # tomli on Python 3.10
    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    assert any(d.replace(" ", "").startswith("matplotlib>=") for d in project["dependencies"])
