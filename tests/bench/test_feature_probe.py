"""bench.feature_probe on a tiny synthetic stage-1 run: every variant substitutes text features
of the right shape and retrains; the control is the stage-1 run itself."""
from __future__ import annotations

import json

import numpy as np
import torch

from train.config import TrainConfig
from train.stage1 import run_stage1
from train.synthetic import generate

from bench import feature_probe as bench


def test_probe_variants(tmp_path, capsys):
    data = generate(tmp_path / "data", n_users=60, n_items=50, seed=0)
    cfg = TrainConfig.model_validate({
        "seed": 0, "data": {"path": str(data)},
        "encoders": {"text": {"name": "openclip_text", "model": "ptmrec-tiny", "init_seed": 0},
                     "cache_dir": str(tmp_path / "cache")},
        "backbone": {"name": "lightgcn_mm", "modalities": ["text"]},
        "optim": {"batch_size": 256, "epochs": 2}, "eval": {"ks": [10, 20]}})
    stage1 = run_stage1(cfg, tmp_path / "stage1" / "lightgcn_mm" / "0", torch.device("cpu"))
    args = ["--backbones", "lightgcn_mm", "--seeds", "0", "--variants", "random", "id", "kt",
            "--stage1-root", str(tmp_path / "stage1"), "--out", str(tmp_path / "probe"),
            "--kt-steps", "2", "--kt-batch", "16", "--head-steps", "3", "--fp32"]
    assert bench.main(args) == 0
    table = capsys.readouterr().out
    control = f"{stage1['test']['recall@20']:.4f} ± 0.0000"
    assert f"| lightgcn_mm | control | {control} |" in table
    for variant in ("random", "id", "kt"):
        name = bench.run_name(variant, bench.parse_args(args))
        row = json.loads((tmp_path / "probe" / "lightgcn_mm" / name / "0" / "probe.json")
                         .read_text())
        assert row["variant"] == variant and 0 <= row["test"]["recall@20"] <= 1
        assert f"| lightgcn_mm | {variant} |" in table
    kt = json.loads((tmp_path / "probe" / "lightgcn_mm" / "kt-lora-2x16-lr0.001-fp32" / "0" /
                     "probe.json").read_text())
    assert -1 <= kt["info"]["mean_cosine_to_frozen"] <= 1 and kt["kt"]["kt_steps"] == 2
    assert kt["kt"]["tower_dropout"] is False
    # finished runs are reused, not retrained
    assert bench.main(args) == 0


def test_id_variant_is_the_stage1_item_embeddings(tmp_path):
    data = generate(tmp_path / "data", n_users=40, n_items=30, seed=1)
    np.save(data / "text_feat.npy", np.random.default_rng(0).standard_normal((30, 96))
            .astype(np.float32))
    cfg = TrainConfig.model_validate({
        "seed": 0, "data": {"path": str(data)}, "backbone": {"name": "lightgcn_mm", "modalities": ["text"]},
        "optim": {"batch_size": 256, "epochs": 1}, "eval": {"ks": [10, 20]}})
    run = tmp_path / "s1"
    run_stage1(cfg, run, torch.device("cpu"))
    feats, info = bench.substitute("id", run, bench.parse_args([]))
    text = feats["text"]
    assert text.shape == (30, 96) and info["id_dims"] == 64
    np.testing.assert_allclose(np.linalg.norm(text, axis=1), 1.0, rtol=1e-5)
    assert not text[:, 64:].any()
