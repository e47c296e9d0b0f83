"""Stage-1 trainer: run directory contents, early stopping, resume equals an uninterrupted run."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from train.__main__ import main
from train.run import BEST, CHECKPOINT, CONFIG, CURVES, METRICS, PLOTS, run_device
from train.config import TrainConfig
from train.stage1 import run_stage1

ROOT = Path(__file__).resolve().parents[2]


def _cfg(data: Path, name: str = "lightgcn", epochs: int = 6, patience: int = 20) -> TrainConfig:
    return TrainConfig.model_validate({
        "seed": 3, "data": {"path": str(data)}, "backbone": {"name": name},
        "optim": {"batch_size": 128, "epochs": epochs, "learning_rate": 0.01},
        "eval": {"ks": [10, 20], "protocol": "mmrec", "patience": patience}})


def test_run_dir_contents(tiny_dataset_dir, tmp_path):
    metrics = run_stage1(_cfg(tiny_dataset_dir), tmp_path, torch.device("cpu"))
    for name in (CONFIG, METRICS, CHECKPOINT, BEST, f"{PLOTS}/{CURVES}"):
        assert (tmp_path / name).is_file(), name
    saved = json.loads((tmp_path / METRICS).read_text())
    assert saved == json.loads(json.dumps(metrics))
    assert set(saved["test"]) >= {"recall@10", "recall@20", "ndcg@10", "ndcg@20"}
    assert isinstance(saved["best_epoch"], int) and len(saved["epoch_seconds"]) == 6
    assert yaml.safe_load((tmp_path / CONFIG).read_text())["backbone"]["name"] == "lightgcn"


def test_early_stopping_patience(tiny_dataset_dir, tmp_path):
    metrics = run_stage1(_cfg(tiny_dataset_dir, "bpr", epochs=200, patience=2), tmp_path,
                         torch.device("cpu"))
    # MMRec stops once more than `patience` evaluations in a row fail to improve strictly.
    assert metrics["epochs_run"] == metrics["best_epoch"] + 1 + 3
    assert metrics["epochs_run"] < 200


@pytest.mark.parametrize("name", ["bpr", "lightgcn"])
def test_resume_matches_uninterrupted(tiny_dataset_dir, tmp_path, name):
    full = run_stage1(_cfg(tiny_dataset_dir, name), tmp_path / "full", torch.device("cpu"))
    run_stage1(_cfg(tiny_dataset_dir, name), tmp_path / "cut", torch.device("cpu"),
               max_epochs_this_call=2)
    resumed = run_stage1(_cfg(tiny_dataset_dir, name), tmp_path / "cut", torch.device("cpu"),
                         resume=True)
    for key in ("valid", "test", "best_epoch", "epochs_run"):
        assert resumed[key] == full[key], key


def test_cli_kill_and_resume(tiny_dataset_dir, tmp_path):
    """SIGKILL the trainer mid-run; `--resume` finishes with the uninterrupted result."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(_cfg(tiny_dataset_dir, "bpr", epochs=40).model_dump(mode="json")))
    assert main(["--config", str(cfg), "--out", str(tmp_path / "ref")]) == 0
    cmd = [sys.executable, "-m", "train", "--config", str(cfg), "--out", str(tmp_path / "run")]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (tmp_path / "run" / CHECKPOINT).exists() and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert subprocess.run(cmd + ["--resume"], cwd=ROOT, capture_output=True).returncode == 0
    ref = json.loads((tmp_path / "ref" / METRICS).read_text())
    got = json.loads((tmp_path / "run" / METRICS).read_text())
    assert (got["test"], got["best_epoch"]) == (ref["test"], ref["best_epoch"])


def test_cli_errors(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: {path: x}\nbackbone: {name: nope}\n")
    assert main(["--config", str(bad)]) == 2
    assert "invalid config" in capsys.readouterr().err
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "d.inter").write_text("userID\titemID\tx_label\n0\tq\t0\n")
    ok = tmp_path / "ok.yaml"
    ok.write_text(f"data: {{path: {tmp_path / 'd'}}}\nbackbone: {{name: bpr}}\n")
    assert main(["--config", str(ok), "--out", str(tmp_path / "r")]) == 2
    assert "d.inter:2: itemID is not an integer" in capsys.readouterr().err


def test_follow_up_clis_use_the_runs_device(tmp_path):
    """stage 2 and distillation run on the device their run's config names (auto without one)."""
    (tmp_path / "config.yaml").write_text("data: {path: x}\nbackbone: {name: bpr}\ndevice: cpu\n")
    assert run_device(tmp_path) == torch.device("cpu")
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    assert run_device(tmp_path / "no_such_run").type == auto
    if not torch.cuda.is_available():
        (tmp_path / "config.yaml").write_text("data: {path: x}\nbackbone: {name: bpr}\n"
                                              "device: cuda\n")
        with pytest.raises(SystemExit, match="no CUDA device"):
            run_device(tmp_path)


def test_valid_metric_must_be_evaluated():
    """Early stopping on recall@20 with ks [10] is a config error, not a KeyError mid-training."""
    from train.config import EvalConfig

    with pytest.raises(ValueError, match="needs 20 in ks"):
        EvalConfig(ks=[10], valid_metric="recall@20")
    with pytest.raises(ValueError):
        EvalConfig(valid_metric="hits@20")
    assert EvalConfig(ks=[5, 10], valid_metric="ndcg@5").valid_metric == "ndcg@5"
