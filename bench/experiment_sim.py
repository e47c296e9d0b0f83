"""Simulated online experiment on ml100k_mm: two real bundles of different quality in one server,
users split by the experiment, each user's held-out test items replayed as clicks.

    python -m bench.experiment_sim [--control RUN] [--treatment RUN] [--k 20] [--share 0.5]
                                   [--store sqlite|postgresql] [--out runs/bench/experiment/sim]

Both runs are exported into one bundles directory (control published as CURRENT, treatment
beside it), `python -m serve` serves them, `serve.experiment start` splits the users, and every
test user of the dataset asks Recommend(k) once; the simulated user clicks each shown item that
is one of their test items (RecordInteractions, kind "click"). The readout
(`serve.experiment status`) must rank the arms as offline test Recall@k does. Also printed: how
many users per arm a test at p < 0.05 needs for 80% power, found by resampling the observed
per-user outcomes (each size 400 times) and running the readout's own test.

Defaults train nothing: they expect the two runs of docs/experiments.md (`python -m train` on
configs/ml100k/lightgcn.yaml and configs/ml100k/bpr.yaml with optim.epochs=4).
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bench import procs
from serve.experiment_config import parse_config, write_live
from serve.readout import table, two_proportion_p

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "ml100k_mm" / "ml100k.inter"


def export(run: Path, bundles: Path, publish: bool) -> str:
    """Export a run into bundles; returns the version directory name."""
    cmd = [sys.executable, "-m", "export", "--run", str(run), "--bundles", str(bundles)]
    out = subprocess.run(cmd + (["--publish"] if publish else []), cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout
    return next(w for w in out.split() if w.startswith("v") and w[1:].isdigit())


def held_out_items(path: Path) -> dict[int, set[int]]:
    """{user: test items} of an MMRec .inter file (x_label 2)."""
    rows = np.loadtxt(path, delimiter="\t", skiprows=1, usecols=(0, 1, 4), dtype=np.int64)
    out: dict[int, set[int]] = {}
    for user, item, label in rows.tolist():
        if label == 2:
            out.setdefault(user, set()).add(item)
    return out


def simulate(port: int, held_out: dict[int, set[int]], k: int) -> dict:
    """One Recommend per user; clicks on shown test items; returns counts per arm."""
    counts: dict[str, list[int]] = {}
    with procs.client(port) as c:
        for user, items in sorted(held_out.items()):
            resp = c.recommend(user, k)
            clicked = [i.item_id for i in resp.items if i.item_id in items]
            if clicked:
                c.record(user, clicked, kind="click")
            counts.setdefault(resp.arm, []).append(1 if clicked else 0)
    return counts


def users_needed(a: list[int], b: list[int], power: float = 0.8, reps: int = 400,
                 seed: int = 0) -> int | None:
    """Smallest users per arm (on a 1.25x grid) at which resampled data reach p < 0.05 in at
    least `power` of the draws."""
    rng = np.random.default_rng(seed)
    a_arr, b_arr = np.array(a), np.array(b)
    n = 20
    while n <= 200_000:
        hits = 0
        for _ in range(reps):
            ka, kb = int(rng.choice(a_arr, n).sum()), int(rng.choice(b_arr, n).sum())
            hits += two_proportion_p(ka, n, kb, n) < 0.05
        if hits / reps >= power:
            return n
        n = int(n * 1.25) + 1
    return None


def offline_recall(bundle: Path, k: int) -> float:
    """test.recall@k from a bundle's manifest."""
    return json.loads((bundle / "manifest.json").read_text())["metrics"][f"test.recall@{k}"]


def store_option(kind: str) -> tuple[list[str], object]:
    """Server options for the store, and a cluster to remove afterwards (PostgreSQL)."""
    if kind == "sqlite":
        return [], None
    from bench.pgcluster import cluster_or_reason

    cluster, why = cluster_or_reason()
    if cluster is None:
        raise SystemExit(f"no PostgreSQL: {why}")
    return ["--store", cluster.new_store_url()], cluster


def run(args) -> dict:
    """Export, serve, split, simulate, read out."""
    bundles = args.out / "bundles"
    shutil.rmtree(bundles, ignore_errors=True)
    control = export(args.control, bundles, publish=True)
    treatment = export(args.treatment, bundles, publish=False)
    cfg = parse_config({"name": "sim", "salt": "bench-sim-1", "arms": [
        {"name": "control", "bundle": control, "share": 1 - args.share},
        {"name": "treatment", "bundle": treatment, "share": args.share}],
        "impressions": {"flush_seconds": 0.2}, "attribution": {"ks": [1, 5, 10, args.k]}})
    options, cluster = store_option(args.store)
    proc, port, _ = procs.start_server(bundles, "--poll-seconds", "0.2", *options)
    try:
        with procs.client(port) as c:
            procs.wait_serving(c, proc)
            write_live(bundles, cfg)
            while c.info().experiment != "sim":
                time.sleep(0.1)
        start = time.perf_counter()
        counts = simulate(port, held_out_items(DATA), args.k)
        elapsed = time.perf_counter() - start
        time.sleep(1.0)  # let the impression log flush
        status = subprocess.run(
            [sys.executable, "-m", "serve.experiment", "status", "--bundles", str(bundles),
             "--json", *(options or [])], cwd=ROOT, check=True, capture_output=True, text=True)
    finally:
        procs.stop(proc)
        if cluster is not None:
            cluster.remove()
    result = json.loads(status.stdout)
    result["offline"] = {control: offline_recall(bundles / control, args.k),
                         treatment: offline_recall(bundles / treatment, args.k)}
    result["users_needed"] = users_needed(counts["control"], counts["treatment"])
    result["seconds"] = elapsed
    return result


def report(result: dict, k: int) -> None:
    """Print the readout, the offline figures and the verdict."""
    arms = result["arms"]
    for a in arms:
        for key in ("hit_at", "hit_ci"):
            a[key] = {int(x): v for x, v in a[key].items()}
    print(table(result))
    print(f"\n| arm | bundle | offline test Recall@{k} | online CTR (hit@{k}) [95% CI] |")
    print("|---|---|---|---|")
    for a in arms:
        print(f"| {a['arm']} | {a['bundle']} | {result['offline'][a['bundle']]:.4f} | "
              f"{a['ctr']:.4f} [{a['ctr_ci'][0]:.4f}, {a['ctr_ci'][1]:.4f}] |")
    online = [a["bundle"] for a in sorted(arms, key=lambda a: -a["ctr"])]
    offline = sorted(result["offline"], key=lambda b: -result["offline"][b])
    print(f"\nranking online {online}, offline {offline}: "
          f"{'the same' if online == offline else 'DIFFERENT'}")
    print(f"users per arm for p < 0.05 at 80% power (resampled): {result['users_needed']}")
    print(f"{sum(a['impressions'] for a in arms)} users simulated in {result['seconds']:.1f} s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.experiment_sim",
                                description=__doc__.splitlines()[0])
    runs = ROOT / "runs" / "bench" / "experiment"
    p.add_argument("--control", type=Path, default=runs / "bpr_weak")
    p.add_argument("--treatment", type=Path, default=runs / "lightgcn")
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--share", type=float, default=0.5, help="treatment share")
    p.add_argument("--store", choices=("sqlite", "postgresql"), default="sqlite")
    p.add_argument("--out", type=Path, default=runs / "sim")
    args = p.parse_args(argv)
    report(run(args), args.k)
    return 0


if __name__ == "__main__":
    sys.exit(main())
