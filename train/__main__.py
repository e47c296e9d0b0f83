"""`python -m train --config PATH [--set a.b=c ...] [--out RUN_DIR] [--resume]`."""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch
from pydantic import ValidationError

from train.config import load_config
from train.data import DatasetError
from train.stage1 import metrics_table, run_stage1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line arguments of the stage-1 trainer."""
    p = argparse.ArgumentParser(prog="python -m train", description=__doc__)
    p.add_argument("--config", type=Path, required=True, help="YAML run config")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="a.b=c",
                   help="override one config key (repeatable)")
    p.add_argument("--out", type=Path, default=None, help="run directory (default runs/<stem>)")
    p.add_argument("--resume", action="store_true", help="continue from RUN_DIR/checkpoint.pt")
    return p.parse_args(argv)


def pick_device(name: str) -> torch.device:
    """Resolve the configured device; 'auto' takes CUDA when present."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("config asks for device cuda but no CUDA device is available")
    return torch.device(name)


def run_device(run_dir: Path) -> torch.device:
    """The device a finished run's config asks for (`device:`; 'auto' when it has no config)."""
    path = run_dir / "config.yaml"
    return pick_device(load_config(path).device if path.is_file() else "auto")


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except (ValidationError, ValueError, OSError) as e:
        print(f"error: invalid config {args.config}:\n{e}", file=sys.stderr)
        return 2
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    run_dir = args.out or Path("runs") / args.config.stem
    start = time.perf_counter()
    try:
        metrics = run_stage1(cfg, run_dir, pick_device(cfg.device), args.resume)
    except DatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"\n{cfg.backbone.name} on {cfg.data.path} — best valid epoch {metrics['best_epoch']}"
          f" of {metrics['epochs_run']}, {time.perf_counter() - start:.1f} s; run dir {run_dir}\n")
    print(metrics_table(metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
