"""Test Recall/NDCG@10/20 (mean ± std over seeds) of the checked-in ml100k configs.

Usage: .venv/bin/python -m bench.ml100k_table [--configs bpr lightgcn ...] [--seeds 999 1000 1001]
       [--set optim.epochs=20 ...] (overrides for every config, e.g. a CPU epoch budget)
Reads ../shared/data/ml100k_mm (override with --data); results per run under --out. Stage 1 stops
under MMRec's rule (`eval.protocol=mmrec`), as the peers it is compared with.
"""
from __future__ import annotations

import argparse
import logging
import statistics
import time
from pathlib import Path

import torch

from bench.common import MMREC_RULE, ROOT, SHARED_DATA
from train.run import METRICS, read_metrics, write_metrics

from bench.common import fmt
from train.config import load_config
from train.stage1 import run_stage1

CONFIGS = ["bpr", "lightgcn", "bpr_mm", "lightgcn_mm", "vbpr", "freedom", "mgcn", "smore"]
KEYS = ["recall@10", "recall@20", "ndcg@10", "ndcg@20"]


def run_one(name: str, seed: int, args) -> dict:
    """Train one config with one seed (reusing a finished run directory)."""
    out = args.out / name / str(seed)
    if (out / METRICS).is_file() and not args.rerun:
        return read_metrics(out).model_dump()
    overrides = [MMREC_RULE, f"seed={seed}", f"data.path={args.data}"]
    overrides += [f"threads={args.threads}"] if args.threads else []
    overrides += args.overrides
    cfg = load_config(ROOT / "configs" / "ml100k" / f"{name}.yaml", overrides)
    start = time.perf_counter()
    metrics = run_stage1(cfg, out, torch.device("cpu"))
    metrics["wall_seconds"] = time.perf_counter() - start
    write_metrics(out, metrics)
    return metrics


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--configs", nargs="+", default=CONFIGS)
    p.add_argument("--seeds", nargs="+", type=int, default=[999, 1000, 1001])
    p.add_argument("--data", type=Path, default=SHARED_DATA / "ml100k_mm")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / "ml100k")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--rerun", action="store_true", help="ignore finished runs")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="a.b=c",
                   help="override for every config (use a separate --out per setting)")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    rows = []
    for name in args.configs:
        runs = [run_one(name, seed, args) for seed in args.seeds]
        cells = [fmt([r["test"][k] for r in runs]) for k in KEYS]
        valid = fmt([r["valid"]["recall@20"] for r in runs])
        epoch_s = statistics.median(s for r in runs for s in r["epoch_seconds"])
        rows.append(f"| {name} | {valid} | " + " | ".join(cells) +
                    f" | {statistics.mean(r['best_epoch'] for r in runs):.0f} | {epoch_s:.2f} |")
        print(rows[-1], flush=True)
    print(f"\nml100k_mm, seeds {args.seeds}, test figures at the best validation epoch\n")
    print("| config | valid R@20 | test R@10 | test R@20 | test N@10 | test N@20 | best epoch "
          "| s/epoch |")
    print("|---" * 8 + "|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
