"""PTMRec Table 2 on ml100k_mm: frozen encoders vs prompt / LoRA / (IA)^3 tuning of the text tower.

Per backbone and method: test Recall@20 (mean ± std over seeds, at the best VALIDATION epoch),
trainable encoder parameters and their share of the tuned tower(s), seconds per epoch (training
alone, and with the re-encoding of every item that precedes each validation) and peak memory
(peak RSS of the run's process on CPU; peak allocated GPU memory on CUDA). "frozen" is the
stage-1 run itself (bench/ml100k_table.py layout, reused when finished).

Usage (CPU-feasible caps):
  .venv/bin/python bench/peft_table.py --backbones lightgcn_mm --seeds 999 --epochs 2 --kt-steps 4
Stage-1 runs live under --stage1-root/<backbone>/<seed>; stage-2 runs under
--out/<backbone>/<method>-<hash of the stage-2 config and stage-1 root>/<seed>; finished runs with
the same config are reused.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import multiprocessing as mp
import statistics
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

STAGE2_CONFIGS = ROOT / "configs" / "ml100k" / "stage2"
METHODS = ["frozen", "prompt", "lora", "ia3"]


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
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")


def run_in_child(kind: str, payload: dict, threads: int | None) -> dict:
    """Run `_child` in a fresh (spawned) process and return the metrics it wrote."""
    proc = mp.get_context("spawn").Process(target=_child, args=(kind, payload, threads))
    proc.start()
    proc.join()
    if proc.exitcode != 0:
        raise RuntimeError(f"{kind} run {payload['out']} failed (exit code {proc.exitcode})")
    return json.loads((Path(payload["out"]) / "metrics.json").read_text())


def stage1_run(backbone: str, seed: int, args) -> Path:
    """The finished stage-1 run of a ml100k config and seed (trained here when missing)."""
    out = args.stage1_root / backbone / str(seed)
    if not (out / "metrics.json").is_file():
        overrides = [f"seed={seed}", f"data.path={args.data}"]
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
    hash covers the top-level settings that differ from Stage2Config's defaults, so a new option
    whose default keeps the old behaviour does not orphan finished runs."""
    from train.config import Stage2Config

    defaults = Stage2Config().model_dump(mode="json")
    changed = {k: v for k, v in s2.items() if k not in defaults or defaults[k] != v}
    if changed.get("init_from"):  # <root>/<backbone>/<name>-<hash>/<seed>: the seed varies
        changed["init_from"] = Path(changed["init_from"]).parent.name
    key = json.dumps({"stage2": changed, "stage1_root": str(stage1.resolve().parents[1])},
                     sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:8]
    return root / stage1.parent.name / f"{name}-{digest}" / str(seed)


def stage2_run(name: str, stage1: Path, settings: dict, seed: int, args) -> dict:
    """Metrics of one stage-2 run, reused when a finished run has the same resolved config."""
    from train.config import Stage2Config

    s2 = Stage2Config.model_validate(settings).model_dump(mode="json")
    out = stage2_dir(args.out, stage1, name, s2, seed)
    done = out / "metrics.json"
    if done.is_file() and not args.rerun:
        return json.loads(done.read_text())
    print(f"stage 2: {name} on {stage1} -> {out}", flush=True)
    return run_in_child("stage2", {"stage1": str(stage1), "s2": s2, "out": str(out)}, args.threads)


def fmt(values: list[float], digits: int = 4) -> str:
    """mean ± sample std (0 for one value)."""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {std:.{digits}f}"


def median_of(runs: list[dict], key: str) -> float | None:
    """Median over all runs of a per-epoch list in their metrics (None when absent)."""
    values = [v for r in runs for v in r.get(key, [])]
    return statistics.median(values) if values else None


def _cell(value: float | None, spec: str) -> str:
    """A number, or n/a."""
    return "n/a" if value is None else format(value, spec)


def method_row(backbone: str, method: str, runs: list[dict]) -> str:
    """One markdown row of the Table-2 layout."""
    test = fmt([r["test"]["recall@20"] for r in runs])
    valid = fmt([r["valid"]["recall@20"] for r in runs])
    memory = [r["peak_memory_mib"] for r in runs if "peak_memory_mib" in r]
    if method == "frozen":
        params, share = "0", "0"
        train_s, epoch_s = median_of(runs, "epoch_seconds"), None
    else:
        trainable = runs[0]["trainable_encoder_params"]
        own = runs[0]["encoder_params"] - trainable  # the tower's own parameters (method added)
        params, share = f"{trainable:,}", f"{trainable / own:.3%} of {own / 1e6:.1f}M"
        train_s, epoch_s = median_of(runs, "train_seconds"), median_of(runs, "epoch_seconds")
    return (f"| {backbone} | {method} | {test} | {valid} | {params} | {share} | "
            f"{_cell(train_s, '.1f')} | {_cell(epoch_s, '.1f')} | "
            f"{_cell(max(memory) if memory else None, ',.0f')} |")


HEADER = ("| backbone | method | test R@20 | valid R@20 | trainable encoder params | share of the "
          "tuned tower | train s/epoch | s/epoch incl. re-encoding | peak memory MiB |\n"
          + "|---" * 9 + "|")


def add_common_args(p: argparse.ArgumentParser) -> None:
    """Arguments shared with bench/ablation.py."""
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
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "ml100k_mm")
    p.add_argument("--stage1-root", type=Path, default=ROOT / "runs" / "bench" / "ml100k",
                   help="stage-1 runs as <root>/<backbone>/<seed> (bench/ml100k_table.py's)")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / "stage2")
    p.add_argument("--rerun", action="store_true", help="ignore finished stage-2 runs")


def main(argv: list[str] | None = None) -> int:
    """Run (or reuse) every backbone x method x seed and print the table."""
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    args = p.parse_args(argv)
    rows = []
    for backbone in args.backbones:
        stage1 = {seed: stage1_run(backbone, seed, args) for seed in args.seeds}
        for method in args.methods:
            if method == "frozen":
                runs = [json.loads((stage1[s] / "metrics.json").read_text()) for s in args.seeds]
            else:
                settings = stage2_settings(method, args)
                runs = [stage2_run(method, stage1[s], settings, s, args) for s in args.seeds]
            rows.append(method_row(backbone, method, runs))
            print(rows[-1], flush=True)
    print(f"\nml100k_mm, seeds {args.seeds}; test at the best validation epoch; stage-2 caps: "
          f"epochs {args.epochs}, kt steps {args.kt_steps}, kt batch {args.kt_batch}\n")
    print(HEADER)
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
