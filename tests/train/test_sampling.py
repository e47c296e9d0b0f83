"""Negative sampling: MMRec's pool (train items only), never a training item, deterministic."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from train.sampling import NegativeSampler, epoch_batches, seeded_torch


def test_negatives_valid_and_uniform():
    rng = np.random.default_rng(0)
    train = np.unique(np.stack([rng.integers(0, 50, 3000), rng.integers(0, 40, 3000)], 1), axis=0)
    sampler = NegativeSampler(train, n_items=45)           # items 40..44 never in train
    users = torch.from_numpy(np.repeat(np.arange(50), 400))
    neg = sampler.sample(users, torch.Generator().manual_seed(1)).numpy()
    seen = set(map(tuple, train.tolist()))
    assert not any((u, i) in seen for u, i in zip(users.tolist(), neg.tolist()))
    assert neg.max() < 40                                  # only items of the train split
    user0 = neg[:400]
    allowed = np.setdiff1d(np.unique(train[:, 1]), train[train[:, 0] == 0, 1])
    counts = np.bincount(user0, minlength=40)[allowed]
    assert counts.min() > 0 and abs(counts.mean() - 400 / len(allowed)) < 1e-9


def test_batches_cover_epoch_and_are_deterministic():
    train = torch.tensor([[u, (u * 7 + j) % 30] for u in range(20) for j in range(5)])
    sampler = NegativeSampler(train.numpy(), 30)
    run = lambda: list(epoch_batches(train, sampler, 16, torch.Generator().manual_seed(3)))  # noqa
    a, b = run(), run()
    assert sum(len(x.users) for x in a) == len(train)
    got = sorted(zip(torch.cat([x.users for x in a]).tolist(), torch.cat([x.pos for x in a]).tolist()))
    assert got == sorted(map(tuple, train.tolist()))
    assert all(torch.equal(x.neg, y.neg) for x, y in zip(a, b))


def test_fallback_draws_for_users_without_a_negative_in_the_pool():
    train = np.array([[0, 0], [0, 1], [1, 2]])
    sampler = NegativeSampler(train, 4, np.array([0, 1]), max_rounds=5,
                              fallback=NegativeSampler(train, 4, np.array([0, 1, 2, 3])))
    neg = sampler.sample(torch.tensor([0, 0, 1]), torch.Generator().manual_seed(0))
    assert set(neg[:2].tolist()) <= {2, 3} and neg[2].item() in {0, 1}
    with pytest.raises(RuntimeError, match="every candidate"):
        NegativeSampler(train, 4, np.array([0, 1]), max_rounds=5).sample(
            torch.tensor([0]), torch.Generator().manual_seed(0))


def test_seeded_torch_draws_from_its_seed_and_restores_the_stream():
    torch.manual_seed(1)
    expected_next = (torch.rand(3), torch.rand(3))[1]
    torch.manual_seed(1)
    first = torch.rand(3)
    with seeded_torch(5):
        inside = torch.rand(3)
    with seeded_torch(5):
        assert torch.equal(torch.rand(3), inside)
    assert not torch.equal(inside, first)
    assert torch.equal(torch.rand(3), expected_next)  # as if the blocks had not run
