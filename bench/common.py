"""What the benchmarks share: the repository root, mean ± std cells, peak memory, runs in their
own processes (so each one's peak memory is its own), and the stage-1 / stage-2 run cache of the
ml100k tables (bench.peft_table, bench.ablation): finished runs with the same config are reused.

Run any benchmark as `python -m bench.NAME` from the repository root.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import multiprocessing as mp
import queue as queue_mod
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from train.run import METRICS, read_metrics, write_metrics

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"   # the benchmark datasets (not in a clone)
STAGE2_CONFIGS = ROOT / "configs" / "ml100k" / "stage2"
# The tables set beside MMRec's figures (peers, earlier results) train stage 1 under MMRec's exact
# stopping rule, not the default `patient` one; a later --set may still override it.
MMREC_RULE = "eval.protocol=mmrec"


def peak_memory_mib() -> float:
    """Peak memory of this process in MiB: allocated GPU memory on CUDA, else peak RSS."""
    import resource

    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _child(kind: str, payload: dict, threads: int | None) -> None:
    """Body of a run's own process (so its peak memory is its own): stage 1 or stage 2."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    logging.basicConfig(level=logging.WARNING)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(payload["out"])
    start = time.perf_counter()
    if kind == "stage1":
        from train.config import load_config
        from train.stage1 import run_stage1

        cfg = load_config(Path(payload["config"]), payload["overrides"])
        metrics = run_stage1(cfg, out, device)
    else:
        from train.config import Stage2Config
        from train.stage2 import run_stage2

        metrics = run_stage2(Path(payload["stage1"]), Stage2Config.model_validate(payload["s2"]),
                             out, device)
    metrics |= {"wall_seconds": time.perf_counter() - start, "peak_memory_mib": peak_memory_mib(),
                "memory_kind": "cuda allocated" if device.type == "cuda" else "peak RSS"}
    write_metrics(out, metrics)


def run_in_child(kind: str, payload: dict, threads: int | None) -> dict:
    """Run `_child` in a fresh (spawned) process and return the metrics it wrote."""
    proc = mp.get_context("spawn").Process(target=_child, args=(kind, payload, threads))
    proc.start()
    proc.join()
    if proc.exitcode != 0:
        raise RuntimeError(f"{kind} run {payload['out']} failed (exit code {proc.exitcode})")
    return read_metrics(Path(payload["out"])).model_dump()


def stage1_run(backbone: str, seed: int, args) -> Path:
    """The finished stage-1 run of a ml100k config and seed (trained here when missing)."""
    out = args.stage1_root / backbone / str(seed)
    if not (out / METRICS).is_file():
        overrides = [MMREC_RULE, f"seed={seed}", f"data.path={args.data}"]
        overrides += [f"threads={args.threads}"] if args.threads else []
        print(f"training stage 1: {backbone} seed {seed} -> {out}", flush=True)
        run_in_child("stage1", {"config": str(ROOT / "configs" / "ml100k" / f"{backbone}.yaml"),
                                "overrides": overrides, "out": str(out)}, args.threads)
    return out


def stage2_settings(method_file: str, args, extra: dict | None = None) -> dict:
    """A stage-2 config dict: the checked-in YAML, the CLI caps, then `extra` (variant keys)."""
    path = STAGE2_CONFIGS / f"{method_file}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such stage-2 config")
    raw = yaml.safe_load(path.read_text()) or {}
    caps = {"epochs": args.epochs, "kt_steps_per_epoch": args.kt_steps,
            "kt_batch_size": args.kt_batch, "patience": args.patience,
            "learning_rate": args.lr}
    raw |= {k: v for k, v in caps.items() if v is not None}
    from train.config import apply_override

    for assignment in args.set:
        apply_override(raw, assignment)
    return raw | (extra or {})


def stage2_dir(root: Path, stage1: Path, name: str, s2: dict, seed: int) -> Path:
    """<root>/<backbone>/<name>-<hash of the stage-2 config and the stage-1 root>/<seed>; the
    hash covers the settings (group.field) that differ from Stage2Config's defaults, so a new
    option whose default keeps the old behaviour does not orphan finished runs."""
    from train.config import Stage2Config

    def leaves(cfg: dict) -> dict:
        return {f"{k}.{f}" if k != "method" and isinstance(v, dict) else k: x
                for k, v in cfg.items()
                for f, x in (v.items() if k != "method" and isinstance(v, dict) else [(k, v)])}

    defaults = leaves(Stage2Config().model_dump(mode="json"))
    changed = {k: v for k, v in leaves(s2).items() if k not in defaults or defaults[k] != v}
    if changed.get("start.init_from"):  # <root>/<backbone>/<name>-<hash>/<seed>: seeds vary
        changed["start.init_from"] = Path(changed["start.init_from"]).parent.name
    key = json.dumps({"stage2": changed, "stage1_root": str(stage1.resolve().parents[1])},
                     sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:8]
    return root / stage1.parent.name / f"{name}-{digest}" / str(seed)


def stage2_run(name: str, stage1: Path, settings: dict, seed: int, args) -> dict:
    """Metrics of one stage-2 run, reused when a finished run has the same resolved config."""
    from train.config import Stage2Config

    s2 = Stage2Config.model_validate(settings).model_dump(mode="json")
    out = stage2_dir(args.out, stage1, name, s2, seed)
    if (out / METRICS).is_file() and not args.rerun:
        return read_metrics(out).model_dump()
    print(f"stage 2: {name} on {stage1} -> {out}", flush=True)
    return run_in_child("stage2", {"stage1": str(stage1), "s2": s2, "out": str(out)}, args.threads)


def fmt(values: list[float], digits: int = 4) -> str:
    """mean ± sample std (0 for one value)."""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {std:.{digits}f}"


def spawned_row(target: Callable, args: tuple, died: dict, poll_s: float = 5.0) -> dict:
    """Run target(queue, *args) in a spawned process and return the row it puts on the queue.
    A process that ends without one (killed for memory, a CUDA abort) gives `died` plus an
    `error` naming its exit code, instead of a wait that never ends."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(queue, *args))
    proc.start()
    row = None
    while row is None:
        try:
            row = queue.get(timeout=poll_s)
        except queue_mod.Empty:
            if not proc.is_alive():
                try:  # it may have put its row just before it ended
                    row = queue.get(timeout=1.0)
                except queue_mod.Empty:
                    proc.join()
                    return died | {"error": f"the measuring process died (exit code "
                                            f"{proc.exitcode})"}
    proc.join()
    return row


def add_common_args(p: argparse.ArgumentParser) -> None:
    """Arguments of the stage-2 tables (bench.peft_table, bench.ablation)."""
    p.add_argument("--backbones", nargs="+", default=["lightgcn_mm", "freedom"])
    p.add_argument("--seeds", nargs="+", type=int, default=[999, 1000, 1001])
    p.add_argument("--epochs", type=int, help="stage-2 epochs (default: the YAML's)")
    p.add_argument("--kt-steps", type=int, help="tuning steps per epoch (default: the YAML's)")
    p.add_argument("--kt-batch", type=int, help="pairs per tuning step (default: the YAML's)")
    p.add_argument("--patience", type=int, help="stage-2 patience (default: the YAML's)")
    p.add_argument("--lr", type=float, help="stage-2 learning rate (default: the YAML's)")
    p.add_argument("--set", action="append", default=[], metavar="a.b=c",
                   help="further stage-2 overrides, e.g. method.n_ctx=4")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads per run")
    p.add_argument("--data", type=Path, default=SHARED_DATA / "ml100k_mm")
    p.add_argument("--stage1-root", type=Path, default=ROOT / "runs" / "bench" / "ml100k",
                   help="stage-1 runs as <root>/<backbone>/<seed> (bench.ml100k_table's)")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / "stage2")
    p.add_argument("--rerun", action="store_true", help="ignore finished stage-2 runs")
