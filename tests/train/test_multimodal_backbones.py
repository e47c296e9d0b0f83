"""Multimodal backbones beyond the shared contract of tests/train/test_backbones.py:
modalities, FREEDOM graph, resume."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from train.backbones import MULTIMODAL, BackboneInputs, build_backbone
from train.config import TrainConfig
from train.data import load_dataset
from train.graph import bipartite_edge_weights
from train.sampling import NegativeSampler, epoch_batches
from train.modules import backbone_inputs
from train.stage1 import run_stage1

NAMES = sorted(MULTIMODAL)


def _inputs(ds, seed: int = 0) -> BackboneInputs:
    inputs = backbone_inputs(ds, torch.device("cpu"))
    gen = torch.Generator().manual_seed(seed)
    inputs.features = {"image": torch.randn(ds.n_items, 32, generator=gen),
                       "text": torch.randn(ds.n_items, 16, generator=gen)}
    return inputs


def _model(name, dataset_dir, **overrides):
    ds = load_dataset(dataset_dir)
    cfg = TrainConfig.model_validate({"data": {"path": str(dataset_dir)},
                                      "backbone": {"name": name, **overrides}})
    torch.manual_seed(0)
    return build_backbone(cfg.backbone, _inputs(ds)), ds


def _batch(ds, size: int = 64):
    return next(epoch_batches(torch.from_numpy(ds.train), NegativeSampler(ds.train, ds.n_items),
                              size, torch.Generator().manual_seed(0)))


@pytest.mark.parametrize("name", NAMES)
def test_missing_modality_is_named(name, tiny_dataset_dir):
    ds = load_dataset(tiny_dataset_dir)
    cfg = TrainConfig.model_validate({"data": {"path": str(tiny_dataset_dir)},
                                      "backbone": {"name": name}})
    inputs = _inputs(ds)
    del inputs.features["text"]
    with pytest.raises(ValueError, match="'text'"):
        build_backbone(cfg.backbone, inputs)


@pytest.mark.parametrize("name", ["bpr_mm", "lightgcn_mm", "vbpr", "freedom"])
def test_single_modality(name, tiny_dataset_dir):
    model, ds = _model(name, tiny_dataset_dir, modalities=["image"])
    assert torch.isfinite(model.loss(_batch(ds)))
    assert list(model.features) == ["image"]


@pytest.mark.parametrize("name", ["freedom", "mgcn", "smore"])
def test_feature_tables_train_and_gradients_reach_them(name, tiny_dataset_dir):
    overrides = {"reg_weight": 1e-2} if name == "freedom" else {}
    model, ds = _model(name, tiny_dataset_dir, **overrides)
    model.on_epoch_start(torch.Generator().manual_seed(0))
    model.loss(_batch(ds)).backward()
    for m in ("image", "text"):
        assert model.features[m].requires_grad and model.features[m].grad.abs().sum() > 0
        assert model.trs[m].weight.grad.abs().sum() > 0


def test_freedom_pruned_graph_size_and_determinism(tiny_dataset_dir):
    model, ds = _model("freedom", tiny_dataset_dir)
    n_edges = len(ds.train)
    model.on_epoch_start(torch.Generator().manual_seed(7))
    first = model.masked_adj.to_dense()
    assert torch.count_nonzero(first) == 2 * int(n_edges * (1 - model.cfg.dropout))
    model.on_epoch_start(torch.Generator().manual_seed(7))
    assert torch.equal(model.masked_adj.to_dense(), first)
    model.on_epoch_start(torch.Generator().manual_seed(8))
    assert not torch.equal(model.masked_adj.to_dense(), first)
    assert torch.allclose(first, first.T)


def test_freedom_pruning_prefers_low_degree_edges(tiny_dataset_dir):
    model, ds = _model("freedom", tiny_dataset_dir)
    train = torch.from_numpy(ds.train)
    w = bipartite_edge_weights(train[:, 0], train[:, 1], ds.n_users, ds.n_items)
    kept = torch.zeros(len(w))
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        model.on_epoch_start(gen)
        dense = model.masked_adj.to_dense()
        kept += (dense[train[:, 0], train[:, 1] + ds.n_users] > 0).float()
    heavy, light = w > w.median(), w < w.median()
    assert kept[heavy].mean() > kept[light].mean()


def test_freedom_eval_uses_full_graph(tiny_dataset_dir):
    model, _ = _model("freedom", tiny_dataset_dir)
    full = model.embeddings()
    model.on_epoch_start(torch.Generator().manual_seed(1))
    again = model.embeddings()
    assert torch.equal(full[0], again[0]) and torch.equal(full[1], again[1])


@pytest.mark.parametrize("name", ["freedom", "smore"])
def test_resume_matches_uninterrupted(tiny_dataset_dir, tmp_path, name):
    data = tmp_path / "data"
    shutil.copytree(tiny_dataset_dir, data)
    n_items = load_dataset(data).n_items
    rng = np.random.default_rng(0)
    np.save(data / "image_feat.npy", rng.standard_normal((n_items, 32)).astype(np.float32))
    np.save(data / "text_feat.npy", rng.standard_normal((n_items, 16)).astype(np.float32))
    cfg = TrainConfig.model_validate({
        "seed": 3, "data": {"path": str(data)},
        "backbone": {"name": name, "graph_cache": str(tmp_path / "graphs")},
        "optim": {"batch_size": 128, "epochs": 3, "learning_rate": 0.01},
        "eval": {"ks": [10, 20]}})
    full = run_stage1(cfg, tmp_path / "full", torch.device("cpu"))
    run_stage1(cfg, tmp_path / "cut", torch.device("cpu"), max_epochs_this_call=1)
    resumed = run_stage1(cfg, tmp_path / "cut", torch.device("cpu"), resume=True)
    for key in ("valid", "test", "best_epoch", "epochs_run"):
        assert resumed[key] == full[key], key
    assert len(list((tmp_path / "graphs").glob("*.pt"))) == 2


def test_substituted_features(tiny_dataset_dir, tmp_path):
    """run_stage1(features=...): the same features reproduce the run exactly, others change it,
    a wrong shape is refused (bench/feature_probe.py relies on all three)."""
    data = tmp_path / "data"
    shutil.copytree(tiny_dataset_dir, data)
    n_items = load_dataset(data).n_items
    rng = np.random.default_rng(0)
    image = rng.standard_normal((n_items, 32)).astype(np.float32)
    text = rng.standard_normal((n_items, 16)).astype(np.float32)
    np.save(data / "image_feat.npy", image)
    np.save(data / "text_feat.npy", text)
    cfg = TrainConfig.model_validate({
        "seed": 3, "data": {"path": str(data)},
        "backbone": {"name": "freedom", "graph_cache": str(tmp_path / "graphs")},
        "optim": {"batch_size": 128, "epochs": 3, "learning_rate": 0.01},
        "eval": {"ks": [10, 20]}})
    cpu = torch.device("cpu")
    base = run_stage1(cfg, tmp_path / "base", cpu)
    same = run_stage1(cfg, tmp_path / "same", cpu, features={"text": text.copy()})
    other = run_stage1(cfg, tmp_path / "other", cpu,
                       features={"text": rng.standard_normal(text.shape).astype(np.float32)})
    assert same["valid"] == base["valid"] and same["test"] == base["test"]
    assert other["valid"] != base["valid"]
    with pytest.raises(ValueError, match="substitute text features"):
        run_stage1(cfg, tmp_path / "bad", cpu, features={"text": text[:, :8]})
