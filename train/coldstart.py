"""Cold-start protocol: hold items out of training entirely and rank them by content alone.

A fraction of the interacted items (seeded) loses every interaction from train/valid/test. After
training, each user with interactions on held-out items ranks the held-out items by
user vector · cold vector; Recall/NDCG follow the MMRec definitions over that candidate set.
Baselines: random ranking, and content kNN (mean cosine similarity of an item's frozen features to
the user's training items).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from train.data import Dataset
from train.evaluate import evaluate_scores
from train.heads import HeadsConfig


class ColdStartConfig(BaseModel):
    """How many items to hold out for the cold-start evaluation."""

    model_config = ConfigDict(extra="forbid")
    holdout_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    ks: list[int] = [10, 20]


@dataclass
class ColdSplit:
    """Held-out items and the users' interactions with them (as a ranking dataset)."""

    items: np.ndarray        # (C,) original item ids
    ranking: Dataset         # items re-indexed 0..C-1; test split = cold interactions


def hold_out_items(dataset: Dataset, fraction: float, seed: int) -> tuple[Dataset, ColdSplit]:
    """Remove a random fraction of interacted items from every split."""
    rng = np.random.default_rng(seed)
    interacted = np.unique(np.concatenate([dataset.train[:, 1], dataset.valid[:, 1],
                                           dataset.test[:, 1]]))
    cold = np.sort(rng.choice(interacted, size=max(1, int(len(interacted) * fraction)),
                              replace=False))
    is_cold = np.zeros(dataset.n_items, dtype=bool)
    is_cold[cold] = True
    warm = {s: p[~is_cold[p[:, 1]]] for s, p in (("train", dataset.train),
                                                   ("valid", dataset.valid), ("test", dataset.test))}
    all_pairs = np.concatenate([dataset.train, dataset.valid, dataset.test])
    cold_pairs = all_pairs[is_cold[all_pairs[:, 1]]]
    has_train = np.zeros(dataset.n_users, dtype=bool)
    has_train[warm["train"][:, 0]] = True
    cold_pairs = cold_pairs[has_train[cold_pairs[:, 0]]]
    new_id = np.full(dataset.n_items, -1)
    new_id[cold] = np.arange(len(cold))
    ranking = Dataset(name=f"{dataset.name}-cold", path=dataset.path, n_users=dataset.n_users,
                      n_items=len(cold), train=np.zeros((0, 2), dtype=np.int64),
                      valid=np.zeros((0, 2), dtype=np.int64),
                      test=np.stack([cold_pairs[:, 0], new_id[cold_pairs[:, 1]]], 1))
    return replace(dataset, **warm), ColdSplit(items=cold, ranking=ranking)


def run_splits(dataset: Dataset, cold_start: ColdStartConfig | None, heads: HeadsConfig | None,
               seed: int) -> tuple[Dataset, ColdSplit | None, ColdSplit | None]:
    """The items a run keeps out of training: the cold-start test items (seed), then the heads'
    calibration items (seed + 1). Returns (training dataset, cold split, calibration split); stage 1,
    stage 2 and the exporter all derive a run's split here, so they always agree."""
    cold = calib = None
    if cold_start:
        dataset, cold = hold_out_items(dataset, cold_start.holdout_fraction, seed)
    if heads and heads.calibrate:
        dataset, calib = hold_out_items(dataset, heads.calibrate.valid_fraction, seed + 1)
    return dataset, cold, calib


def evaluate_cold(users: torch.Tensor, cold_vectors: torch.Tensor, split: ColdSplit,
                  ks: list[int]) -> dict[str, float]:
    """Rank held-out items by user · cold vector."""
    return evaluate_scores(lambda u: users[u] @ cold_vectors.T, split.ranking, "test", ks)


def random_baseline(split: ColdSplit, ks: list[int], seed: int, draws: int = 5) -> dict[str, float]:
    """Mean metrics of uniformly random rankings of the held-out items."""
    gen = torch.Generator().manual_seed(seed)
    n_cold = split.ranking.n_items
    runs = [evaluate_scores(lambda u: torch.rand(len(u), n_cold, generator=gen), split.ranking,
                            "test", ks) for _ in range(draws)]
    return {k: float(np.mean([r[k] for r in runs])) for k in runs[0]}


def content_knn_baseline(features: dict[str, torch.Tensor], train: Dataset, split: ColdSplit,
                         ks: list[int]) -> dict[str, float]:
    """Score = mean over modalities of the mean cosine similarity to the user's training items."""
    indptr, indices = train.train_csr
    rows = torch.from_numpy(np.repeat(np.arange(train.n_users), np.diff(indptr)))
    cols = torch.from_numpy(indices)
    cold = torch.from_numpy(split.items)
    counts = torch.from_numpy(np.maximum(np.diff(indptr), 1)).float().unsqueeze(1)
    profile_scores = []
    for feat in features.values():
        f = torch.nn.functional.normalize(feat.float(), dim=1)            # (I, d)
        profile = torch.zeros(train.n_users, f.shape[1]).index_add_(0, rows, f[cols]) / counts
        profile_scores.append(profile @ f[cold].T)                        # (U, C)
    scores = torch.stack(profile_scores).mean(0)
    return evaluate_scores(lambda u: scores[u], split.ranking, "test", ks)
