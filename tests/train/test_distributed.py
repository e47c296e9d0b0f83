"""Training and evaluation under torchrun with 2 CPU processes (gloo), as a user launches them."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from train import distributed
from train.synthetic import generate

from tests.train.torchrun import ROOT, TORCHRUN, kill_one_rank


def _config(tmp_path: Path, data: Path, **changes) -> Path:
    """A small lightgcn_mm config (tiny image tower, content heads, 10% cold items)."""
    cfg = {"seed": 0, "data": {"path": str(data)}, "threads": 1,
           "encoders": {"image": {"name": "openclip_image", "model": "ptmrec-tiny",
                                  "init_seed": 0},
                        "cache_dir": str(tmp_path / "cache"), "batch_size": 16},
           "backbone": {"name": "lightgcn_mm", "embedding_size": 16, "modalities": ["image"]},
           "heads": {"modalities": ["image"], "rank_weight": 1.0},
           "cold_start": {"holdout_fraction": 0.1, "ks": [10, 20]},
           "optim": {"batch_size": 500, "epochs": 5},
           "eval": {"ks": [10, 20], "patience": 50, "batch_size": 32}} | changes
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _run(cmd: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    """Run a command from the repository root; fail the test with its output if it fails."""
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """A 300-user x 150-item synthetic catalogue with images and texts."""
    return generate(tmp_path_factory.mktemp("ddp") / "data", n_users=300, n_items=150, seed=0,
                    image_size=32)


def test_two_ranks_write_one_run_and_evaluate_exactly(tmp_path, data):
    config = _config(tmp_path, data)
    _run([*TORCHRUN, "-m", "train", "--config", str(config), "--out", str(tmp_path / "run")])
    run = tmp_path / "run"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["epochs_run"] == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "config.yaml", "run"]
    # the sharded feature cache holds every item, as one process encodes them
    cached = [np.load(p) for p in (tmp_path / "cache").glob("image-*.npy")]
    assert len(cached) == 1 and cached[0].shape[0] == 150
    single = tmp_path / "single"
    single.mkdir()
    _run([sys.executable, "-m", "train", "--config", str(config), "--out", str(single / "run"),
          "--set", f"encoders.cache_dir={single / 'cache'}", "--set", "optim.epochs=1"])
    np.testing.assert_allclose(np.load(next((single / "cache").glob("image-*.npy"))), cached[0],
                               atol=1e-5)
    # the same weights give the same figures with 1 and 2 ranks, and the ones training reported
    eval_cmd = ["-m", "train.eval", str(run), "--ks", "10", "20", "--batch-size", "32"]
    _run([sys.executable, *eval_cmd, "--json", str(tmp_path / "one.json")])
    _run([*TORCHRUN, *eval_cmd, "--json", str(tmp_path / "two.json")])
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert one == two == metrics["test"]


def test_killed_rank_resumes_from_the_checkpoint(tmp_path, data):
    config = _config(tmp_path, data, optim={"batch_size": 200, "epochs": 40})
    out = tmp_path / "run"
    text = kill_one_rank(["train", "--config", str(config), "--out", str(out), "--resume"], out,
                         tmp_path / "log.txt", os.environ | {"OMP_NUM_THREADS": "1"}, 180, 240)
    assert "resumed from" in text, text[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epochs_run"] == 40 and metrics["world_size"] == 2


def test_single_process_is_not_distributed():
    assert not distributed.active() and distributed.world_size() == 1 and distributed.is_main()
    assert distributed.part(10) == slice(0, 10) and distributed.gather(3) == [3]
