"""Experiments under h2load: Recommend p99 with one bundle vs two, and start / stop / start /
promote while the load runs, with no failed call.

    python -m bench.experiment_load [--items 20000] [--users 2000] [--dim 64] [--seconds 8]
                                    [--conns 4] [--streams 4] [--rounds 3] [--sample-rate 1]

Two synthetic bundles (bench.bundle_factory, Flat index) in one bundles directory; one
`python -m serve` process; h2load posts Recommend for 8 users spread over both arms. Phases 1
and 2, interleaved `--rounds` times: one bundle; an experiment running (50/50, every
impression logged). Phase 3: a longer run
during which `serve.experiment start`, `stop`, `start` and `promote` are run one after the other
(each with --wait). Failures are counted both by h2load and by the server's
`recsys_requests_total{method="Recommend"}` (any code but OK is a failure).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

from bench import procs
from bench.bundle_factory import BundleSpec, write_test_bundle
from bench.h2load import recommend_counts, run_h2load, scrape, write_bodies

ROOT = Path(__file__).resolve().parents[1]


SAMPLE_RATE = {"rate": 1.0}


def write_config(path: Path, name: str) -> Path:
    """A 50/50 experiment of v1 and v2."""
    path.write_text(yaml.safe_dump({"name": name, "salt": f"load-{name}", "arms": [
        {"name": "control", "bundle": "v1", "share": 0.5},
        {"name": "treatment", "bundle": "v2", "share": 0.5}],
        "impressions": {"sample_rate": SAMPLE_RATE["rate"]}}))
    return path


def cli(bundles: Path, target: str, *command: str) -> float:
    """Run one serve.experiment command with --wait; returns its seconds."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "serve.experiment", *command, "--bundles",
                    str(bundles), "--wait", target], cwd=ROOT, check=True, capture_output=True)
    return time.perf_counter() - start


def operations(bundles: Path, target: str, log: list, delay: float) -> None:
    """start, stop, start, promote, spaced by `delay` seconds."""
    steps = [("start", "--config", str(write_config(bundles / "a.yaml", "load-a"))),
             ("stop",),
             ("start", "--config", str(write_config(bundles / "b.yaml", "load-b"))),
             ("promote", "treatment")]
    for step in steps:
        time.sleep(delay)
        log.append((step[0], cli(bundles, target, *step)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.experiment_load",
                                description=__doc__.splitlines()[0])
    p.add_argument("--items", type=int, default=20_000)
    p.add_argument("--users", type=int, default=2_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--conns", type=int, default=4)
    p.add_argument("--streams", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3, help="one/two-bundle rounds, interleaved")
    p.add_argument("--sample-rate", type=float, default=1.0, help="impressions logged")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / "experiment_load")
    args = p.parse_args(argv)
    args.h2load_warmup = 1.0
    SAMPLE_RATE["rate"] = args.sample_rate
    bundles = args.out / "bundles"
    subprocess.run(["rm", "-rf", str(bundles)], check=True)
    for seed, publish in ((0, True), (1, False)):
        write_test_bundle(bundles, BundleSpec(n_users=args.users, n_items=args.items,
                                              dim=args.dim, seed=seed, encoders=False),
                          publish=publish)
    spec = BundleSpec(n_users=args.users)
    bodies = write_bodies(args.out / "bodies", spec, 10, 8)
    proc, port, metrics_port = procs.start_server(bundles, "--poll-seconds", "0.2")
    target = f"127.0.0.1:{port}"
    rows = []
    try:
        with procs.client(port) as c:
            procs.wait_serving(c, proc)
        args.h2load_seconds = args.seconds
        for round_ in range(1, args.rounds + 1):  # interleaved: the machine's load drifts
            rows.append((f"one bundle, round {round_}",
                         run_h2load(target, bodies, args.conns, args.streams, args)))
            cli(bundles, target, "start", "--config",
                str(write_config(bundles / "w.yaml", f"warm{round_}")))
            rows.append((f"two bundles (experiment), round {round_}",
                         run_h2load(target, bodies, args.conns, args.streams, args)))
            cli(bundles, target, "stop")
        ops: list = []
        worker = threading.Thread(target=operations, args=(bundles, target, ops, 1.5))
        args.h2load_seconds = args.seconds * 2.5
        worker.start()
        rows.append(("start, stop, start, promote",
                     run_h2load(target, bodies, args.conns, args.streams, args)))
        worker.join()
        codes = recommend_counts(scrape(metrics_port))
    finally:
        procs.stop(proc)
    print(f"{args.items} items x {args.dim}, {args.users} users, Flat; h2load -c {args.conns} "
          f"-m {args.streams}, 8 user bodies, impression sample rate {args.sample_rate:g}\n")
    print("| phase | req/s | p50 ms | p99 ms | failed (h2load) |")
    print("|---|---|---|---|---|")
    for name, r in rows:
        print(f"| {name} | {r['rps']:.0f} | {r['p50']:.2f} | {r['p99']:.2f} | {r['failed']} |")
    for label in ("one bundle", "two bundles"):
        p99 = sorted(r["p99"] for n, r in rows if n.startswith(label))
        rps = sorted(r["rps"] for n, r in rows if n.startswith(label))
        print(f"median of the rounds, {label}: p99 {p99[len(p99) // 2]:.2f} ms, "
              f"{rps[len(rps) // 2]:.0f} req/s")
    print(f"\noperations during the last phase (seconds, each until the server reported it): "
          + ", ".join(f"{n} {s:.2f}" for n, s in ops))
    print(f"server's Recommend counts by code: {codes}")
    bad = sum(v for k, v in codes.items() if k != "OK") + sum(r["failed"] for _, r in rows)
    print("0 failed calls" if bad == 0 else f"{bad:.0f} FAILED calls")
    return 0 if bad == 0 and len(ops) == 4 else 1


if __name__ == "__main__":
    sys.exit(main())
