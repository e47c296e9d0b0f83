"""Stage 1: train a recommendation backbone (and content heads) and write the run directory.

RUN_DIR holds the resolved `config.yaml`, `checkpoint.pt` (resumable), `best.pt` (weights at the
best validation epoch; with `heads.calibrate`, its heads are the calibrated ones), `metrics.json`
and `plots/curves.png`.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from train import checkpoint, distributed
from train.backbones import Backbone, BackboneInputs, build_backbone
from train.calibrate import calibrate_heads
from train.coldstart import ColdSplit, content_knn_baseline, evaluate_cold, random_baseline
from train.config import TrainConfig, dump_config
from train.data import Dataset
from train.fit import FitState, fit
from train.heads import ContentHeads
from train.modules import backbone_inputs, build_heads, prepare_data
from train.plots import plot_curves
from train.run import BEST, CONFIG, CURVES, PLOTS, write_metrics

log = logging.getLogger(__name__)
REPORT_KEYS = ("recall@10", "recall@20", "recall@50", "ndcg@10", "ndcg@20", "ndcg@50")


def metrics_summary(state: FitState) -> dict:
    """The metrics.json payload."""
    return {"valid": state.best_valid_metrics, "test": state.best_test_metrics,
            "best_epoch": state.best_epoch, "epochs_run": state.epoch + 1,
            "epoch_seconds": [h["train_seconds"] for h in state.history],
            "eval_seconds": [h["eval_seconds"] for h in state.history],
            "history": [{k: h[k] for k in ("epoch", "valid", "test") if k in h}
                        for h in state.history]}


def metrics_table(metrics: dict) -> str:
    """Markdown table of the valid and test figures at the best validation epoch (+ cold start)."""
    keys = [k for k in REPORT_KEYS if k in metrics["test"]]
    lines = ["| split | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for split in ("valid", "test"):
        lines.append(f"| {split} | " + " | ".join(f"{metrics[split][k]:.4f}" for k in keys) + " |")
    for name, cold in metrics.get("cold_start", {}).items():
        lines.append(f"| cold items, {name} | " + " | ".join(
            f"{cold[k]:.4f}" if k in cold else "" for k in keys) + " |")
    return "\n".join(lines)


def cold_start_metrics(model, heads: ContentHeads, features: dict[str, torch.Tensor],
                       train: Dataset, split: ColdSplit, ks: list[int], seed: int) -> dict:
    """Heads vs random vs content kNN on the held-out items, with the best-epoch weights."""
    model.eval()
    heads.eval()
    with torch.no_grad():
        users = model.user_embeddings()
        items = torch.from_numpy(split.items).to(users.device)
        cold_vectors = heads(heads.select(features, items))
        return {"heads": evaluate_cold(users.cpu(), cold_vectors.cpu(), split, ks),
                "random": random_baseline(split, ks, seed),
                "content_knn": content_knn_baseline({m: features[m].cpu() for m in heads.heads},
                                                    train, split, ks)}


def calibrate_best(modules: torch.nn.ModuleDict, features: dict[str, torch.Tensor],
                   dataset: Dataset, splits: tuple[ColdSplit | None, ColdSplit | None],
                   cfg: TrainConfig, best: Path) -> dict:
    """Load the best checkpoint into modules {"backbone", "heads"}; with a calibration split,
    calibrate the heads against that backbone (heads.calibrate) and save the checkpoint back; with
    a cold-start split, measure cold start. Returns {"heads_calibration", "cold_start"} as run."""
    split, calib = splits
    model, heads = modules["backbone"], modules["heads"]
    modules.load_state_dict(checkpoint.load(best))
    out = {}
    if calib is not None:
        out["heads_calibration"] = calibrate_heads(heads, model, features, dataset, calib,
                                                   cfg.optim.batch_size, cfg.seed)
        if distributed.is_main():
            checkpoint.save_atomic(modules.state_dict(), best)
    if split is not None:
        out["cold_start"] = cold_start_metrics(model, heads, features, dataset, split,
                                               cfg.cold_start.ks, cfg.seed)
    return out


def run_stage1(cfg: TrainConfig, run_dir: Path, device: torch.device, resume: bool = False,
               max_epochs_this_call: int | None = None,
               features: dict[str, np.ndarray] | None = None,
               wrap: Callable[[Backbone, BackboneInputs], Backbone] | None = None) -> dict:
    """Load data, build the backbone, fit it, and write config, metrics and curves.

    `features` (n_items, d) per modality replace the configured encoders' output for those
    modalities (bench/feature_probe.py: what other item features would do to the backbone).
    `wrap(backbone, inputs)` replaces the built backbone by what it returns, e.g. the backbone with
    a distillation loss (train/distill.py); content heads are sized on the wrapped model.

    Under torchrun every rank trains its part of each batch and only rank 0 writes RUN_DIR
    (train/distributed.py); metrics.json records `world_size`."""
    if distributed.is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, run_dir / CONFIG)
    data = prepare_data(cfg, device, features)
    dataset, split, calib = data.train, data.cold, data.calib
    inputs = backbone_inputs(dataset, device)
    model = build_backbone(cfg.backbone, inputs).to(device)
    if wrap is not None:
        model = wrap(model, inputs).to(device)
    heads = build_heads(cfg, None, inputs.features, model, device)
    state = fit(model, dataset, cfg.optim, cfg.eval, run_dir, cfg.seed, device, resume,
                max_epochs_this_call, heads, inputs.features)
    metrics = metrics_summary(state) | {"world_size": distributed.world_size()}
    distributed.barrier()  # rank 0 has written best.pt
    if heads is not None and (calib is not None or split is not None):
        modules = torch.nn.ModuleDict({"backbone": model, "heads": heads})
        metrics |= calibrate_best(modules, inputs.features, dataset, (split, calib), cfg,
                                  run_dir / BEST)
    if distributed.is_main():
        write_metrics(run_dir, metrics)
        plot_curves(state.history, run_dir / PLOTS / CURVES, cfg.eval.valid_metric)
    return metrics
