"""The training loop: one visible `fit()` with MMRec's early stopping and test-at-best-valid.

Every epoch: on_epoch_start, shuffled batches with fresh negatives, Adam steps, LR schedule, full
validation; test is evaluated when validation strictly improves (the figure MMRec reports); a
checkpoint holding model, optimizer, schedule, RNG and early-stopping state is written atomically so
that `resume=True` continues from the last finished epoch with the same result.
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from train import checkpoint, distributed
from train.backbones import Backbone
from train.config import EvalConfig, OptimConfig
from train.data import Dataset
from train.evaluate import Evaluator, embedding_score_fn
from train.heads import ContentHeads
from train.run import BEST, CHECKPOINT
from train.sampling import Batch, NegativeSampler, batch_to, epoch_batches, rank_part

log = logging.getLogger(__name__)


@dataclass
class FitState:
    """Everything that must survive a restart besides model and optimizer."""

    epoch: int = -1                     # last finished epoch
    best_valid: float = -math.inf
    best_epoch: int = -1
    bad_evals: int = 0
    best_valid_metrics: dict = field(default_factory=dict)
    best_test_metrics: dict = field(default_factory=dict)
    history: list = field(default_factory=list)


def evaluate_model(model: Backbone, evaluator: Evaluator) -> dict[str, float]:
    """Propagate once and rank all items for the evaluator's users."""
    model.eval()
    with torch.no_grad():
        users, items = model.embeddings()
        return evaluator.run(embedding_score_fn(users, items))


def kt_targets(model: Backbone, heads: ContentHeads | None):
    """Detached (users, items) snapshot that defines p_id for the content heads this epoch."""
    if heads is None:
        return None
    with torch.no_grad():
        return model.embeddings() if heads.cfg.target == "final" else model.id_embeddings()


def _batch_loss(model: Backbone, heads: ContentHeads | None, targets, features, batch: Batch):
    """Backbone loss plus, when content heads are trained, theirs (KT, optionally ranking)."""
    loss = model.loss(batch)
    if heads is not None:
        loss = loss + heads_batch_loss(heads, targets, features, batch)
    return loss


def heads_batch_loss(heads: ContentHeads, targets, features, batch: Batch) -> torch.Tensor:
    """The heads' loss on a batch against detached (users, items) targets."""
    neg = heads.select(features, batch.neg) if heads.cfg.rank_weight else None
    return heads.loss(targets[0][batch.users], targets[1][batch.pos],
                      heads.select(features, batch.pos), neg)


def _save(run_dir, model, optimizer, scheduler, generator, state: FitState) -> None:
    """Write the resumable checkpoint of the last finished epoch (rank 0 only)."""
    if not distributed.is_main():
        return
    checkpoint.save_atomic({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                            "scheduler": scheduler.state_dict(), "generator": generator.get_state(),
                            **checkpoint.rng_state(), "state": state.__dict__},
                           run_dir / CHECKPOINT)


def _restore(run_dir, model, optimizer, scheduler, generator) -> FitState:
    """Load the last checkpoint into the live objects."""
    ck = checkpoint.load(run_dir / CHECKPOINT)
    model.load_state_dict(ck["model"])
    optimizer.load_state_dict(ck["optimizer"])
    scheduler.load_state_dict(ck["scheduler"])
    generator.set_state(ck["generator"])
    checkpoint.restore_rng(ck)
    log.info("resumed from %s after epoch %d", run_dir / CHECKPOINT, ck["state"]["epoch"])
    return FitState(**ck["state"])


def run_epochs(epochs: Iterable[int], state: FitState, train_epoch: Callable[[int], float],
               validate: Callable[[int], dict[str, float]],
               on_best: Callable[[int, dict[str, float]], dict[str, float]], metric: str,
               stops: Callable[[int, int, int], bool],
               after_epoch: Callable[[FitState], None] | None = None,
               desc: str = "epochs",
               improves: Callable[[float, float], bool] = float.__gt__) -> FitState:
    """The early-stopped loop of both stages: train an epoch, validate, and when `metric`
    improves on the best (`improves(score, best)`, by default strictly) call `on_best` (it saves
    the state and returns the test figures); stop when `stops(epoch, best_epoch, validations
    without improvement)` says so."""
    bar = tqdm(epochs, desc=desc, unit="ep", dynamic_ncols=True, disable=not distributed.is_main())
    for epoch in bar:
        if stops(epoch, state.best_epoch, state.bad_evals):
            break
        t0 = time.perf_counter()
        loss = train_epoch(epoch)
        train_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        valid = validate(epoch)
        record = {"epoch": epoch, "loss": loss, "valid": valid,
                  "train_seconds": train_s, "eval_seconds": time.perf_counter() - t1}
        score = valid[metric]
        if improves(float(score), float(state.best_valid)):
            state.best_valid, state.best_epoch, state.bad_evals = score, epoch, 0
            state.best_valid_metrics = valid
            state.best_test_metrics = record["test"] = on_best(epoch, valid)
        else:
            state.bad_evals += 1
        state.epoch = epoch
        state.history.append(record)
        if after_epoch is not None:
            after_epoch(state)
        bar.set_postfix(loss=f"{loss:.4f}", valid=f"{score:.4f}",
                        best=f"{state.best_valid:.4f}@{state.best_epoch}")
    return state


def replay_stopping(history: list[dict], metric: str, stops: Callable[[int, int, int], bool],
                    max_epochs: int,
                    improves: Callable[[float, float], bool] = float.__gt__) -> dict:
    """What run_epochs would have selected under another stopping rule, from a longer run's
    per-epoch history (valid every epoch, test at each new best): best_epoch, valid, test and
    epochs_run. Exact because training up to an epoch does not depend on the stopping rule;
    ValueError when the rule would have trained past the end of the history. A rule whose
    `improves` is stricter than the recorded run's (a min_delta) selects only epochs that were
    strict improvements there too, so their test figures are in the history."""
    best, best_epoch, bad, chosen, epochs_run = -math.inf, -1, 0, None, 0
    for i, record in enumerate(history):
        if record["epoch"] != i:
            raise ValueError(f"history is not consecutive from epoch 0 (epoch {record['epoch']} "
                             f"at position {i})")
        if stops(i, best_epoch, bad):
            break
        if improves(float(record["valid"][metric]), float(best)):
            if "test" not in record:
                raise ValueError(f"epoch {i} is a new best under this rule but was not one in the "
                                 "recorded run, so its test figures were not evaluated")
            best, best_epoch, bad, chosen = record["valid"][metric], i, 0, record
        else:
            bad += 1
        epochs_run = i + 1
    else:
        if len(history) < max_epochs and not stops(len(history), best_epoch, bad):
            raise ValueError(f"the rule trains past the {len(history)} recorded epochs; derive "
                             "it from a run that trained at least as long")
    if chosen is None:
        raise ValueError("empty history: nothing to select")
    return {"best_epoch": best_epoch, "epochs_run": epochs_run, "valid": chosen["valid"],
            "test": chosen["test"]}


def fit(model: Backbone, dataset: Dataset, optim_cfg: OptimConfig, eval_cfg: EvalConfig,
        run_dir: Path, seed: int, device: torch.device, resume: bool = False,
        max_epochs_this_call: int | None = None, heads: ContentHeads | None = None,
        features: dict[str, torch.Tensor] | None = None) -> FitState:
    """Train with early stopping on validation; returns the final state (best epoch, metrics).

    With `heads`, the content heads train jointly on the KT loss against a per-epoch snapshot of
    the backbone's embeddings; `features` are the item features they read (on `device`).
    """
    modules = torch.nn.ModuleDict({"backbone": model} | ({"heads": heads} if heads else {}))
    generator = torch.Generator().manual_seed(seed)
    train_pairs = torch.from_numpy(dataset.train)
    sampler = NegativeSampler(dataset.train, dataset.n_items)
    valid_eval = Evaluator(dataset, "valid", eval_cfg.ks, eval_cfg.batch_size)
    test_eval = Evaluator(dataset, "test", eval_cfg.ks, eval_cfg.batch_size)
    optimizer = torch.optim.Adam(modules.parameters(), lr=optim_cfg.learning_rate,
                                 weight_decay=optim_cfg.weight_decay)
    s0, s1 = optim_cfg.lr_scheduler
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: s0 ** (e / s1))
    state = FitState()
    if resume and (run_dir / CHECKPOINT).is_file():
        state = _restore(run_dir, modules, optimizer, scheduler, generator)
    epochs = range(state.epoch + 1, optim_cfg.epochs)
    if max_epochs_this_call is not None:
        epochs = epochs[:max_epochs_this_call]
    step = distributed.wrap(modules, lambda *a: _batch_loss(model, heads, *a), device)

    def train_epoch(epoch: int) -> float:
        modules.train()
        model.on_epoch_start(generator)
        targets = kt_targets(model, heads)
        total, n_batches = 0.0, 0
        for batch in epoch_batches(train_pairs, sampler, optim_cfg.batch_size, generator):
            part, weight = rank_part(batch)
            loss = step(targets, features, batch_to(part, device))
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss {loss.item()} at epoch {epoch}")
            optimizer.zero_grad(set_to_none=True)
            (loss * weight).backward()
            optimizer.step()
            total, n_batches = total + loss.item() * weight, n_batches + 1
        scheduler.step()
        return distributed.sum_float(total) / distributed.world_size() / max(1, n_batches)

    def on_best(epoch: int, valid: dict) -> dict:
        test = evaluate_model(model, test_eval)
        if distributed.is_main():
            checkpoint.save_atomic(modules.state_dict(), run_dir / BEST)
        return test

    return run_epochs(epochs, state, train_epoch, lambda e: evaluate_model(model, valid_eval),
                      on_best, eval_cfg.valid_metric, eval_cfg.stops,
                      lambda st: _save(run_dir, modules, optimizer, scheduler, generator, st),
                      improves=eval_cfg.improves)
