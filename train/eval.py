"""`python -m train.eval RUN [--split test] [--ks 10 20 50] [--batch-size 4096] [--json OUT]`:
full-ranking Recall/NDCG of a finished run at its best weights (stage 1, stage 2 or a distilled
student), MMRec's protocol as in training.

Under `torchrun --nproc_per_node N -m train.eval RUN ...` each rank ranks every N-th batch of
users and the figures are exactly the single-process ones (train/distributed.py).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from train import distributed
from train.cli import EXIT_CONFIG, setup_logging
from train.evaluate import Evaluator
from train.fit import evaluate_model
from train.run import BEST, Run, load_run, run_device
from train.tuning import set_feature_tables


def evaluate_run(run: Run, split: str, ks: list[int], batch_size: int) -> dict[str, float]:
    """Recall/NDCG@ks of a loaded run on a split (tuned features written into the backbone)."""
    set_feature_tables(run.model, run.features)
    return evaluate_model(run.model, Evaluator(run.train, split, ks, batch_size))


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    setup_logging()
    p = argparse.ArgumentParser(prog="python -m train.eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path, help="a finished run directory")
    p.add_argument("--split", choices=["valid", "test"], default="test")
    p.add_argument("--ks", type=int, nargs="+", default=[10, 20, 50])
    p.add_argument("--batch-size", type=int, default=4096, help="users per evaluation batch")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = p.parse_args(argv)
    if not (args.run / BEST).is_file():
        print(f"error: {args.run}: no best.pt; is it a finished run?", file=sys.stderr)
        return EXIT_CONFIG
    device = distributed.init(run_device(args.run))
    main_rank = distributed.is_main()
    try:
        with torch.no_grad():
            figures = evaluate_run(load_run(args.run, device), args.split, args.ks,
                                   args.batch_size)
    finally:
        distributed.shutdown()
    if main_rank:
        text = json.dumps(figures, indent=2)
        if args.json is not None:
            args.json.write_text(text + "\n", encoding="utf-8")
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
