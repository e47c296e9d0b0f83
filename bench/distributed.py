"""Data-parallel training and feature extraction with 1 vs N ranks (torchrun, gloo on CPU).

    python -m bench.distributed [--ranks 1 2] [--epochs 3] [--threads 1]

- Training: LightGCN (configs/baby/lightgcn.yaml) on Amazon Baby for `--epochs` epochs, the same
  config at every N (the global batch stays the config's); prints seconds per epoch (median of the
  epochs) and the speed-up over 1 rank.
- Extraction: the EfficientNet-Lite0 image features of ml100k_mm's 1,663 posters into a fresh
  cache (`--extract-items` caps the count); prints items/s.
Each rank gets `--threads` torch threads, so N ranks use N x threads cores: on a 2-core machine
2 ranks x 1 thread is the whole machine.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from bench.common import ROOT, SHARED_DATA
from bench.servers import loadavg


def torchrun(ranks: int, args: list[str], threads: int) -> float:
    """Run `torchrun --nproc_per_node ranks ARGS` from the repository root; wall seconds."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc_per_node", str(ranks), *args]
    env = os.environ | {"OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def train_row(ranks: int, tmp: Path, args: argparse.Namespace) -> dict:
    """Seconds per epoch of LightGCN on Baby with `ranks` ranks."""
    out = tmp / f"baby-{ranks}"
    torchrun(ranks, ["-m", "train", "--config", str(ROOT / "configs" / "baby" / "lightgcn.yaml"),
                     "--out", str(out), "--set", f"data.path={args.baby}",
                     "--set", f"optim.epochs={args.epochs}", "--set", f"threads={args.threads}"],
             args.threads)
    metrics = json.loads((out / "metrics.json").read_text())
    return {"epoch_s": statistics.median(metrics["epoch_seconds"]),
            "eval_s": statistics.median(metrics["eval_seconds"]),
            "valid_r20": metrics["valid"]["recall@20"]}


def extract_row(ranks: int, tmp: Path, args: argparse.Namespace) -> dict:
    """Items/s of Lite0 feature extraction of the ml100k posters with `ranks` ranks."""
    config = tmp / f"extract-{ranks}.yaml"
    config.write_text(yaml.safe_dump({
        "data": {"path": str(args.ml100k)}, "threads": args.threads,
        "encoders": {"image": {"name": "timm_cnn", "model": "tf_efficientnet_lite0"},
                     "cache_dir": str(tmp / f"cache-{ranks}")},
        "backbone": {"name": "bpr_mm", "modalities": ["image"]},
        "optim": {"epochs": 1}, "eval": {"ks": [20]}}))
    seconds = torchrun(ranks, ["-m", "train", "--config", str(config), "--out",
                               str(tmp / f"extract-run-{ranks}")], args.threads)
    return {"wall_s": seconds}


def main(argv: list[str] | None = None) -> int:
    """Print the two tables."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--baby", type=Path, default=SHARED_DATA / "amazon_baby")
    p.add_argument("--ml100k", type=Path, default=SHARED_DATA / "ml100k_mm")
    p.add_argument("--skip-extract", action="store_true")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        print(f"load average before: {loadavg()}")
        rows = {n: train_row(n, Path(tmp), args) for n in args.ranks}
        base = rows[args.ranks[0]]["epoch_s"]
        print("| ranks | s/epoch (train) | s/validation | speed-up | valid R@20 |\n|---|---|---|---|---|")
        for n, r in rows.items():
            print(f"| {n} | {r['epoch_s']:.2f} | {r['eval_s']:.2f} | {base / r['epoch_s']:.2f}x "
                  f"| {r['valid_r20']:.4f} |")
        if not args.skip_extract:
            ext = {n: extract_row(n, Path(tmp), args) for n in args.ranks}
            print("\n| ranks | Lite0 extraction + 1 epoch, wall s |\n|---|---|")
            for n, r in ext.items():
                print(f"| {n} | {r['wall_s']:.1f} |")
        print(f"load average after: {loadavg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
