"""Contract suite over every registered backbone on tiny data (STYLE.md §13)."""
from __future__ import annotations

import pytest
import torch

from train.backbones import BACKBONES, build_backbone
from train.config import TrainConfig
from train.data import load_dataset
from train.evaluate import Evaluator, embedding_score_fn
from train.sampling import NegativeSampler, epoch_batches
from train.modules import backbone_inputs

NAMES = sorted(BACKBONES)


def _model(name, dataset_dir):
    ds = load_dataset(dataset_dir)
    cfg = TrainConfig.model_validate({"data": {"path": str(dataset_dir)}, "backbone": {"name": name}})
    torch.manual_seed(0)
    inputs = backbone_inputs(ds, torch.device("cpu"))
    inputs.features = {"image": torch.randn(ds.n_items, 32), "text": torch.randn(ds.n_items, 16)}
    return build_backbone(cfg.backbone, inputs), ds


@pytest.mark.parametrize("name", NAMES)
def test_shapes_and_finite_loss(name, tiny_dataset_dir):
    model, ds = _model(name, tiny_dataset_dir)
    users, items = model.embeddings()
    assert users.shape[0] == ds.n_users and items.shape[0] == ds.n_items
    assert users.shape[1] == items.shape[1] == model.dim
    id_users, id_items = model.id_embeddings()
    assert id_users.shape == (ds.n_users, 64) and id_items.shape == (ds.n_items, 64)
    batch = next(epoch_batches(torch.from_numpy(ds.train), NegativeSampler(ds.train, ds.n_items),
                               64, torch.Generator().manual_seed(0)))
    loss = model.loss(batch)
    assert loss.ndim == 0 and torch.isfinite(loss)


@pytest.mark.parametrize("name", NAMES)
def test_loss_falls_in_20_steps(name, tiny_dataset_dir):
    model, ds = _model(name, tiny_dataset_dir)
    gen = torch.Generator().manual_seed(0)
    sampler = NegativeSampler(ds.train, ds.n_items)
    batch = next(epoch_batches(torch.from_numpy(ds.train), sampler, 256, gen))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    losses = []
    for _ in range(20):
        model.on_epoch_start(gen)
        loss = model.loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.9, losses


@pytest.mark.parametrize("name", NAMES)
def test_dot_product_scores_equal_full_ranking(name, tiny_dataset_dir):
    model, ds = _model(name, tiny_dataset_dir)
    model.eval()
    with torch.no_grad():
        users, items = model.embeddings()
        assert torch.allclose(model.user_embeddings(), users)
        assert torch.allclose(model.item_embeddings(), items)
    evaluator = Evaluator(ds, "test", (5, 10))
    via_embeddings = evaluator.run(embedding_score_fn(users, items))
    dense = users @ items.T                                   # (U, I)
    via_matrix = evaluator.run(lambda u: dense[u].clone())
    assert via_embeddings == pytest.approx(via_matrix)
