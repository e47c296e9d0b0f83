"""Head calibration: retrain the content heads against the frozen best-epoch backbone.

During stage 1 the heads chase a moving target and are saved with whatever epoch the backbone's
validation picked: barely trained when the backbone peaks early, overfitted to the warm items when
it peaks late (a linear head on 384-d text features overfits 1,500 movies within a few epochs).
Calibration freezes the best backbone, re-initialises the heads (seeded), trains them on their
loss (L_KT and/or the ranking term) and keeps the epoch whose heads rank a second set of held-out
items best for their users. Stage 1 withholds those items from training entirely, backbone
included, exactly like the cold-start items: items the backbone had seen would be a biased judge
(their users' vectors already encode them, and that measure keeps rising long after real cold
items stop improving). The choice never looks at the cold-start test items.
"""
from __future__ import annotations

import copy
import logging
import torch

from train.backbones import Backbone
from train.coldstart import ColdSplit, evaluate_cold
from train.data import Dataset
from train.fit import heads_batch_loss, kt_targets
from train.heads import ContentHeads
from train.sampling import NegativeSampler, batch_to, epoch_batches, seeded_torch

log = logging.getLogger(__name__)


def calibrate_heads(heads: ContentHeads, model: Backbone, features: dict[str, torch.Tensor],
                    train: Dataset, withheld: ColdSplit, batch_size: int, seed: int) -> dict:
    """Train `heads` in place on `train` (the best epoch's state is loaded back) and choose the
    epoch on `withheld`, items kept out of training entirely; returns a report."""
    cfg = heads.cfg.calibrate
    if cfg is None:
        raise ValueError("heads.calibrate is not configured")
    if len(withheld.ranking.test) == 0:
        raise ValueError("head calibration: the withheld items have no interactions; raise "
                         "heads.calibrate.valid_fraction")
    k = int(cfg.valid_metric.split("@")[1])
    model.eval()
    with torch.no_grad():
        targets = kt_targets(model, heads)
        users = model.user_embeddings().cpu()
    items = torch.from_numpy(withheld.items).to(next(heads.parameters()).device)

    def measure() -> float:
        heads.eval()
        with torch.no_grad():
            cold = heads(heads.select(features, items)).cpu()
        return evaluate_cold(users, cold, withheld, [k])[cfg.valid_metric]

    pairs = torch.from_numpy(train.train)
    sampler = NegativeSampler(train.train, train.n_items)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(heads.parameters(), lr=cfg.learning_rate,
                                 weight_decay=cfg.weight_decay)
    with seeded_torch(seed):  # heads on CUDA draw from the CUDA RNG: seeded and restored too
        heads.reset_parameters()
    history = [measure()]
    best, best_epoch, best_state, bad = history[0], 0, copy.deepcopy(heads.state_dict()), 0
    for epoch in range(1, cfg.epochs + 1):
        heads.train()
        for batch in epoch_batches(pairs, sampler, batch_size, generator):
            loss = heads_batch_loss(heads, targets, features,
                                    batch_to(batch, targets[0].device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        history.append(measure())
        if history[-1] > best:
            best, best_epoch, best_state, bad = history[-1], epoch, copy.deepcopy(
                heads.state_dict()), 0
        else:
            bad += 1
            if bad > cfg.patience:
                break
    heads.load_state_dict(best_state)
    log.info("head calibration: withheld-item %s %.4f at epoch %d (epoch 0: %.4f)",
             cfg.valid_metric, best, best_epoch, history[0])
    return {"withheld_items": int(len(withheld.items)), "valid_metric": cfg.valid_metric,
            "best_epoch": best_epoch, "best": best, "history": history}
