"""Write a sparse copy of a dataset: each user keeps at most N of their training rows.

PTMRec reports its gains on sparse Amazon sets (Baby: about 6 training items per user), whose text
and images are not available offline; ml100k_mm has 85 per user. This derives a Baby-like training
density from ml100k_mm so that stage 2 can be measured where the paper measures it. Validation and
test rows are kept whole, so the evaluation protocol (and what a user is scored on) is unchanged;
only what the models learn from shrinks. `items.tsv` and the posters are copied (about 20 MB), and
the kept rows are a seeded random draw per user (not the latest ones: those would leak the split's
time order into the choice).

Usage:
  .venv/bin/python -m bench.sparse_data --src ../shared/data/ml100k_mm --per-user 6 \
      --out runs/bench/data/ml100k_sparse6
Then point the stage-2 benches at it, e.g.
  .venv/bin/python -m bench.ablation --data runs/bench/data/ml100k_sparse6 \
      --stage1-root runs/bench/ml100k_sparse6 --out runs/bench/stage2_sparse6 ...
"""
from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

import numpy as np

from bench.common import ROOT

from train.data import find_inter_file


def sparse_rows(lines: list[str], per_user: int, seed: int) -> tuple[list[str], dict]:
    """Data lines (header excluded) with each user's x_label-0 rows cut to a random `per_user`;
    the kept lines stay in file order. Returns the lines and counts for the log."""
    header, body = lines[0], lines[1:]
    cols = header.rstrip("\n").split("\t")
    iu, il = cols.index("userID"), cols.index("x_label")
    train_by_user: dict[str, list[int]] = {}
    for n, line in enumerate(body):
        parts = line.rstrip("\n").split("\t")
        if parts[il].strip() == "0":
            train_by_user.setdefault(parts[iu], []).append(n)
    rng = np.random.default_rng(seed)
    dropped = set()
    for user in sorted(train_by_user, key=int):  # a fixed order: the draw depends only on seed
        rows = train_by_user[user]
        if len(rows) > per_user:
            keep = set(rng.choice(len(rows), size=per_user, replace=False).tolist())
            dropped.update(r for k, r in enumerate(rows) if k not in keep)
    kept = [line for n, line in enumerate(body) if n not in dropped]
    n_train = sum(len(r) for r in train_by_user.values())
    stats = {"users": len(train_by_user), "train_before": n_train,
             "train_after": n_train - len(dropped), "rows_after": len(kept)}
    return [header] + kept, stats


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--src", type=Path, default=ROOT.parent / "shared" / "data" / "ml100k_mm")
    p.add_argument("--per-user", type=int, default=6, help="training rows kept per user")
    p.add_argument("--seed", type=int, default=0, help="seed of the per-user draw")
    p.add_argument("--out", type=Path, required=True, help="new dataset directory")
    args = p.parse_args(argv)
    if args.per_user < 1:
        p.error("--per-user must be >= 1")
    inter = find_inter_file(args.src)
    lines = inter.read_text().splitlines(keepends=True)
    if not lines:
        p.error(f"{inter}: empty file")
    kept, stats = sparse_rows(lines, args.per_user, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    target = args.out / f"{args.out.name}.inter"
    tmp = target.with_suffix(".inter.tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, target)
    for name in ("items.tsv", "posters", "i_id_mapping.csv"):  # copies: the loader refuses
        src, dst = args.src / name, args.out / name          # image paths that leave the dir
        if src.is_dir() and not dst.exists():
            shutil.copytree(src, dst)
        elif src.is_file() and not dst.exists():
            shutil.copy2(src, dst)
    print(f"{target}: {stats['users']} users, training rows {stats['train_before']} -> "
          f"{stats['train_after']} ({stats['train_after'] / stats['users']:.1f} per user); "
          f"validation and test rows unchanged")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
