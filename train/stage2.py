"""Stage 2 of PTMRec (Zhang et al. 2025): knowledge-guided tuning of the encoders.

Starting from a stage-1 run, a PEFT method (deep IVLP prompts by default; LoRA or (IA)^3 through
peft) is attached to each encoder tower; everything else in the towers stays frozen. Each step:
the backbone trains on its own loss; the prompts and the content heads train on
L_KT = Σ_m KL(p_id || p_m) over the first `kt_batch_size` pairs of the batch (items deduplicated
before encoding), with p_id from a per-epoch detached snapshot of the backbone's embeddings.
Before every validation (every `refresh_every` epochs) all items are re-encoded (no grad, batched,
texts grouped by length to save padding) and replace the backbone's feature tables; early stopping
and test-at-best-valid are as in stage 1. The loaded stage-1 state is validated first and, with
`keep_start` and a stage-1 run that trained content heads, competes as epoch -1 (best_epoch -1: no
stage-2 epoch beat it on validation). Mixed precision (bf16 autocast) on CUDA, and on CPU with
`cpu_bf16`. The tuned parameters (towers, heads) may have their own learning rate. The frozen
base of each tower runs in eval mode while its PEFT parameters train (no dropout: the tuning loss
sees the features the backbone and the export get) unless `tower_dropout`.

Ablations (the paper's Fig. 3):
- `from_stage1: false`: joint prompts without stage 1 (backbone and heads start from scratch);
- `tuning_loss: bpr`: two stages without KT. The prompts and heads train on the recommendation
  objective instead, BPR on s(u, i) = u · head_m(tower_m(i)) with the batch's sampled positive
  and negative items (u detached, from the same per-epoch snapshot as the KT targets);
- `kt_weight: 0` scales the tuning loss to zero: the towers and heads then get no gradient (the
  backbone continues training on re-encoded, untuned features).

PerPEFT (`groups` > 1, train/perpeft.py): users are clustered on the stage-1 user embeddings and
each group tunes its own copy of the PEFT parameters and heads on batches of its own users.

The tuning step (encoding, the tuning losses, one epoch) is train/tuning.py.

`python -m train.stage2 --run STAGE1_RUN [--config STAGE2.yaml] [--set a.b=c] --out RUN_DIR`
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Literal

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from train import checkpoint, perpeft
from train.backbones import build_backbone
from train.coldstart import run_splits
from train.config import dump_config, load_config, load_raw
from train.data import load_dataset
from train.encoders import build_encoder
from train.encoders.peft_methods import PeftMethodConfig, apply_peft, check_peft_fits
from train.encoders.prompts import PromptConfig, count_trainable, prompted_text_config
from train.evaluate import Evaluator
from train.features import item_features
from train.fit import BEST, CHECKPOINT, evaluate_model
from train.heads import ContentHeads, HeadsConfig
from train.sampling import NegativeSampler, epoch_batches
from train.stage1 import (backbone_inputs, calibrate_best, cold_start_metrics, metrics_table,
                          seed_everything)
from train.tuning import refresh_features, train_epoch

log = logging.getLogger(__name__)
STAGE1_CONFIG = "stage1_config.yaml"  # the stage-1 run's config, for the exporter


class Stage2Config(BaseModel):
    """Knowledge-guided encoder tuning on top of a stage-1 run."""

    model_config = ConfigDict(extra="forbid")
    method: PeftMethodConfig = Field(default_factory=PromptConfig)
    modalities: list[Literal["image", "text"]] = ["image", "text"]
    kt_batch_size: int = Field(128, ge=2)
    kt_steps_per_epoch: int | None = Field(None, ge=1, description="cap on KT steps (CPU runs)")
    grad_accumulation: int = Field(1, ge=1)
    epochs: int = Field(50, ge=1)
    patience: int = Field(10, ge=0)
    learning_rate: float = 1e-3
    from_stage1: bool = True
    tuning_loss: Literal["kt", "bpr"] = Field(
        "kt", description="what trains the towers and heads: KL knowledge transfer (PTMRec) or "
                          "BPR on u · head(tower(i)) (ablation: two stages without KT)")
    kt_weight: float = Field(1.0, ge=0.0, description="weight of the tuning loss (KT or BPR)")
    refresh_every: int = Field(1, ge=1, description="re-encode all items every k epochs "
                                                     "(validation in between uses the last ones)")
    refresh_at_start: bool = Field(True, description="re-encode before the first epoch; False: "
                                   "the first epoch trains on the stage-1 (frozen) features")
    tuning_learning_rate: float | None = Field(None, gt=0, description="Adam lr of what the tuning "
                                               "loss trains (tuned tower parameters, content "
                                               "heads); None = learning_rate (the backbone's)")
    cpu_bf16: bool = Field(False, description="bf16 autocast on CPU as well (CUDA always uses it); "
                           "about 2x faster encoding on CPUs with AVX512-BF16/AMX")
    encode_batch_size: int = Field(64, ge=1)
    tower_dropout: bool = Field(False, description="keep the towers' own dropout active while "
                                "tuning (MiniLM/BERT: p 0.1). Off by default: the PEFT parameters "
                                "still train, but the frozen base runs in eval mode, so the "
                                "tuning loss sees the same features the backbone and the export "
                                "get (on ml100k, MiniLM's dropout alone doubles the KT loss of "
                                "the stage-1 heads, 0.12 -> 0.25); open_clip towers have none")
    resume_optimizer: bool = Field(True, description="start the backbone's Adam from the stage-1 "
                                   "run's moments (checkpoint.pt, its last epoch) instead of "
                                   "zeros: a fresh Adam's first steps, about lr per coordinate, "
                                   "knock a converged backbone off its optimum")
    keep_start: bool = Field(True, description="keep the loaded stage-1 state (validated before "
                             "the first epoch) as the epoch-(-1) candidate of test-at-best-valid, "
                             "so stage 2 never returns a model worse on validation than it started "
                             "from; only when stage 1 trained content heads (else the kept state "
                             "would have no cold-start encoder). False: only stage-2 epochs compete")

    recalibrate: bool = Field(True, description="when the stage-1 config calibrates its heads "
                              "(heads.calibrate), calibrate them again after stage 2 on the best "
                              "state's tuned features (KT tuning alone serves cold items worse)")
    groups: int = Field(1, ge=1, description="PerPEFT: user groups (k-means on the stage-1 user "
                        "embeddings), each with its own PEFT parameters and content heads and "
                        "its own item vectors (exported as G concatenated blocks); 1 = PTMRec")
    group_negatives: bool = Field(True, description="PerPEFT: a group's negatives come from the "
                                  "items its own users trained on (else from every training item)")
    init_from: Path | None = Field(None, description="PerPEFT: a finished single-set stage-2 run "
                                   "of the same stage-1 run and method (the global tuning); its "
                                   "backbone, heads and tuned towers start every group, as "
                                   "PerPEFT's per-group adapters start from its global one")

    @model_validator(mode="after")
    def _groups_need_stage1(self) -> "Stage2Config":
        if self.groups > 1 and not self.from_stage1:
            raise ValueError("groups > 1 needs from_stage1: true (users are grouped by their "
                             "stage-1 embeddings)")
        if self.init_from is not None and not self.from_stage1:
            raise ValueError("init_from needs from_stage1: true")
        return self

    @model_validator(mode="after")
    def _lora_dropout_needs_train_mode(self) -> "Stage2Config":
        if getattr(self.method, "dropout", 0.0) and not self.tower_dropout:
            raise ValueError("method.dropout > 0 needs tower_dropout: true (with the towers in "
                             "eval mode, LoRA's own dropout would be inactive too)")
        return self


def build_towers(enc_cfg, s2: Stage2Config) -> dict[str, torch.nn.Module]:
    """Towers of the stage-1 encoders with the PEFT method attached."""
    towers = {}
    for m in s2.modalities:
        tower_cfg = getattr(enc_cfg, m)
        if tower_cfg is None:
            raise ValueError(f"stage 2 tunes the {m} tower but the stage-1 run has no {m} encoder")
        if tower_cfg.name == "openclip_text" and isinstance(s2.method, PromptConfig):
            tower_cfg = prompted_text_config(tower_cfg, s2.method.n_ctx)
        towers[m] = apply_peft(build_encoder(tower_cfg), s2.method)
    return towers


def run_stage2(stage1_run: Path, s2: Stage2Config, out: Path, device: torch.device) -> dict:
    """Tune the encoders of a stage-1 run and write metrics.json / best.pt to `out`."""
    cfg = load_config(stage1_run / "config.yaml")
    if cfg.encoders is None:
        raise ValueError(f"{stage1_run}: stage 2 needs a stage-1 run with encoders configured")
    check_peft_fits(cfg.encoders, s2.method, s2.modalities)
    out.mkdir(parents=True, exist_ok=True)
    (out / "stage2.yaml").write_text(yaml.safe_dump(s2.model_dump(mode="json"), sort_keys=False))
    dump_config(cfg, out / STAGE1_CONFIG)
    seed_everything(cfg.seed)
    dataset = load_dataset(cfg.data.path)
    dataset.features = item_features(cfg.encoders, dataset, device)
    dataset, split, calib = run_splits(dataset, cfg.cold_start, cfg.heads, cfg.seed)
    inputs = backbone_inputs(dataset, device)
    model = build_backbone(cfg.backbone, inputs).to(device)
    heads = ContentHeads(cfg.heads or HeadsConfig(modalities=s2.modalities),
                         {m: f.shape[1] for m, f in inputs.features.items()},
                         model.user_embeddings().shape[1]).to(device)
    modules = torch.nn.ModuleDict({"backbone": model, "heads": heads})
    if s2.from_stage1:
        missing = modules.load_state_dict(checkpoint.load(stage1_run / BEST), strict=False)
        log.info("loaded stage-1 weights from %s (not in stage 1: %s)", stage1_run,
                 missing.missing_keys or "none")
    towers = build_towers(cfg.encoders, s2)
    for t in towers.values():
        t.to(device)
    if s2.init_from is not None:
        start_from(s2.init_from, cfg, s2, modules, towers)
    frozen = inputs.features
    if s2.groups > 1:
        with torch.no_grad():
            assignment = perpeft.cluster_users(model.user_embeddings(), s2.groups, cfg.seed)
        log.info("PerPEFT: %d user groups of %s users", s2.groups,
                 perpeft.group_sizes(assignment, s2.groups))
        model, heads, towers = perpeft.personalise(model, heads, towers, s2.groups, assignment)
        modules = torch.nn.ModuleDict({"backbone": model.to(device), "heads": heads})
        frozen = perpeft.tile_features(frozen, s2.groups)
    modules["towers"] = torch.nn.ModuleDict(towers)
    raw = {"image": dataset.items.images, "text": dataset.items.texts, "frozen": frozen}
    return _fit_stage2(cfg, s2, dataset, (split, calib), model, heads, towers, raw, modules, out,
                       device, stage1_run)


def start_from(run: Path, cfg, s2: Stage2Config, modules: torch.nn.ModuleDict,
               towers: dict[str, torch.nn.Module]) -> None:
    """Load a finished single-set stage-2 run of the same stage-1 config and method (PerPEFT's
    global tuning) into the backbone, heads and towers; ValueError when it does not fit."""
    path = Path(run)
    try:
        other = Stage2Config.model_validate(yaml.safe_load((path / "stage2.yaml").read_text()))
        other_cfg = load_config(path / STAGE1_CONFIG)
        if not (path / BEST).is_file():
            raise FileNotFoundError(f"no {BEST}")
    except (OSError, ValueError, yaml.YAMLError) as err:
        raise ValueError(f"init_from {path}: not a finished stage-2 run ({err})") from err
    if other.groups != 1:
        raise ValueError(f"init_from {path}: a run with {other.groups} groups; the global "
                         "tuning is a single-set run (groups: 1)")
    if other_cfg.config_hash() != cfg.config_hash():
        raise ValueError(f"init_from {path}: tuned from a different stage-1 config")
    if (other.method, other.modalities) != (s2.method, s2.modalities):
        raise ValueError(f"init_from {path}: method {other.method.name} on {other.modalities}; "
                         f"this run tunes {s2.method.name} on {s2.modalities}")
    everything = torch.nn.ModuleDict(dict(modules) | {"towers": torch.nn.ModuleDict(towers)})
    everything.load_state_dict(checkpoint.load(path / BEST))
    log.info("PerPEFT: every group starts from the global tuning of %s", path)


def param_groups(modules: torch.nn.ModuleDict, s2: Stage2Config) -> list[dict]:
    """Adam parameter groups: the backbone (learning_rate), and the tuned tower parameters with the
    content heads (tuning_learning_rate)."""
    tuned = [p for name in ("towers", "heads") if name in modules
             for p in modules[name].parameters() if p.requires_grad]
    ids = {id(p) for p in tuned}
    rest = [p for p in modules.parameters() if p.requires_grad and id(p) not in ids]
    return [{"params": rest},
            {"params": tuned, "lr": s2.tuning_learning_rate or s2.learning_rate}]


def restore_stage1_moments(optimizer: torch.optim.Optimizer, modules: torch.nn.ModuleDict,
                           stage1_run: Path, stage1_had_heads: bool) -> int:
    """Copy the stage-1 run's Adam state (exp_avg, exp_avg_sq, step) onto the same-named, same-shape
    trainable parameters of `modules`; returns how many parameters got it (0: no checkpoint)."""
    path = stage1_run / CHECKPOINT
    if not path.is_file():
        log.warning("%s: no stage-1 optimizer state; stage 2 starts Adam from zeros", path)
        return 0
    saved = checkpoint.load(path)["optimizer"]["state"]
    # stage 1 optimised ModuleDict({"backbone", ["heads"]}).parameters(), in this order; a
    # grouped (PerPEFT) backbone holds the stage-1 backbone as `inner`, and grouped heads (one
    # copy per group) start their moments from zero
    backbone = modules["backbone"]
    stage1 = {"backbone": getattr(backbone, "inner", backbone)}
    if stage1_had_heads and not perpeft.grouped(modules["heads"]):
        stage1["heads"] = modules["heads"]
    named = list(torch.nn.ModuleDict(stage1).named_parameters())
    moments = {named[i][0]: state for i, state in saved.items() if i < len(named)}
    if isinstance(backbone, perpeft.GroupedBackbone):  # each group's tables continue stage 1's
        named += [(f"backbone.features.{m}", param) for table in backbone.tables
                  for m, param in table.items()]
    restored = 0
    for name, param in named:
        state = moments.get(name)
        if state is None or not param.requires_grad or state["exp_avg"].shape != param.shape:
            continue
        optimizer.state[param] = {  # Adam keeps `step` on the CPU (else a GPU sync per step)
            k: (v.clone() if k == "step" else v.clone().to(param.device))
            if torch.is_tensor(v) else v for k, v in state.items()}
        restored += 1
    return restored


def _fit_stage2(cfg, s2, dataset, splits, model, heads, towers, raw, modules, out, device,
                stage1_run: Path) -> dict:
    """Early-stopped stage-2 loop with re-encoding before every validation; `splits` are the
    (cold-start, head-calibration) item splits, each None when not configured."""
    split, calib = splits
    optimizer = torch.optim.Adam(param_groups(modules, s2), lr=s2.learning_rate)
    if s2.from_stage1 and s2.resume_optimizer:
        n = restore_stage1_moments(optimizer, modules, stage1_run, cfg.heads is not None)
        log.info("Adam moments of %d parameter tensors restored from stage 1", n)
    generator = torch.Generator().manual_seed(cfg.seed)
    sampler = NegativeSampler(dataset.train, dataset.n_items)
    valid_eval = Evaluator(dataset, "valid", cfg.eval.ks, cfg.eval.batch_size)
    test_eval = Evaluator(dataset, "test", cfg.eval.ks, cfg.eval.batch_size)
    train_pairs = torch.from_numpy(dataset.train)
    samplers = (perpeft.group_samplers(dataset.train, model.groups.cpu().numpy(), dataset.n_items,
                                       s2.groups, s2.group_negatives) if s2.groups > 1 else None)
    # a start from a global stage-2 run (init_from) has tuned towers: its features are theirs
    reencoded = s2.refresh_at_start or s2.init_from is not None
    feats = refresh_features(model, towers, raw, s2, device) if reencoded else dict(raw["frozen"])

    kept_feats = {}

    def keep(valid: dict, feats: dict) -> dict:
        """Test (and cold-start) figures of the current state, saved as the best checkpoint."""
        kept_feats["best"] = feats
        kept = {"valid": valid, "test": evaluate_model(model, test_eval)}
        if split is not None:
            kept["cold_start"] = cold_start_metrics(model, heads, feats, dataset, split,
                                                    cfg.cold_start.ks, cfg.seed)
        checkpoint.save_atomic(dict(modules.state_dict()), out / BEST)
        return kept

    best, best_epoch, bad, history, result = -math.inf, -1, 0, [], {}
    start_valid = None
    if s2.from_stage1:  # the loaded state: checks the load, and is the candidate "epoch -1"
        start_valid = evaluate_model(model, valid_eval)
        log.info("stage 2 start (%s weights, %s features): valid %s %.4f",
                 "stage-1" if s2.init_from is None else "init_from",
                 "re-encoded" if reencoded else "stage-1",
                 cfg.eval.valid_metric,
                 start_valid[cfg.eval.valid_metric])
        if s2.keep_start and cfg.heads is None:
            log.warning("keep_start ignored: the stage-1 run trained no content heads, so its "
                        "state has no cold-start encoder to export")
        elif s2.keep_start:
            best, result = start_valid[cfg.eval.valid_metric], keep(start_valid, feats)
    step_cap = s2.kt_steps_per_epoch or math.inf
    for epoch in range(s2.epochs):
        t0 = time.perf_counter()
        modules.train()
        model.on_epoch_start(generator)
        batches = (perpeft.group_batches(samplers, cfg.optim.batch_size, generator) if samplers
                   else ((None, b) for b in epoch_batches(train_pairs, sampler,
                                                          cfg.optim.batch_size, generator)))
        loss = train_epoch(model, heads, towers, raw, optimizer, batches, s2, device, step_cap)
        train_seconds = time.perf_counter() - t0
        if (epoch + 1) % s2.refresh_every == 0 or epoch + 1 == s2.epochs:
            feats = refresh_features(model, towers, raw, s2, device)
        valid = evaluate_model(model, valid_eval)
        history.append({"epoch": epoch, "loss": loss, "valid": valid,
                        "seconds": time.perf_counter() - t0, "train_seconds": train_seconds})
        log.info("stage 2 epoch %d: loss %.4f valid %s %.4f (%.1f s)", epoch, loss,
                 cfg.eval.valid_metric, valid[cfg.eval.valid_metric], history[-1]["seconds"])
        if valid[cfg.eval.valid_metric] > best:
            best, best_epoch, bad = valid[cfg.eval.valid_metric], epoch, 0
            result = keep(valid, feats)
        else:
            bad += 1
            if bad > s2.patience:
                break
    worse = below_start(start_valid, best, cfg.eval.valid_metric)
    if worse:
        log.warning("%s: the run it started from, %s, serves warm users better", worse,
                    s2.init_from or stage1_run)
    # KT tuning alone serves cold items worse than the stage-1 config's calibrated heads did:
    # calibrate them again on the best state's tuned features (not PerPEFT's per-group heads)
    if calib is not None and s2.recalibrate and result:
        if perpeft.grouped(heads):
            log.warning("heads.calibrate is not applied to PerPEFT's per-group heads")
        else:
            result |= calibrate_best(modules, kept_feats["best"], dataset, (split, calib), cfg,
                                     out / BEST)
    trainable = sum(count_trainable(t)[0] for t in towers.values())
    encoder = sum(count_trainable(t)[1] for t in towers.values())
    metrics = result | {"best_epoch": best_epoch, "epochs_run": len(history),
                        "start_valid": start_valid,
                        "epoch_seconds": [h["seconds"] for h in history],
                        "train_seconds": [h["train_seconds"] for h in history],
                        "valid_curve": [h["valid"][cfg.eval.valid_metric] for h in history],
                        "tuning_loss": s2.tuning_loss, "from_stage1": s2.from_stage1,
                        "method": s2.method.name, "groups": s2.groups,
                        "group_sizes": (perpeft.group_sizes(model.groups, s2.groups)
                                        if s2.groups > 1 else None),
                        "trainable_encoder_params": trainable,
                        "encoder_params": encoder, "trainable_share": trainable / max(1, encoder)}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    return metrics


def below_start(start_valid: dict | None, best: float, metric: str) -> str | None:
    """Why the returned state is worse on validation than the state stage 2 loaded, or None.
    Only possible when the start did not compete (keep_start off, or a stage-1 run without
    content heads, whose state has no cold-start encoder to export)."""
    if start_valid is None or not best < start_valid[metric]:
        return None
    return (f"stage 2's best epoch validates below the state it started from ({metric} "
            f"{best:.4f} < {start_valid[metric]:.4f})")


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(prog="python -m train.stage2", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, required=True, help="stage-1 run directory")
    p.add_argument("--config", type=Path, help="stage-2 YAML (defaults: prompts n_ctx 2 depth 9)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="a.b=c")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    s2 = Stage2Config.model_validate(load_raw(args.config, args.overrides))
    from train.__main__ import run_device  # the CLI module imports the trainers, not vice versa

    metrics = run_stage2(args.run, s2, args.out, run_device(args.run))
    stage1 = json.loads((args.run / "metrics.json").read_text())
    print("\nstage 1 (frozen encoders):\n" + metrics_table(stage1))
    print(f"\nstage 2 ({s2.method.name}, {metrics['trainable_share']:.3%} of encoder params):\n"
          + metrics_table(metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
