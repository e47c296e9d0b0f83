"""Stage 2 under torchrun with 2 CPU processes (gloo): one run directory, the single-process
figures, and a killed rank resumed from the last epoch's checkpoint; --resume of one process."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from train import checkpoint
from train.config import TrainConfig
from train.run import BEST
from train.stage1 import run_stage1
from train.stage2 import main
from train.synthetic import generate

from tests.train.torchrun import ROOT, TORCHRUN, kill_one_rank

ENV = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def stage1_run(tmp_path_factory) -> Path:
    """A 2-epoch stage-1 run of the tiny image and text towers with content heads."""
    root = tmp_path_factory.mktemp("s2ddp")
    data = generate(root / "data", n_users=60, n_items=50, seed=0)
    cfg = TrainConfig.model_validate({
        "seed": 0, "data": {"path": str(data)}, "threads": 1,
        "encoders": {"image": {"name": "openclip_image", "model": "ptmrec-tiny", "init_seed": 0},
                     "text": {"name": "openclip_text", "model": "ptmrec-tiny", "init_seed": 0},
                     "cache_dir": str(root / "cache")},
        "backbone": {"name": "lightgcn_mm"}, "heads": {},
        "cold_start": {"holdout_fraction": 0.2},
        "optim": {"batch_size": 256, "epochs": 2}, "eval": {"ks": [10, 20], "batch_size": 16}})
    run_stage1(cfg, root / "run", torch.device("cpu"))
    return root / "run"


def _stage2_yaml(tmp_path: Path, **changes) -> Path:
    """Deep prompts in both towers, KT on 3 steps of 16 pairs, items re-encoded every epoch."""
    s2 = {"method": {"name": "prompt", "n_ctx": 2, "depth": 2},
          "kt": {"batch_size": 16, "steps_per_epoch": 3},
          "encode": {"batch_size": 8},
          "optim": {"epochs": 3, "patience": 5, "learning_rate": 1e-3,
                    "tuning_learning_rate": 1e-2}} | changes
    path = tmp_path / "stage2.yaml"
    path.write_text(yaml.safe_dump(s2))
    return path


def _run(cmd: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    """Run a command from the repository root; fail the test with its output if it fails."""
    done = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.mark.parametrize("groups", [1, 2])
def test_two_ranks_tune_as_one_process(stage1_run, tmp_path, groups):
    """The same steps with 1 and 2 ranks: equal figures and weights up to float summation order
    (each rank sums its part of the backbone's loss, and the gradients are added across ranks)."""
    config = _stage2_yaml(tmp_path, perpeft={"groups": groups})
    args = ["-m", "train.stage2", "--stage1", str(stage1_run), "--config", str(config)]
    _run([sys.executable, *args, "--out", str(tmp_path / "one")])
    _run([*TORCHRUN, *args, "--out", str(tmp_path / "two")])
    one, two = (json.loads((tmp_path / n / "metrics.json").read_text()) for n in ("one", "two"))
    assert one["world_size"] == 1 and two["world_size"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "stage2.yaml", "two"]
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == \
        sorted(p.name for p in (tmp_path / "two").iterdir())
    assert two["epochs_run"] == one["epochs_run"] == 3
    assert two["valid_curve"] == pytest.approx(one["valid_curve"], abs=1e-6)
    for key in ("valid", "test", "start_valid"):
        assert two[key] == pytest.approx(one[key], abs=1e-6), key
    a, b = checkpoint.load(tmp_path / "one" / BEST), checkpoint.load(tmp_path / "two" / BEST)
    assert a.keys() == b.keys()
    assert [k for k in a if "prompts" in k]
    # the heads' biases are left out: KT's in-batch softmax is invariant to them (u . b is the
    # same for every item of a row), so their gradient is float noise that Adam scales to steps
    # of the learning rate, which differ with the order of additions
    for k in a:
        if not (k.startswith("heads.") and k.endswith("bias")):
            torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-4, msg=k)


def test_killed_rank_resumes_stage2(stage1_run, tmp_path):
    config = _stage2_yaml(tmp_path, optim={"epochs": 12, "patience": 20})
    out = tmp_path / "run"
    text = kill_one_rank(["train.stage2", "--stage1", str(stage1_run), "--config", str(config),
                          "--out", str(out), "--resume"], out, tmp_path / "log.txt", ENV, 240, 300)
    assert "resumed from" in text, text[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epochs_run"] == 12 and metrics["world_size"] == 2


def test_resume_continues_as_an_uninterrupted_run(stage1_run, tmp_path):
    """Two epochs, then --resume to three: the figures and weights of three epochs in one go."""
    args = ["--stage1", str(stage1_run), "--config", str(_stage2_yaml(tmp_path))]
    assert main([*args, "--out", str(tmp_path / "whole")]) == 0
    assert main([*args, "--out", str(tmp_path / "parts"), "--set", "optim.epochs=2"]) == 0
    assert main([*args, "--out", str(tmp_path / "parts"), "--resume"]) == 0
    whole, parts = (json.loads((tmp_path / n / "metrics.json").read_text())
                    for n in ("whole", "parts"))
    assert parts["epochs_run"] == whole["epochs_run"] == 3
    for key in ("valid_curve", "valid", "test", "start_valid", "cold_start"):
        assert parts[key] == whole[key], key
    a, b = checkpoint.load(tmp_path / "whole" / BEST), checkpoint.load(tmp_path / "parts" / BEST)
    for k in a:
        assert torch.equal(a[k], b[k]), k
