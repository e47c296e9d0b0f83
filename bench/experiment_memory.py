"""Memory of an experiment: server RSS with one 1M-item bundle, then with two (an experiment),
against the estimate `serve.experiment_config.bundle_bytes` makes from the manifests.

    python -m bench.experiment_memory [--items 1000000] [--users 100000] [--dim 64]

Two synthetic bundles without encoders (Flat index, inner product); one `python -m serve`; RSS
and peak RSS (VmRSS, VmHWM from /proc) after the first bundle is served, then after
`serve.experiment start` (control = the live v1, shared; treatment = v2, loaded).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import yaml

from bench import procs
from bench.bundle_factory import BundleSpec, write_test_bundle
from serve.arms import read_manifest
from serve.experiment_config import bundle_bytes

ROOT = Path(__file__).resolve().parents[1]
MIB = 2 ** 20


def rss(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of a process in MiB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text()
                  .splitlines() if ":" in line)
    return tuple(int(fields[k].split()[0]) / 1024 for k in ("VmRSS", "VmHWM"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.experiment_memory",
                                description=__doc__.splitlines()[0])
    p.add_argument("--items", type=int, default=1_000_000)
    p.add_argument("--users", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / "experiment_memory")
    args = p.parse_args(argv)
    bundles = args.out / "bundles"
    subprocess.run(["rm", "-rf", str(bundles)], check=True)
    start = time.perf_counter()
    for seed, publish in ((0, True), (1, False)):
        write_test_bundle(bundles, BundleSpec(n_users=args.users, n_items=args.items,
                                              dim=args.dim, seed=seed, encoders=False),
                          publish=publish)
    print(f"two bundles written in {time.perf_counter() - start:.0f} s")
    config = bundles / "exp.yaml"
    config.write_text(yaml.safe_dump({"name": "mem", "salt": "memory-1", "arms": [
        {"name": "control", "bundle": "v1", "share": 0.5},
        {"name": "treatment", "bundle": "v2", "share": 0.5}]}))
    proc, port, _ = procs.start_server(bundles, "--poll-seconds", "0.5")
    try:
        with procs.client(port) as c:
            procs.wait_serving(c, proc, timeout=600)
            base = rss(proc.pid)
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "serve.experiment", "start", "--bundles",
                            str(bundles), "--config", str(config), "--wait", f"127.0.0.1:{port}"],
                           cwd=ROOT, check=True)
            took = time.perf_counter() - t0
            both = rss(proc.pid)
            assert {c.recommend(u * 10, 10).model_version for u in range(20)} == {1, 2}
    finally:
        procs.stop(proc)
    manifest = read_manifest(bundles / "v2")
    files = sum(f.bytes for f in manifest.files.values()) / MIB
    print(f"{args.items:,} items x {args.dim}, {args.users:,} users, Flat, no encoders: bundle "
          f"files {files:.0f} MiB, estimate {bundle_bytes(manifest) / MIB:.0f} MiB per bundle")
    print("| server | RSS MiB | peak RSS MiB |\n|---|---|---|")
    print(f"| one bundle | {base[0]:.0f} | {base[1]:.0f} |")
    print(f"| two bundles (experiment) | {both[0]:.0f} | {both[1]:.0f} |")
    print(f"second bundle: +{both[0] - base[0]:.0f} MiB RSS; experiment taken up in {took:.1f} s "
          f"(verify, load, smoke, replay)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
