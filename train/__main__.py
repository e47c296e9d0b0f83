"""`python -m train --config PATH [--set a.b=c ...] [--out RUN_DIR] [--resume]`.

Data-parallel on N processes: `torchrun --nproc_per_node N -m train ... --resume` (see
train/distributed.py; `--resume` lets torchrun's `--max-restarts` continue from the checkpoint).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from train import distributed
from train.cli import EXIT_CONFIG, load_or_report, parser, setup_logging
from train.config import load_config
from train.data import DatasetError
from train.run import pick_device
from train.stage1 import metrics_table, run_stage1


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    setup_logging()
    p = parser("python -m train", __doc__)
    p.add_argument("--out", type=Path, default=None, help="run directory (default runs/<stem>)")
    p.add_argument("--resume", action="store_true", help="continue from RUN_DIR/checkpoint.pt")
    args = p.parse_args(argv)
    cfg = load_or_report(load_config, args.config, args.overrides)
    if cfg is None:
        return EXIT_CONFIG
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    run_dir = args.out or Path("runs") / args.config.stem
    start = time.perf_counter()
    device = distributed.init(pick_device(cfg.device))
    main_rank = distributed.is_main()
    try:
        metrics = run_stage1(cfg, run_dir, device, args.resume)
    except DatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    finally:
        distributed.shutdown()
    if not main_rank:
        return 0
    print(f"\n{cfg.backbone.name} on {cfg.data.path} — best valid epoch {metrics['best_epoch']}"
          f" of {metrics['epochs_run']}, {time.perf_counter() - start:.1f} s; run dir {run_dir}\n")
    print(metrics_table(metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
