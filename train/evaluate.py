"""Full-ranking evaluation, exactly MMRec's protocol (reference/ALGORITHMS.md §1.3).

Every user with held-out items in the split is ranked against all items; only TRAINING items are
masked (validation items compete at test time); Recall@K = hits / |held-out of u|; NDCG@K is binary
with IDCG over min(|T_u|, K); users are averaged. Batched over users in torch.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from train import distributed
from train.data import Dataset, to_csr

ScoreFn = Callable[[torch.Tensor], torch.Tensor]
METRIC_PATTERN = r"^(recall|ndcg)@[1-9][0-9]*$"  # the names of the figures Evaluator.run returns


@dataclass
class _EvalBatch:
    """Precomputed masks and held-out keys for one batch of evaluated users."""

    users: torch.Tensor        # (b,)
    mask_rows: torch.Tensor    # (m,) row in batch of each training item to mask
    mask_cols: torch.Tensor    # (m,)
    heldout_keys: torch.Tensor  # (h,) sorted row * n_items + item
    n_heldout: torch.Tensor    # (b,)


class Evaluator:
    """Ranks all items for the users of one split; built once, reused every epoch."""

    def __init__(self, dataset: Dataset, split: str, ks: Sequence[int] = (10, 20, 50),
                 batch_size: int = 4096):
        self.n_items = dataset.n_items
        self.ks = tuple(sorted(ks))
        heldout = dataset.split(split)
        users = np.unique(heldout[:, 0])
        h_ptr, h_idx = to_csr(heldout, dataset.n_users)
        t_ptr, t_idx = dataset.train_csr
        self.batches = [self._batch(users[s:s + batch_size], h_ptr, h_idx, t_ptr, t_idx)
                        for s in range(0, len(users), batch_size)]
        self.n_users = len(users)
        self.kmax = min(self.ks[-1], self.n_items)
        self.discount = 1.0 / torch.log2(torch.arange(2, self.kmax + 2, dtype=torch.float64))
        self.cum_discount = torch.cumsum(self.discount, 0)  # IDCG over min(|T_u|, k)

    def _batch(self, users, h_ptr, h_idx, t_ptr, t_idx) -> _EvalBatch:
        """Gather the training mask and held-out items of a batch of users."""
        t_cnt = t_ptr[users + 1] - t_ptr[users]
        t_sel = np.concatenate([t_idx[t_ptr[u]:t_ptr[u + 1]] for u in users])
        h_cnt = h_ptr[users + 1] - h_ptr[users]
        h_sel = np.concatenate([h_idx[h_ptr[u]:h_ptr[u + 1]] for u in users])
        h_rows = np.repeat(np.arange(len(users)), h_cnt)
        keys = np.sort(h_rows * self.n_items + h_sel)
        return _EvalBatch(users=torch.from_numpy(users),
                          mask_rows=torch.from_numpy(np.repeat(np.arange(len(users)), t_cnt)),
                          mask_cols=torch.from_numpy(t_sel),
                          heldout_keys=torch.from_numpy(keys),
                          n_heldout=torch.from_numpy(h_cnt))

    @torch.no_grad()
    def run(self, score_fn: ScoreFn) -> dict[str, float]:
        """Score every batch with score_fn(users) -> (b, n_items) and average the metrics. Under
        torchrun each rank scores every N-th batch; the per-batch sums are gathered and added in
        batch order, so the figures are those of one process (train/distributed.py)."""
        mine = {i: self._batch_sums(b, score_fn)
                for i, b in enumerate(self.batches) if i % distributed.world_size()
                == distributed.rank()}
        per_batch = {i: sums for part in distributed.gather(mine) for i, sums in part.items()}
        totals = {name: 0.0 for name in self.metric_names()}
        for i in range(len(self.batches)):
            for name, value in per_batch[i].items():
                totals[name] += value
        return {name: total / self.n_users for name, total in totals.items()}

    def metric_names(self) -> list[str]:
        """recall@k and ndcg@k for every k, in the order run() reports them."""
        return [f"{m}@{k}" for k in self.ks for m in ("recall", "ndcg")]

    def _batch_sums(self, b: _EvalBatch, score_fn: ScoreFn) -> dict[str, float]:
        """Sums over one batch's users of Recall@k and NDCG@k."""
        kmax, discount, cum_discount = self.kmax, self.discount, self.cum_discount  # (K,)
        scores = score_fn(b.users).float().clone()                 # (b, I), never a view
        scores[b.mask_rows.to(scores.device), b.mask_cols.to(scores.device)] = -torch.inf
        top = torch.topk(scores, kmax, dim=1).indices.cpu()         # (b, K)
        keys = torch.arange(len(b.users)).unsqueeze(1) * self.n_items + top
        pos = torch.searchsorted(b.heldout_keys, keys).clamp(max=len(b.heldout_keys) - 1)
        hit = (b.heldout_keys[pos] == keys).double()                # (b, K)
        n = b.n_heldout.double()
        sums = {}
        for k in self.ks:
            kk = min(k, kmax)
            sums[f"recall@{k}"] = (hit[:, :kk].sum(1) / n).sum().item()
            dcg = (hit[:, :kk] * discount[:kk]).sum(1)
            idcg = cum_discount[(b.n_heldout.clamp(max=kk) - 1)]
            sums[f"ndcg@{k}"] = (dcg / idcg).sum().item()
        return sums


def evaluate_scores(score_fn: ScoreFn, dataset: Dataset, split: str = "test",
                    ks: Sequence[int] = (10, 20, 50), batch_size: int = 4096) -> dict[str, float]:
    """One-shot full-ranking evaluation of a scoring function on a split."""
    return Evaluator(dataset, split, ks, batch_size).run(score_fn)


def embedding_score_fn(user_emb: torch.Tensor, item_emb: torch.Tensor) -> ScoreFn:
    """Dot-product scores of users against all items."""
    return lambda users: user_emb[users] @ item_emb.T
