"""Content heads, knowledge transfer and the cold-start protocol."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import random_rows, write_inter
from train import checkpoint
from train.coldstart import (ColdStartConfig, content_knn_baseline, evaluate_cold, hold_out_items,
                             random_baseline, run_splits)
from train.config import TrainConfig
from train.data import load_dataset
from train.heads import ContentHeads, HeadsConfig
from train.losses import knowledge_transfer
from train.stage1 import run_stage1
from train.run import BEST


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


def test_rank_loss_trains_the_fused_vector_only():
    heads = ContentHeads(HeadsConfig(kt_weight=0.0, rank_weight=1.0), {"image": 6, "text": 5}, 4)
    users = torch.randn(8, 4, requires_grad=True)
    pos = {"image": torch.randn(8, 6), "text": torch.randn(8, 5)}
    neg = {"image": torch.randn(8, 6), "text": torch.randn(8, 5)}
    loss = heads.loss(users, torch.randn(8, 4), pos, neg)
    loss.backward()
    assert users.grad is None
    assert all(h.weight.grad.abs().sum() > 0 for h in heads.heads.values())  # biases cancel
    expected = torch.nn.functional.softplus(
        (users * heads(neg)).sum(1) - (users * heads(pos)).sum(1)).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("bad", [{"rank_weight": 1.0, "target": "ego"},
                                 {"kt_weight": 0.0, "rank_weight": 0.0}])
def test_heads_config_refuses_inconsistent_weights(bad):
    with pytest.raises(ValueError, match="rank_weight"):
        HeadsConfig(**bad)


def test_calibration_keeps_its_best_epoch_in_best_pt(content_dir, tmp_path):
    """Calibrated heads: retrained from a fresh start and early-stopped on the withheld items,
    saved in best.pt, and well above random on the real held-out cold items."""
    cfg = TrainConfig.model_validate({
        "seed": 0, "data": {"path": str(content_dir)}, "backbone": {"name": "bpr"},
        "heads": {"rank_weight": 1.0, "calibrate": {"epochs": 15, "valid_fraction": 0.2,
                                                    "learning_rate": 0.01,
                                                    "valid_metric": "recall@5"}},
        "cold_start": {"holdout_fraction": 0.2},
        "optim": {"batch_size": 256, "epochs": 3, "learning_rate": 0.01},
        "eval": {"ks": [10, 20], "patience": 40}})
    metrics = run_stage1(cfg, tmp_path, torch.device("cpu"))
    report = metrics["heads_calibration"]
    assert report["best"] == max(report["history"]) and report["best_epoch"] > 0
    assert report["best"] > report["history"][0]
    cold = metrics["cold_start"]
    assert cold["heads"]["recall@10"] > 2 * cold["random"]["recall@10"]
    # best.pt carries the calibrated heads: reloading reproduces the reported cold-start figure
    ds = load_dataset(content_dir)
    warm, split = hold_out_items(ds, 0.2, seed=0)
    state = checkpoint.load(tmp_path / BEST)
    heads = ContentHeads(cfg.heads, {m: f.shape[1] for m, f in ds.features.items()}, 64)
    heads.load_state_dict({k.removeprefix("heads."): v for k, v in state.items()
                           if k.startswith("heads.")})
    users = state["backbone.user.weight"]
    feats = {m: torch.from_numpy(f)[torch.from_numpy(split.items)] for m, f in ds.features.items()}
    with torch.no_grad():
        again = evaluate_cold(users, heads(feats), split, [10, 20])
    assert again["recall@10"] == pytest.approx(cold["heads"]["recall@10"], abs=1e-9)


def test_run_splits_hold_out_disjoint_cold_and_calibration_items(content_dir):
    ds = load_dataset(content_dir)
    heads = HeadsConfig(rank_weight=1.0, calibrate={"valid_fraction": 0.1})
    warm, cold, calib = run_splits(ds, ColdStartConfig(holdout_fraction=0.2), heads, seed=3)
    trained = set(np.concatenate([warm.train, warm.valid, warm.test])[:, 1].tolist())
    assert not set(cold.items.tolist()) & set(calib.items.tolist())
    assert not trained & (set(cold.items.tolist()) | set(calib.items.tolist()))
    again = run_splits(ds, ColdStartConfig(holdout_fraction=0.2), heads, seed=3)
    assert np.array_equal(again[2].items, calib.items)           # the exporter derives the same
    assert run_splits(ds, None, HeadsConfig(), seed=3)[1:] == (None, None)
