"""Stage 2 on a tiny synthetic run: prompts/LoRA/IA3 train on the KT loss, metrics are written."""
from __future__ import annotations

import pytest
import torch

from train import checkpoint
from train.config import TrainConfig
from train.stage1 import run_stage1
from train.stage2 import Stage2Config, main, run_stage2
from train.synthetic import generate


@pytest.fixture(scope="module")
def stage1_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("s2")
    data = generate(root / "data", n_users=60, n_items=50, seed=0)
    cfg = TrainConfig.model_validate({
        "seed": 0, "data": {"path": str(data)},
        "encoders": {"image": {"name": "openclip_image", "model": "ptmrec-tiny", "init_seed": 0},
                     "text": {"name": "openclip_text", "model": "ptmrec-tiny", "init_seed": 0},
                     "cache_dir": str(root / "cache")},
        "backbone": {"name": "lightgcn_mm"}, "heads": {}, "cold_start": {"holdout_fraction": 0.2},
        "optim": {"batch_size": 256, "epochs": 2}, "eval": {"ks": [10, 20]}})
    run_stage1(cfg, root / "run", torch.device("cpu"))
    return root / "run"


@pytest.mark.parametrize("method", [{"name": "prompt", "n_ctx": 2, "depth": 2}, {"name": "lora"},
                                    {"name": "ia3"}])
def test_stage2_methods(stage1_run, tmp_path, method):
    s2 = Stage2Config.model_validate({"method": method, "kt_batch_size": 16,
                                      "kt_steps_per_epoch": 2, "epochs": 2, "patience": 5})
    metrics = run_stage2(stage1_run, s2, tmp_path, torch.device("cpu"))
    assert {"valid", "test", "cold_start", "best_epoch", "trainable_share"} <= set(metrics)
    assert 0 < metrics["trainable_encoder_params"] < metrics["encoder_params"]
    state = checkpoint.load(tmp_path / "best.pt")
    tuned = [k for k in state if k.startswith("towers.") and
             any(s in k for s in ("prompts", "lora_", "ia3_"))]
    assert tuned, "the method's parameters are saved with the best weights"


def test_prompts_move_under_kt(stage1_run, tmp_path):
    s2 = Stage2Config.model_validate({"method": {"name": "prompt", "n_ctx": 2, "depth": 2},
                                      "kt_batch_size": 16, "kt_steps_per_epoch": 3, "epochs": 1})
    run_stage2(stage1_run, s2, tmp_path / "a", torch.device("cpu"))
    torch.manual_seed(0)
    state = checkpoint.load(tmp_path / "a" / "best.pt")
    prompts = [v for k, v in state.items() if k.endswith("prompts")]
    assert prompts and all(p.std() > 0 for p in prompts)


def test_cli_and_missing_encoders(stage1_run, tmp_path, capsys):
    assert main(["--run", str(stage1_run), "--out", str(tmp_path / "o"),
                 "--set", "epochs=1", "--set", "kt_steps_per_epoch=1", "--set", "kt_batch_size=8",
                 "--set", "modalities=[text]"]) == 0
    assert "stage 2 (prompt" in capsys.readouterr().out
