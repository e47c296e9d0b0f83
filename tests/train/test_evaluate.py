"""MMRec's full-ranking protocol checked against hand-computed values."""
from __future__ import annotations

import math

import pytest
import torch

from tests.conftest import write_inter
from train.data import load_dataset
from train.evaluate import evaluate_scores

L2 = math.log2


@pytest.fixture
def hand_dataset(tmp_path):
    rows = [(0, 0, 0), (0, 2, 2), (0, 3, 2),             # u0: train {0}, test {2, 3}
            (1, 1, 0), (1, 0, 1), (1, 4, 2),             # u1: train {1}, valid {0}, test {4}
            (2, 5, 0), (2, 0, 2), (2, 1, 2), (2, 2, 2)]  # u2: 3 test items > K=1
    write_inter(tmp_path / "h.inter", rows)
    return load_dataset(tmp_path)


SCORES = torch.tensor([[10., 9, 8, 1, 7, 6],      # u0 ranking after masking 0: 1,2,4,5,3
                       [5., 100, 1, 2, 3, 4],     # u1 ranking after masking 1: 0,5,4,3,2
                       [3., 2, 1, 0, -1, 50]])    # u2 ranking after masking 5: 0,1,2,3,4


def test_hand_computed(hand_dataset):
    m = evaluate_scores(lambda users: SCORES[users], hand_dataset, "test", ks=(1, 3, 5))
    u0 = {"recall@1": 0, "recall@3": 0.5, "recall@5": 1.0, "ndcg@1": 0,
          "ndcg@3": (1 / L2(3)) / (1 + 1 / L2(3)),
          "ndcg@5": (1 / L2(3) + 1 / L2(6)) / (1 + 1 / L2(3))}
    # u1: its validation item 0 is NOT masked at test time: it takes rank 1 and is a miss.
    u1 = {"recall@1": 0, "recall@3": 1.0, "recall@5": 1.0, "ndcg@1": 0, "ndcg@3": 1 / L2(4),
          "ndcg@5": 1 / L2(4)}
    # u2: recall divides by |T_u| = 3 even when K = 1; IDCG uses min(|T_u|, K).
    u2 = {"recall@1": 1 / 3, "recall@3": 1.0, "recall@5": 1.0, "ndcg@1": 1.0, "ndcg@3": 1.0,
          "ndcg@5": 1.0}
    for key in u0:
        assert m[key] == pytest.approx((u0[key] + u1[key] + u2[key]) / 3, abs=1e-12), key


def test_valid_split_and_batching_agree(hand_dataset):
    fn = lambda users: SCORES[users]  # noqa: E731
    full = evaluate_scores(fn, hand_dataset, "test", ks=(1, 3, 5), batch_size=4096)
    tiny = evaluate_scores(fn, hand_dataset, "test", ks=(1, 3, 5), batch_size=1)
    assert full == pytest.approx(tiny)
    valid = evaluate_scores(fn, hand_dataset, "valid", ks=(1,))
    assert valid["recall@1"] == 1.0 and valid["ndcg@1"] == 1.0  # u1 only: item 0 at rank 1


def test_training_items_never_count(hand_dataset):
    # Scores that put every user's training item first: masking must make no difference.
    boosted = SCORES.clone()
    boosted[0, 0] = boosted[1, 1] = boosted[2, 5] = 1e9
    a = evaluate_scores(lambda u: boosted[u], hand_dataset, "test", ks=(1, 3))
    b = evaluate_scores(lambda u: SCORES[u], hand_dataset, "test", ks=(1, 3))
    assert a == b


def test_score_tensor_not_mutated(hand_dataset):
    before = SCORES.clone()
    evaluate_scores(lambda users: SCORES, hand_dataset, "test", ks=(1,))  # returns the cache itself
    assert torch.equal(SCORES, before)
