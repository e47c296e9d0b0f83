"""The batch retraining job: train a fresh run, export it, publish it (DESIGN.md §2).

`python -m export.retrain --config CONFIG --bundles DIR [--runs-dir runs/retrain] [--set a.b=c ...]
[--factory F] [--quantize int8]` trains stage 1 into RUNS_DIR/<UTC timestamp>/, exports that run
into DIR/vN and points DIR/CURRENT at it; a server watching DIR then hot-swaps to it. Nothing is
published when training or export fails (exit 1), the config is invalid (exit 2) or another retrain
holds DIR's lock (exit 3): the server keeps serving the previous bundle.

Publish guard: the exported bundle goes live only when its validation Recall@k (k of the config's
`eval.valid_metric`) is at least (1 - `--tolerance`) x the live bundle's, both scored the same way
on the fresh run's validation split over the users both know (export.guard). Otherwise the live
bundle stays, the fresh one is left unpublished in DIR, one warning line says why and the exit code
is 4; DIR/retrain_status.json records every verdict for a cron wrapper. `--force` publishes anyway.

With `--stage2 STAGE2.yaml` (train/stage2.py; PTMRec's encoder tuning, or PerPEFT with `groups`)
stage 2 runs on the fresh stage-1 run into RUN/stage2, and is what goes on (to distillation or
export) unless its validation metric is below stage 1's; then stage 1 goes on (logged). An invalid
stage-2 config is exit 2 before any training.

With `--distill DISTILL.yaml` (train/distill.py) the trained run is the teacher: a light student is
distilled from it into RUN/student and exported instead, provided it keeps at least `--min-kept`
of the teacher's validation metric; otherwise the teacher is exported (logged), so a bad student
never replaces a good model. An invalid distillation config is exit 2 before any training.

With `--store URL` (the servers' event store: a SQLite state folder such as BUNDLES/.state, or
postgresql://...) the run trains on RUN/data: the config's dataset plus the items created online
and the recorded interactions (index.events.dataset), and the bundle's manifest records the
store position it covers (`event_watermark`), so servers stop replaying those events after the
swap. A store that cannot be read publishes nothing (exit 1).

Nightly at 03:00 (cron):
    0 3 * * * cd /srv/ptmrec && .venv/bin/python -m export.retrain --config configs/demo.yaml --bundles /srv/bundles --store /srv/bundles/.state >> /var/log/ptmrec-retrain.log 2>&1
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import logging
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from export import export_run, guard
from index import bundle as bundle_lib
from train.cli import EXIT_CONFIG, load_or_report, parser, setup_logging
from train.config import Stage2Config, TrainConfig, load_config, load_stage2
from train.data import load_dataset
from train.distill import DistillConfig, load_distill_config, run_distill
from train.run import pick_device, read_metrics
from train.stage1 import run_stage1
from train.stage2 import run_stage2

log = logging.getLogger("export.retrain")
EXIT_KEPT_LIVE = 4  # the publish guard kept the live bundle (BUNDLES/retrain_status.json says why)
LOCK = ".retrain.lock"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line arguments of the retraining job."""
    p = parser("python -m export.retrain", __doc__)
    p.add_argument("--bundles", type=Path, required=True, help="bundles directory to publish to")
    p.add_argument("--runs-dir", type=Path, default=Path("runs/retrain"),
                   help="parent of the timestamped run directories")
    p.add_argument("--factory", default="Flat", help="FAISS factory string of the item index")
    p.add_argument("--quantize", choices=["int8"], default=None, help="int8 ONNX encoders")
    p.add_argument("--stage2", type=Path, default=None, metavar="STAGE2.yaml",
                   help="tune the encoders of the trained run (stage 2) and publish that unless "
                        "it validates worse than stage 1")
    p.add_argument("--distill", type=Path, default=None, metavar="DISTILL.yaml",
                   help="distil the trained run into a light student and publish that")
    p.add_argument("--store", default=None, metavar="URL",
                   help="event store to add to the training data (SQLite state folder or "
                        "postgresql://...)")
    p.add_argument("--tolerance", type=float, default=0.02,
                   help="publish guard: the fresh bundle goes live unless its validation "
                        "recall@k is below (1 - TOLERANCE) x the live bundle's")
    p.add_argument("--force", action="store_true",
                   help="publish even when the publish guard would keep the live bundle")
    p.add_argument("--min-kept", type=float, default=0.95,
                   help="with --distill: the student's share of the teacher's validation metric "
                        "below which the teacher is published instead")
    return p.parse_args(argv)


def fresh_run_dir(runs_dir: Path) -> Path:
    """A new RUNS_DIR/<UTC timestamp>[-n] directory."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    runs_dir.mkdir(parents=True, exist_ok=True)
    for n in range(1000):
        candidate = runs_dir / (stamp if n == 0 else f"{stamp}-{n}")
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        return candidate
    raise RuntimeError(f"{runs_dir}: no free run directory for {stamp}")


@contextlib.contextmanager
def exclusive(bundles: Path):
    """Hold DIR/.retrain.lock so that overlapping cron runs do not race; BlockingIOError if held."""
    bundles.mkdir(parents=True, exist_ok=True)
    with open(bundles / LOCK, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def distilled_or_teacher(teacher: Path, dcfg: DistillConfig, cfg: TrainConfig,
                         min_kept: float) -> Path:
    """Distil `teacher` into teacher/student; the run to publish: the student when it keeps at
    least `min_kept` of the teacher's validation metric, else the teacher."""
    metric = (dcfg.eval or cfg.eval).valid_metric
    teacher_valid = read_metrics(teacher).valid[metric]
    student = teacher / "student"
    metrics = run_distill(teacher, dcfg, student, pick_device(cfg.device))
    kept = metrics["valid"][metric] / teacher_valid if teacher_valid > 0 else 0.0
    log.info("student %s-d keeps %.1f%% of the teacher's valid %s (%.4f vs %.4f)",
             metrics["distill"]["student_dim"], 100 * kept, metric, metrics["valid"][metric],
             teacher_valid)
    if kept < min_kept:
        log.warning("student below --min-kept %.2f: publishing the teacher %s instead",
                    min_kept, teacher)
        return teacher
    return student


def tuned_or_stage1(stage1: Path, s2: Stage2Config, cfg: TrainConfig) -> Path:
    """Stage 2 on `stage1` into stage1/stage2; the run to go on with: stage 2 unless its
    validation metric is below stage 1's."""
    metric = cfg.eval.valid_metric
    base = read_metrics(stage1).valid[metric]
    tuned = stage1 / "stage2"
    metrics = run_stage2(stage1, s2, tuned, pick_device(cfg.device))
    log.info("stage 2 (%s, %d user group(s)): valid %s %.4f vs stage 1 %.4f", s2.method.name,
             s2.perpeft.groups, metric, metrics["valid"][metric], base)
    if metrics["valid"][metric] < base:
        log.warning("stage 2 validates below stage 1: going on with stage 1 %s", stage1)
        return stage1
    return tuned


def with_store_data(cfg: TrainConfig, url: str, run_dir: Path) -> tuple[TrainConfig, int]:
    """The config retargeted at RUN/data (base dataset + event store) and its watermark."""
    from index.events import open_store
    from index.events.dataset import write_training_dataset

    store = open_store(url)
    try:
        summary = write_training_dataset(store, cfg.data.path, run_dir / "data")
    finally:
        store.close()
    data = cfg.data.model_copy(update={"path": run_dir / "data"})
    return cfg.model_copy(update={"data": data}), summary.watermark


def retrain(args: argparse.Namespace) -> int:
    """Train, export and publish; returns the exit code."""
    cfg = load_or_report(load_config, args.config, args.overrides)
    s2 = (load_or_report(load_stage2, args.stage2, [], "stage-2 config") if args.stage2
          else None)
    dcfg = (load_or_report(load_distill_config, args.distill, [], "distillation config")
            if args.distill else None)
    if cfg is None or (args.stage2 and s2 is None) or (args.distill and dcfg is None):
        return EXIT_CONFIG
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    run_dir = fresh_run_dir(args.runs_dir)
    start = time.perf_counter()
    watermark = 0
    if args.store:
        try:
            cfg, watermark = with_store_data(cfg, args.store, run_dir)
        except Exception:  # noqa: BLE001 - no training data, nothing published
            log.exception("could not add the event store to the training data; nothing published")
            return 1
    try:
        metrics = run_stage1(cfg, run_dir, pick_device(cfg.device))
    except Exception:  # noqa: BLE001 - any training failure must leave the live bundle alone
        log.exception("training failed in %s; nothing published", run_dir)
        return 1
    log.info("trained %s in %.0f s (best valid epoch %d)", run_dir, time.perf_counter() - start,
             metrics["best_epoch"])
    if s2 is not None:
        try:
            run_dir = tuned_or_stage1(run_dir, s2, cfg)
        except Exception:  # noqa: BLE001 - a failed stage 2 publishes nothing
            log.exception("stage 2 on %s failed; nothing published", run_dir)
            return 1
    if dcfg is not None:
        try:
            run_dir = distilled_or_teacher(run_dir, dcfg, cfg, args.min_kept)
        except Exception:  # noqa: BLE001 - a failed distillation publishes nothing
            log.exception("distillation of %s failed; nothing published", run_dir)
            return 1
    try:
        path = export_run(run_dir, args.bundles, factory=args.factory, quantize=args.quantize,
                          publish_bundle=False, event_watermark=watermark)
    except Exception:  # noqa: BLE001 - same: a failed export publishes nothing
        log.exception("export of %s failed; nothing published", run_dir)
        return 1
    code = publish_guarded(path, cfg, args)
    if code == 0:
        print(f"published {path.name} from {run_dir} in {time.perf_counter() - start:.0f} s")
    return code


def publish_guarded(path: Path, cfg: TrainConfig, args: argparse.Namespace) -> int:
    """Publish the exported bundle unless it scores worse than the live one (publish guard);
    0 when published, EXIT_KEPT_LIVE when the live bundle stays."""
    live_name = bundle_lib.current_version(args.bundles)
    live = args.bundles / live_name if live_name else None
    data = load_dataset(cfg.data.path)
    k = int(cfg.eval.valid_metric.split("@")[1])
    verdict = guard.judge(live, path, data.valid, data.train, k, args.tolerance)
    if not verdict.publish and not args.force:
        log.warning("publish guard: keeping the live bundle; %s", verdict.reason)
        guard.write_status(args.bundles, verdict, published=False)
        return EXIT_KEPT_LIVE
    if not verdict.publish:
        log.warning("publish guard overridden by --force: %s", verdict.reason)
    else:
        log.info("publish guard: %s", verdict.reason)
    bundle_lib.publish(args.bundles, path.name)
    guard.write_status(args.bundles, verdict, published=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    setup_logging()
    args = parse_args(argv)
    try:
        with exclusive(args.bundles):
            return retrain(args)
    except BlockingIOError:
        log.error("another retrain holds %s; exiting", args.bundles / LOCK)
        return 3


if __name__ == "__main__":
    sys.exit(main())
