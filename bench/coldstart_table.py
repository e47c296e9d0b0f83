"""Cold-item Recall/NDCG@20 of the content heads vs random and content-kNN (mean ± std over seeds).

Usage: .venv/bin/python -m bench.coldstart_table [--datasets ml100k syn2k] [--seeds ...] [--threads 1]
- ml100k: `configs/ml100k/coldstart.yaml` on ../shared/data/ml100k_mm (override with --data);
- ml100k_image: `configs/ml100k/coldstart_image.yaml` (poster only, EfficientNet-Lite0) on the same.
- syn2k: a 2,000-user x 1,000-item synthetic catalogue (`train.synthetic`, seed 11) with
  `configs/demo.yaml` and MMRec's patience 20 (the demo's 10 is for a 3-minute demo).
Stage 1 stops under MMRec's rule (`eval.protocol=mmrec`). Finished runs under --out are reused
(--rerun ignores them).
"""
from __future__ import annotations

import argparse
import logging
import statistics
from pathlib import Path

import torch

from bench.common import MMREC_RULE, ROOT, SHARED_DATA
from train.run import METRICS, read_metrics

from bench.common import fmt
from train.config import load_config
from train.stage1 import run_stage1
from train.synthetic import generate

SEEDS = {"ml100k": [999, 1000, 1001], "ml100k_image": [999, 1000, 1001], "syn2k": [7, 8, 9]}
RANKERS = ["heads", "random", "content_knn"]


def run_one(dataset: str, seed: int, args) -> dict:
    """Train one seed of one dataset's cold-start config (reusing a finished run)."""
    out = args.out / dataset / str(seed)
    if (out / METRICS).is_file() and not args.rerun:
        return read_metrics(out).model_dump()
    overrides = [MMREC_RULE, f"seed={seed}"] + ([f"threads={args.threads}"] if args.threads
                                                else [])
    overrides += args.overrides
    if dataset.startswith("ml100k"):
        config = ROOT / "configs" / "ml100k" / f"{dataset.replace('ml100k', 'coldstart')}.yaml"
        overrides.append(f"data.path={args.data}")
    else:
        data = args.out / "syn2k_data"
        if not (data / "items.tsv").is_file():
            generate(data, n_users=2000, n_items=1000, seed=11)
        config = ROOT / "configs" / "demo.yaml"
        overrides += [f"data.path={data}", f"encoders.cache_dir={args.out / 'syn2k_cache'}",
                      "eval.patience=20"]
    return run_stage1(load_config(config, overrides), out, torch.device("cpu"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--datasets", nargs="+", choices=sorted(SEEDS), default=sorted(SEEDS))
    p.add_argument("--seeds", nargs="+", type=int, help="default: 999 1000 1001 / 7 8 9")
    p.add_argument("--data", type=Path, default=SHARED_DATA / "ml100k_mm")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / "coldstart")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--rerun", action="store_true", help="ignore finished runs")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="a.b=c",
                   help="override for every run (use a separate --out per setting)")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    print("| dataset | ranker | cold R@20 | cold N@20 | R@20 / random |")
    print("|---" * 5 + "|")
    for dataset in args.datasets:
        runs = [run_one(dataset, s, args)["cold_start"] for s in args.seeds or SEEDS[dataset]]
        chance = statistics.mean(r["random"]["recall@20"] for r in runs)
        for ranker in RANKERS:
            recall = [r[ranker]["recall@20"] for r in runs]
            print(f"| {dataset} | {ranker} | {fmt(recall)} | "
                  f"{fmt([r[ranker]['ndcg@20'] for r in runs])} | "
                  f"{statistics.mean(recall) / chance:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
