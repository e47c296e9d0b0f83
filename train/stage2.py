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

Under `torchrun --nproc_per_node N -m train.stage2 --stage1 RUN ... [--resume]` each rank trains
its part of each batch, encodes its part of the tuning batch's items and of the catalogue, and
scores its share of the users (train/tuning.py, train/distributed.py); rank 0 alone writes OUT.
Each epoch ends with a checkpoint that `--resume` (and torchrun's `--max-restarts`) resumes.

`python -m train.stage2 --run STAGE1_RUN [--config STAGE2.yaml] [--set a.b=c] --out RUN_DIR
[--resume]` (`--stage1 STAGE1_RUN` is the same as `--run`, and the spelling torchrun accepts)
"""
from __future__ import annotations

import logging
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from train import checkpoint, distributed, perpeft
from train.backbones import Backbone, build_backbone
from train.cli import EXIT_CONFIG, load_or_report, parser, setup_logging
from train.config import Stage2Config, TrainConfig, dump_config, load_config, load_stage2
from train.encoders.base import Tower
from train.encoders.prompts import count_trainable
from train.encoders.peft_methods import check_peft_fits
from train.evaluate import Evaluator
from train.fit import FitState, evaluate_model, run_epochs
from train.heads import ContentHeads
from train.modules import RunData, backbone_inputs, build_heads, build_towers, prepare_data
from train.run import (BEST, CHECKPOINT, CONFIG, STAGE1_CONFIG, STAGE2, read_metrics,
                       run_device, write_metrics)
from train.sampling import NegativeSampler, epoch_batches
from train.stage1 import calibrate_best, cold_start_metrics, metrics_table
from train.stage2_checkpoint import Loop
from train.tuning import refresh_features, train_epoch

log = logging.getLogger(__name__)


@dataclass
class Tuned:
    """What stage 2 trains: the backbone, the heads and the PEFT towers, registered together in
    `modules` (the state best.pt holds), plus the items' raw content and frozen features."""

    model: Backbone
    heads: ContentHeads
    towers: dict[str, Tower]
    modules: torch.nn.ModuleDict
    raw: dict


def run_stage2(stage1_run: Path, s2: Stage2Config, out: Path, device: torch.device,
               resume: bool = False) -> dict:
    """Tune the encoders of a stage-1 run and write metrics.json / best.pt to `out` (rank 0);
    `resume` continues from out/checkpoint.pt when there is one."""
    cfg = load_config(stage1_run / CONFIG)
    if cfg.encoders is None:
        raise ValueError(f"{stage1_run}: stage 2 needs a stage-1 run with encoders configured")
    check_peft_fits(cfg.encoders, s2.method, s2.modalities)
    if distributed.is_main():
        out.mkdir(parents=True, exist_ok=True)
        (out / STAGE2).write_text(yaml.safe_dump(s2.model_dump(mode="json"), sort_keys=False))
        dump_config(cfg, out / STAGE1_CONFIG)
    data = prepare_data(cfg, device)
    parts = build_tuned(cfg, s2, data, stage1_run, device)
    return fit_stage2(cfg, s2, data, parts, out, device, stage1_run, resume)


def build_tuned(cfg: TrainConfig, s2: Stage2Config, data: RunData, stage1_run: Path,
                device: torch.device) -> Tuned:
    """The stage-1 backbone and heads (loaded from the stage-1 run with `from_stage1`), the
    towers with the method attached, and, with `groups` > 1, PerPEFT's per-group copies."""
    inputs = backbone_inputs(data.train, device)
    model = build_backbone(cfg.backbone, inputs).to(device)
    heads = build_heads(cfg, s2, inputs.features, model, device)
    modules = torch.nn.ModuleDict({"backbone": model, "heads": heads})
    if s2.start.from_stage1:
        missing = modules.load_state_dict(checkpoint.load(stage1_run / BEST), strict=False)
        log.info("loaded stage-1 weights from %s (not in stage 1: %s)", stage1_run,
                 missing.missing_keys or "none")
    towers = build_towers(cfg.encoders, s2)
    for t in towers.values():
        t.to(device)
    if s2.start.init_from is not None:
        start_from(s2.start.init_from, cfg, s2, modules, towers)
    frozen = inputs.features
    if s2.perpeft.groups > 1:
        with torch.no_grad():
            assignment = perpeft.cluster_users(model.user_embeddings(), s2.perpeft.groups, cfg.seed)
        # every rank trains on rank 0's clusters (k-means need not agree to the bit across ranks)
        assignment = distributed.gather(assignment.cpu())[0].to(assignment.device)
        log.info("PerPEFT: %d user groups of %s users", s2.perpeft.groups,
                 perpeft.group_sizes(assignment, s2.perpeft.groups))
        model, heads, towers = perpeft.personalise(model, heads, towers, s2.perpeft.groups,
                                                   assignment)
        modules = torch.nn.ModuleDict({"backbone": model.to(device), "heads": heads})
        frozen = perpeft.tile_features(frozen, s2.perpeft.groups)
    modules["towers"] = torch.nn.ModuleDict(towers)
    raw = {"image": data.train.items.images, "text": data.train.items.texts, "frozen": frozen}
    return Tuned(model, heads, towers, modules, raw)


def start_from(run: Path, cfg, s2: Stage2Config, modules: torch.nn.ModuleDict,
               towers: dict[str, torch.nn.Module]) -> None:
    """Load a finished single-set stage-2 run of the same stage-1 config and method (PerPEFT's
    global tuning) into the backbone, heads and towers; ValueError when it does not fit."""
    path = Path(run)
    try:
        other = load_stage2(path / STAGE2)
        other_cfg = load_config(path / STAGE1_CONFIG)
        if not (path / BEST).is_file():
            raise FileNotFoundError(f"no {BEST}")
    except (OSError, ValueError, yaml.YAMLError) as err:
        raise ValueError(f"init_from {path}: not a finished stage-2 run ({err})") from err
    if other.perpeft.groups != 1:
        raise ValueError(f"init_from {path}: a run with {other.perpeft.groups} groups; the global "
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
            {"params": tuned, "lr": s2.optim.tuning_learning_rate or s2.optim.learning_rate}]


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


def fit_stage2(cfg: TrainConfig, s2: Stage2Config, data: RunData, parts: Tuned, out: Path,
               device: torch.device, stage1_run: Path, resume: bool = False) -> dict:
    """Early-stopped stage-2 epochs (train.fit.run_epochs) with the items re-encoded before each
    validation; the loaded state competes as epoch -1 (`keep_start`); writes best.pt, metrics."""
    model, heads, towers, modules, raw = (parts.model, parts.heads, parts.towers, parts.modules,
                                          parts.raw)
    dataset = data.train
    optimizer = build_optimizer(cfg, s2, modules, stage1_run)
    generator = torch.Generator().manual_seed(cfg.seed)
    valid_eval = Evaluator(dataset, "valid", cfg.eval.ks, cfg.eval.batch_size)
    test_eval = Evaluator(dataset, "test", cfg.eval.ks, cfg.eval.batch_size)
    batches = epoch_source(dataset, model, s2, cfg.optim.batch_size, generator)
    # a start from a global stage-2 run (init_from) has tuned towers: its features are theirs
    reencoded = s2.encode.refresh_at_start or s2.start.init_from is not None
    current = {"feats": refresh_features(model, towers, raw, s2, device) if reencoded
               else dict(raw["frozen"])}
    kept: dict = {}

    def keep(epoch: int, valid: dict) -> dict:
        """Test (and cold-start) figures of the current state, saved as the best checkpoint."""
        kept.clear()
        kept.update(valid=valid, test=evaluate_model(model, test_eval), feats=current["feats"])
        if data.cold is not None:
            kept["cold_start"] = cold_start_metrics(model, heads, current["feats"], dataset,
                                                    data.cold, cfg.cold_start.ks, cfg.seed)
        if distributed.is_main():
            checkpoint.save_atomic(dict(modules.state_dict()), out / BEST)
        return kept["test"]

    def one_epoch(epoch: int) -> float:
        modules.train()
        model.on_epoch_start(generator)
        return train_epoch(model, heads, towers, raw, optimizer, batches(), s2, device,
                           s2.kt.steps_per_epoch or math.inf)

    def validate(epoch: int) -> dict:
        if (epoch + 1) % s2.encode.refresh_every == 0 or epoch + 1 == s2.optim.epochs:
            current["feats"] = refresh_features(model, towers, raw, s2, device)
        return evaluate_model(model, valid_eval)

    loop = Loop(modules, optimizer, generator, current, kept)
    if resume and (out / CHECKPOINT).is_file():
        state, start_valid = loop.restore(out / CHECKPOINT)
    else:
        state = FitState()
        start_valid = start_state(cfg, s2, model, valid_eval, reencoded, state, keep)

    def after_epoch(st: FitState) -> None:
        log_epoch(st, cfg.eval.valid_metric)
        loop.save(out / CHECKPOINT, st, start_valid)

    run_epochs(range(state.epoch + 1, s2.optim.epochs), state, one_epoch, validate, keep,
               cfg.eval.valid_metric, lambda epoch, best, bad: bad > s2.optim.patience,
               after_epoch, desc="stage 2")
    return finish(cfg, s2, data, parts, (state, start_valid, kept), out, stage1_run)


def build_optimizer(cfg: TrainConfig, s2: Stage2Config, modules: torch.nn.ModuleDict,
                    stage1_run: Path) -> torch.optim.Optimizer:
    """Adam over param_groups, with stage 1's moments where `resume_optimizer` asks for them."""
    optimizer = torch.optim.Adam(param_groups(modules, s2), lr=s2.optim.learning_rate)
    if s2.start.from_stage1 and s2.optim.resume_optimizer:
        n = restore_stage1_moments(optimizer, modules, stage1_run, cfg.heads is not None)
        log.info("Adam moments of %d parameter tensors restored from stage 1", n)
    return optimizer


def finish(cfg: TrainConfig, s2: Stage2Config, data: RunData, parts: Tuned, ended: tuple,
           out: Path, stage1_run: Path) -> dict:
    """After the epochs (`ended`: FitState, start figures, the kept best): recalibrate the best
    state's heads, and write metrics.json (rank 0); returns the metrics."""
    state, start_valid, kept = ended
    distributed.barrier()  # rank 0 has written best.pt
    worse = below_start(start_valid, state.best_valid, cfg.eval.valid_metric)
    if worse:
        log.warning("%s: the run it started from, %s, serves warm users better", worse,
                    s2.start.init_from or stage1_run)
    result = {k: v for k, v in kept.items() if k != "feats"}
    if kept:
        result |= recalibrate(cfg, s2, data, parts.modules, kept["feats"], out)
    metrics = result | stage2_summary(s2, state, start_valid, parts.model, parts.towers,
                                      cfg.eval.valid_metric)
    metrics["world_size"] = distributed.world_size()
    if distributed.is_main():
        write_metrics(out, metrics)
    return metrics


def epoch_source(dataset, model: Backbone, s2: Stage2Config, batch_size: int,
                 generator: torch.Generator):
    """A function giving one epoch of (user group, batch) pairs (group None when ungrouped)."""
    if s2.perpeft.groups > 1:
        samplers = perpeft.group_samplers(dataset.train, model.groups.cpu().numpy(),
                                          dataset.n_items, s2.perpeft.groups,
                                          s2.perpeft.group_negatives)
        return lambda: perpeft.group_batches(samplers, batch_size, generator)
    pairs = torch.from_numpy(dataset.train)
    sampler = NegativeSampler(dataset.train, dataset.n_items)
    return lambda: ((None, b) for b in epoch_batches(pairs, sampler, batch_size, generator))


def start_state(cfg: TrainConfig, s2: Stage2Config, model: Backbone, valid_eval: Evaluator,
                reencoded: bool, state: FitState, keep) -> dict | None:
    """Validate the loaded state (it checks the load) and, with `keep_start`, make it the
    epoch -1 candidate; returns its validation figures (None without `from_stage1`)."""
    if not s2.start.from_stage1:
        return None
    metric = cfg.eval.valid_metric
    start_valid = evaluate_model(model, valid_eval)
    log.info("stage 2 start (%s weights, %s features): valid %s %.4f",
             "stage-1" if s2.start.init_from is None else "init_from",
             "re-encoded" if reencoded else "stage-1", metric, start_valid[metric])
    if s2.start.keep_start and cfg.heads is None:
        log.warning("keep_start ignored: the stage-1 run trained no content heads, so its "
                    "state has no cold-start encoder to export")
    elif s2.start.keep_start:
        state.best_valid, state.best_valid_metrics = start_valid[metric], start_valid
        state.best_test_metrics = keep(-1, start_valid)
    return start_valid


def log_epoch(state: FitState, metric: str) -> None:
    """One log line per stage-2 epoch (they are long: the bar alone is not enough in a log)."""
    h = state.history[-1]
    log.info("stage 2 epoch %d: loss %.4f valid %s %.4f (%.1f s)", h["epoch"], h["loss"], metric,
             h["valid"][metric], h["train_seconds"] + h["eval_seconds"])


def recalibrate(cfg: TrainConfig, s2: Stage2Config, data: RunData, modules: torch.nn.ModuleDict,
                feats: dict, out: Path) -> dict:
    """KT tuning alone serves cold items worse than the stage-1 config's calibrated heads did:
    calibrate them again on the best state's tuned features (not PerPEFT's per-group heads)."""
    if data.calib is None or not s2.start.recalibrate:
        return {}
    if perpeft.grouped(modules["heads"]):
        log.warning("heads.calibrate is not applied to PerPEFT's per-group heads")
        return {}
    return calibrate_best(modules, feats, data.train, (data.cold, data.calib), cfg, out / BEST)


def stage2_summary(s2: Stage2Config, state: FitState, start_valid: dict | None,
                   model: Backbone, towers: dict[str, Tower], metric: str) -> dict:
    """The stage-2 fields of metrics.json besides the best state's figures."""
    history = state.history
    trainable = sum(count_trainable(t)[0] for t in towers.values())
    encoder = sum(count_trainable(t)[1] for t in towers.values())
    return {"best_epoch": state.best_epoch, "epochs_run": len(history),
            "start_valid": start_valid,
            "epoch_seconds": [h["train_seconds"] + h["eval_seconds"] for h in history],
            "train_seconds": [h["train_seconds"] for h in history],
            "valid_curve": [h["valid"][metric] for h in history],
            "tuning_loss": s2.kt.loss, "from_stage1": s2.start.from_stage1,
            "method": s2.method.name, "groups": s2.perpeft.groups,
            "group_sizes": (perpeft.group_sizes(model.groups, s2.perpeft.groups)
                            if s2.perpeft.groups > 1 else None),
            "trainable_encoder_params": trainable,
            "encoder_params": encoder, "trainable_share": trainable / max(1, encoder)}


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
    setup_logging()
    p = parser("python -m train.stage2", __doc__, config_required=False,
               config_help="stage-2 YAML (defaults: prompts n_ctx 2 depth 9)")
    # --stage1: torchrun's own parser reads `--run` after the module as its `--run-path`
    p.add_argument("--run", "--stage1", dest="run", type=Path, required=True,
                   help="stage-1 run directory (--stage1 under torchrun)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    args = p.parse_args(argv)
    s2 = load_or_report(load_stage2, args.config, args.overrides, "stage-2 config")
    if s2 is None:
        return EXIT_CONFIG
    device = distributed.init(run_device(args.run))
    main_rank = distributed.is_main()
    try:
        metrics = run_stage2(args.run, s2, args.out, device, args.resume)
    finally:
        distributed.shutdown()
    if not main_rank:
        return 0
    print("\nstage 1 (frozen encoders):\n" + metrics_table(read_metrics(args.run).model_dump()))
    print(f"\nstage 2 ({s2.method.name}, {metrics['trainable_share']:.3%} of encoder params):\n"
          + metrics_table(metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
