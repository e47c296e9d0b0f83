"""bench.seeds on a tiny config: one row per protocol with the seed spread, runs reused."""
from __future__ import annotations

import pytest
import torch
import yaml

from bench import seeds
from train.config import load_config
from train.run import METRICS, read_metrics
from train.stage1 import run_stage1
from train.synthetic import generate


def _tiny_config(tmp_path, epochs: int, eval_cfg: dict):
    """A BPR config on a 40 x 30 synthetic catalogue, at tmp_path/cfg/tiny.yaml (name cfg/tiny)."""
    data = generate(tmp_path / "data", n_users=40, n_items=30, seed=0)
    config = tmp_path / "cfg" / "tiny.yaml"
    config.parent.mkdir()
    config.write_text(yaml.safe_dump({
        "data": {"path": str(data)}, "backbone": {"name": "bpr", "embedding_size": 8},
        "optim": {"batch_size": 64, "epochs": epochs}, "eval": {"ks": [20], **eval_cfg}}))
    return config


def test_table_rows_and_reuse(tmp_path, capsys):
    config = _tiny_config(tmp_path, 3, {"min_epochs": 3})
    argv = ["--config", str(config), "--seeds", "0", "1", "--out", str(tmp_path / "out")]
    assert seeds.main(argv) == 0
    first = capsys.readouterr().out
    assert first.count("training cfg/tiny") == 4
    assert "| cfg/tiny | mmrec | 2 | " in first and "| cfg/tiny | patient | 2 | " in first
    assert seeds.main(argv) == 0
    second = capsys.readouterr().out
    assert "training" not in second and second.split("| config")[1] == first.split("| config")[1]


def test_derived_protocol_is_replayed_not_trained(tmp_path, capsys):
    config = _tiny_config(tmp_path, 12, {"patience": 0, "patient_patience": 0, "min_epochs": 8})
    out = tmp_path / "out"
    base = ["--config", str(config), "--seeds", "0", "1", "--out", str(out)]
    assert seeds.main([*base, "--derive", "mmrec"]) == 0
    derived = capsys.readouterr().out
    assert derived.count("training cfg/tiny patient") == 2
    assert "training cfg/tiny mmrec" not in derived
    assert "| cfg/tiny | mmrec (derived) | 2 | " in derived
    assert seeds.main(base) == 0                       # now train mmrec for real
    real = capsys.readouterr().out
    assert real.count("training cfg/tiny mmrec") == 2 and "training cfg/tiny patient" not in real
    row = lambda text, name: next(line for line in text.splitlines()
                                  if line.startswith(f"| cfg/tiny | {name}"))
    assert row(derived, "mmrec (derived)").split("|")[3:] == row(real, "mmrec |").split("|")[3:]


def test_unfinished_run_resumes_to_the_uninterrupted_figures(tmp_path, capsys):
    config = _tiny_config(tmp_path, 6, {"patience": 20})
    cfg = load_config(config, ["seed=0", "eval.protocol=mmrec"])
    cut = tmp_path / "cut" / "cfg" / "tiny" / "mmrec" / "0"
    run_stage1(cfg, cut, torch.device("cpu"), max_epochs_this_call=2)
    (cut / METRICS).unlink()                           # as if killed after two epochs
    argv = ["--config", str(config), "--seeds", "0", "--protocols", "mmrec"]
    assert seeds.main([*argv, "--out", str(tmp_path / "cut")]) == 0
    resumed = capsys.readouterr().out
    assert "(resuming)" in resumed
    assert seeds.main([*argv, "--out", str(tmp_path / "full")]) == 0
    full = capsys.readouterr().out
    assert "(resuming)" not in full
    assert resumed.split("| config")[1] == full.split("| config")[1]
    assert read_metrics(cut).epochs_run == 6


def test_variant_rules_are_replayed_from_the_same_runs(tmp_path, capsys):
    config = _tiny_config(tmp_path, 12, {"patience": 0, "patient_patience": 0, "min_epochs": 8})
    base = ["--config", str(config), "--seeds", "0", "--out", str(tmp_path / "out"),
            "--protocols", "patient"]
    assert seeds.main([*base, "--variant", "same:eval.protocol=patient",
                       "--variant", "short:eval.protocol=patient,eval.min_epochs=2"]) == 0
    out = capsys.readouterr().out
    assert out.count("training cfg/tiny") == 1
    row = lambda name: next(line for line in out.splitlines()
                            if line.startswith(f"| cfg/tiny | {name}")).split("|")[3:]
    assert row("same (derived)") == row("patient |")
    assert int(row("short (derived)")[-2]) <= 3       # epochs run under min_epochs 2
    with pytest.raises(SystemExit, match="trains past"):   # a rule longer than the runs
        seeds.main([*base, "--variant", "long:eval.protocol=patient,eval.min_epochs=20"])
    with pytest.raises(SystemExit):
        seeds.main([*base, "--variant", "no-overrides"])
