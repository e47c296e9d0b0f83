"""Training batches as MMRec builds them: shuffled train pairs, one uniform negative each.

Negatives are uniform over the items of the TRAIN split and never in the user's training set
(MMRec dataloader `_sample_neg_ids`); rejection sampling is vectorised in rounds, not per sample.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from train import distributed


@contextmanager
def seeded_torch(seed: int) -> Iterator[None]:
    """A block whose torch draws (CPU, and every CUDA device: torch.manual_seed seeds them all)
    start from `seed`; the global RNG states are restored on exit, so the caller's stream goes on
    as if the block had not run."""
    with torch.random.fork_rng(devices=range(torch.cuda.device_count())):
        torch.manual_seed(seed)
        yield


@dataclass
class Batch:
    """A batch of (user, positive item, negative item) index triples."""

    users: torch.Tensor  # (B,)
    pos: torch.Tensor    # (B,)
    neg: torch.Tensor    # (B,)


class NegativeSampler:
    """Uniform negatives from a candidate pool, rejecting each user's training items."""

    def __init__(self, train: np.ndarray, n_items: int, pool: np.ndarray | None = None,
                 max_rounds: int = 100, fallback: NegativeSampler | None = None):
        self.n_items = n_items
        self.keys = torch.from_numpy(np.unique(train[:, 0] * n_items + train[:, 1]))
        self.pool = torch.from_numpy(np.unique(train[:, 1]) if pool is None else pool)
        self.max_rounds = max_rounds
        self.fallback = fallback  # draws for the entries still without a negative

    def _seen(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Whether each (user, item) pair is a training interaction."""
        q = users * self.n_items + items
        pos = torch.searchsorted(self.keys, q).clamp(max=len(self.keys) - 1)
        return self.keys[pos] == q

    def sample(self, users: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """One negative per user entry."""
        neg = self.pool[torch.randint(len(self.pool), users.shape, generator=generator)]
        todo = torch.nonzero(self._seen(users, neg)).squeeze(1)
        for _ in range(self.max_rounds):
            if len(todo) == 0:
                return neg
            neg[todo] = self.pool[torch.randint(len(self.pool), todo.shape, generator=generator)]
            todo = todo[self._seen(users[todo], neg[todo])]
        if len(todo) == 0:
            return neg
        if self.fallback is not None:
            neg[todo] = self.fallback.sample(users[todo], generator)
            return neg
        raise RuntimeError(f"{len(todo)} users have interacted with (nearly) every candidate "
                           f"item; no negative found in {self.max_rounds} rounds")


def epoch_batches(train: torch.Tensor, sampler: NegativeSampler, batch_size: int,
                  generator: torch.Generator) -> Iterator[Batch]:
    """Shuffle the (E, 2) training pairs, draw all negatives at once, yield batches."""
    order = torch.randperm(len(train), generator=generator)
    users, pos = train[order, 0], train[order, 1]
    neg = sampler.sample(users, generator)
    for s in range(0, len(users), batch_size):
        yield Batch(users[s:s + batch_size], pos[s:s + batch_size], neg[s:s + batch_size])


def rank_part(batch: Batch) -> tuple[Batch, float]:
    """This rank's part of a global batch and its loss weight (train/distributed.py); the whole
    batch with weight 1 in a single process."""
    if not distributed.active():
        return batch, 1.0
    s, weight = distributed.shard(len(batch.users))
    return Batch(batch.users[s], batch.pos[s], batch.neg[s]), weight


def batch_to(batch: Batch, device: torch.device) -> Batch:
    """Move a batch to the training device."""
    if device.type == "cpu":
        return batch
    return Batch(batch.users.to(device), batch.pos.to(device), batch.neg.to(device))
