"""Do deletes and overwrites stall reads? DeleteItem / overwriting UpsertItem latency at a large
catalogue, and Recommend p50/p99 from a second client with and without the mutation loop.

One server per source tree (this one, and with `--baseline-src DIR` e.g. `git archive main` with
generated stubs), measured in turn in one run: Recommend alone, then Recommend while a client
process deletes a random bundle item and overwrites another (text-only UpsertItem, overwrite)
in a loop. Each mutation is committed to the server's SQLite event store (fsync) before OK, as
in production. The bundle is reused from `--bundles` (e.g. one written by bench.serve_load's
make_bundle at 1M items); its event store is reset before each server.

    python -m bench.mutation_load --bundles DIR [--seconds 20] [--baseline-src DIR]
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import shutil
import sys
import time
from pathlib import Path

from bench.compare import Server, fmt, recommend_probe, summary
from bench.servers import loadavg


def _mutator(target: str, seconds: float, first_item: int, n_items: int, seed: int, out) -> None:
    """Alternate DeleteItem(random item) and UpsertItem(random item, text, overwrite)."""
    import random

    import grpc

    from serve._gen.ptmrec.v1 import recommender_pb2 as pb
    from serve._gen.ptmrec.v1 import recommender_pb2_grpc as pb_grpc

    rng = random.Random(seed)
    deletes, overwrites, errors = [], [], {}
    with grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
        stub = pb_grpc.RecommenderStub(ch)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            for kind in ("delete", "overwrite"):
                item = first_item + rng.randrange(n_items)
                t = time.perf_counter()
                try:
                    if kind == "delete":
                        stub.DeleteItem(pb.DeleteItemRequest(item_id=item), timeout=30)
                    else:
                        stub.UpsertItem(pb.UpsertItemRequest(item_id=item, text="red round lamp",
                                                             overwrite=True), timeout=30)
                    (deletes if kind == "delete" else overwrites).append(time.perf_counter() - t)
                except grpc.RpcError as err:
                    errors[err.code().name] = errors.get(err.code().name, 0) + 1
    out.put((deletes, overwrites, errors))


def measure(label: str, bundles: Path, args, src: Path | None) -> dict:
    """Recommend alone, then with the mutation loop, on a fresh event store."""
    shutil.rmtree(bundles / ".state", ignore_errors=True)
    server = Server(bundles, src=src)
    try:
        alone = recommend_probe(server.target, args.seconds, args.users)
        ctx = mp.get_context("spawn")
        out = ctx.Queue()
        loop = ctx.Process(target=_mutator, args=(server.target, args.seconds + 4,
                                                  args.first_item, args.items, 0, out))
        loop.start()
        time.sleep(3)
        mixed = recommend_probe(server.target, args.seconds, args.users, seed=1)
        deletes, overwrites, errors = out.get(timeout=args.seconds + 300)
        loop.join(60)
    finally:
        server.stop()
    return dict(label=label, alone=alone, mixed=mixed, delete=summary(deletes),
                overwrite=summary(overwrites), errors=errors)


def main(argv: list[str] | None = None) -> int:
    """Run the comparison and print the table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundles", type=Path, required=True, help="a published bundles dir "
                   "(bench.bundle_factory layout: item ids from 1000)")
    p.add_argument("--items", type=int, default=1_000_000, help="items in the bundle")
    p.add_argument("--first-item", type=int, default=1000)
    p.add_argument("--users", type=int, default=10_000)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--baseline-src", type=Path, help="source tree of the code to compare with")
    args = p.parse_args(argv)
    runs = [("this tree", None)] + ([("baseline", args.baseline_src)] if args.baseline_src else [])
    results = [measure(label, args.bundles, args, src) for label, src in runs]
    shutil.rmtree(args.bundles / ".state", ignore_errors=True)
    print(f"\n{args.items:,} items, {args.seconds:.0f} s per phase; loadavg now {loadavg()}\n")
    print("| server | Recommend alone p50 / p99 / max ms (n) | with mutation loop | p50 ratio | "
          "p99 ratio | DeleteItem p50 / p99 / max ms (n) | overwrite UpsertItem | errors | "
          "loadavg alone, mixed |\n|---|---|---|---|---|---|---|---|---|")
    for r in results:
        a, m = r["alone"], r["mixed"]
        print(f"| {r['label']} | {fmt(a)} | {fmt(m)} | {m['p50'] / a['p50']:.2f} | "
              f"{m['p99'] / a['p99']:.2f} | {fmt(r['delete'])} | {fmt(r['overwrite'])} | "
              f"{r['errors'] or 0} | {a['load']}, {m['load']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
