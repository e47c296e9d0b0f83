"""Content heads, knowledge transfer and the cold-start protocol."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import random_rows, write_inter
from train.coldstart import content_knn_baseline, hold_out_items, random_baseline
from train.config import TrainConfig
from train.data import load_dataset
from train.heads import ContentHeads, HeadsConfig
from train.losses import knowledge_transfer
from train.stage1 import run_stage1


@pytest.fixture(scope="module")
def content_dir(tmp_path_factory):
    """Users prefer one of 4 item groups; item features reveal the group (plus noise)."""
    d = tmp_path_factory.mktemp("content")
    write_inter(d / "c.inter", random_rows(120, 160, seed=1, per_user=15))
    rng = np.random.default_rng(0)
    group = np.eye(4)[np.arange(160) % 4]
    np.save(d / "text_feat.npy", (np.hstack([group, rng.normal(0, .3, (160, 12))])).astype("f4"))
    np.save(d / "image_feat.npy", (np.hstack([group, rng.normal(0, .5, (160, 4))])).astype("f4"))
    return d


def test_kt_loss_zero_iff_distributions_match():
    u, i = torch.randn(8, 4), torch.randn(8, 4)
    assert knowledge_transfer(u, i, u, i).item() == pytest.approx(0.0, abs=1e-6)
    assert knowledge_transfer(u, i, u, torch.randn(8, 4)).item() > 0


def test_heads_gradients_reach_heads_only():
    heads = ContentHeads(HeadsConfig(), {"image": 6, "text": 5}, 4)
    users = torch.randn(8, 4, requires_grad=True)
    items = torch.randn(8, 4, requires_grad=True)
    loss = heads.kt_loss(users, items, {"image": torch.randn(8, 6), "text": torch.randn(8, 5)})
    loss.backward()
    assert users.grad is None and items.grad is None
    assert all(p.grad is not None for p in heads.parameters())
    with pytest.raises(ValueError, match="need features for"):
        ContentHeads(HeadsConfig(), {"text": 5}, 4)


def test_hold_out_items_removes_every_interaction(content_dir):
    ds = load_dataset(content_dir)
    warm, split = hold_out_items(ds, 0.1, seed=0)
    cold = set(split.items.tolist())
    assert len(cold) == 16
    for pairs in (warm.train, warm.valid, warm.test):
        assert not cold & set(pairs[:, 1].tolist())
    assert len(split.ranking.test) > 0 and split.ranking.n_items == 16
    assert warm.train_csr[0][-1] == len(warm.train)          # caches rebuilt for the warm split


def test_cold_start_run_beats_random_and_reports_baselines(content_dir, tmp_path):
    cfg = TrainConfig.model_validate({
        "seed": 0, "data": {"path": str(content_dir)}, "backbone": {"name": "bpr"},
        "heads": {}, "cold_start": {"holdout_fraction": 0.2},
        "optim": {"batch_size": 256, "epochs": 40, "learning_rate": 0.01},
        "eval": {"ks": [10, 20], "patience": 40}})
    metrics = run_stage1(cfg, tmp_path, torch.device("cpu"))
    cold = metrics["cold_start"]
    assert set(cold) == {"heads", "random", "content_knn"}
    assert cold["heads"]["recall@10"] > 1.5 * cold["random"]["recall@10"]


def test_baselines_sane(content_dir):
    ds = load_dataset(content_dir)
    warm, split = hold_out_items(ds, 0.25, seed=0)
    rnd = random_baseline(split, [10], seed=0, draws=20)
    assert rnd["recall@10"] == pytest.approx(10 / 40, rel=0.2)   # expected K / |candidates|
    feats = {m: torch.from_numpy(f) for m, f in ds.features.items()}
    knn = content_knn_baseline(feats, warm, split, [10])
    assert knn["recall@10"] > 1.5 * rnd["recall@10"]
