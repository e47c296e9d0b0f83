"""Does an EncodeItem flood starve Recommend? Recommend p50/p99 from a sequential client with and
without 8 clients sending the worst images in a loop, server peak RSS, the flood's statuses.

The worst images (issue 20): a 7,000 x 7,000 PNG of ~160 KB (49 Mpx, under the 50 Mpx limit),
a 1 x 100,000 PNG and a 1 x 1,000,000 PNG. Each server (this tree, and with `--baseline-src DIR`
another source tree, e.g. `git archive main` with generated stubs) is measured in turn in one run:
Recommend alone, then Recommend under the flood. Also prints the single-call status and time of
each image, and how close the bounded decode (JPEG draft / reduce) stays to the full one.

    python -m bench.encode_isolation [--bundles DIR] [--seconds 20] [--baseline-src DIR]
"""
from __future__ import annotations

import argparse
import io
import multiprocessing as mp
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from bench.compare import RssSampler, Server, fmt, recommend_probe, summary
from bench.servers import loadavg


def worst_images() -> dict[str, bytes]:
    """The degenerate images of issue 20, as PNG bytes."""
    def png(img: Image.Image) -> bytes:
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        return buf.getvalue()
    return {"7000x7000 PNG (49 Mpx)": png(Image.new("RGB", (7000, 7000), (200, 10, 10))),
            "1x100,000 PNG": png(Image.new("L", (1, 100_000))),
            "1x1,000,000 PNG": png(Image.new("L", (1, 1_000_000)))}


def _flooder(target: str, clients: int, seconds: float, out) -> None:
    """`clients` threads sending the worst images round-robin as EncodeItem for `seconds`."""
    from concurrent.futures import ThreadPoolExecutor

    import grpc

    from serve._gen.ptmrec.v1 import recommender_pb2 as pb
    from serve._gen.ptmrec.v1 import recommender_pb2_grpc as pb_grpc

    images = list(worst_images().values())
    end = time.monotonic() + seconds

    def loop(i: int) -> tuple[Counter, list[float]]:
        codes, lat = Counter(), []
        with grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
            stub = pb_grpc.RecommenderStub(ch)
            n = i
            while time.monotonic() < end:
                t = time.perf_counter()
                try:
                    stub.EncodeItem(pb.EncodeItemRequest(image=images[n % len(images)]),
                                    timeout=120)
                    codes["OK"] += 1
                except grpc.RpcError as err:
                    codes[err.code().name] += 1
                lat.append(time.perf_counter() - t)
                n += 1
        return codes, lat

    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(loop, range(clients)))
    codes = sum((r[0] for r in results), Counter())
    out.put((dict(codes), [x for r in results for x in r[1]]))


def single_calls(target: str) -> list[tuple[str, str, float]]:
    """Each worst image once, alone: (name, status, seconds)."""
    import grpc

    from serve.client import RecommenderClient
    from serve._gen.ptmrec.v1 import recommender_pb2 as pb

    rows = []
    with RecommenderClient(target, timeout=120) as client:
        for name, data in worst_images().items():
            t = time.perf_counter()
            try:
                client.stub.EncodeItem(pb.EncodeItemRequest(image=data), timeout=120)
                code = "OK"
            except grpc.RpcError as err:
                code = err.code().name
            rows.append((name, code, time.perf_counter() - t))
    return rows


def measure(label: str, bundles: Path, args, src: Path | None, options: tuple = ()) -> dict:
    """Recommend alone, then under the flood, on one server."""
    server = Server(bundles, *options, src=src)
    try:
        singles = single_calls(server.target)
        alone = recommend_probe(server.target, args.seconds, args.users)
        rss0 = server.rss_mib()
        ctx = mp.get_context("spawn")
        out = ctx.Queue()
        flood = ctx.Process(target=_flooder, args=(server.target, args.flooders,
                                                   args.seconds + 4, out))
        sampler = RssSampler(server)
        flood.start()
        time.sleep(3)
        under = recommend_probe(server.target, args.seconds, args.users, seed=1)
        codes, lat = out.get(timeout=args.seconds + 600)
        flood.join(60)
        peak = sampler.stop()
        alive = server.proc.poll() is None
    finally:
        server.stop()
    return dict(label=label, singles=singles, alone=alone, under=under, codes=codes,
                encode=summary(lat), rss0=rss0, peak=peak, alive=alive)


def decode_closeness() -> str:
    """Cosine and max |diff| of the bounded decode vs the full one on a smooth 3000x2000 image."""
    from index import preprocess as sp

    spec = sp.ImageSpec(size=(224, 224), mean=(0.5,) * 3, std=(0.5,) * 3)
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)).resize(
        (3000, 2000), Image.Resampling.BICUBIC)
    parts = []
    for fmt_ in ("JPEG", "PNG"):
        buf = io.BytesIO()
        img.save(buf, format=fmt_)
        data = buf.getvalue()
        t = time.perf_counter()
        full = sp.transform(sp.decode(data), spec)
        t_full = time.perf_counter() - t
        t = time.perf_counter()
        fast = sp.preprocess(data, spec)
        t_fast = time.perf_counter() - t
        cos = float((full * fast).sum() / np.linalg.norm(full) / np.linalg.norm(fast))
        parts.append(f"{fmt_} 3000x2000: full {1000 * t_full:.0f} ms, bounded {1000 * t_fast:.0f}"
                     f" ms, cosine {cos:.5f}, max |diff| {np.abs(full - fast).max():.3f}")
    return "; ".join(parts)


def main(argv: list[str] | None = None) -> int:
    """Run the comparison and print the tables."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundles", type=Path, help="a published bundles dir (default: 100k items)")
    p.add_argument("--items", type=int, default=100_000)
    p.add_argument("--users", type=int, default=10_000)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--flooders", type=int, default=8)
    p.add_argument("--options", nargs="*", default=[], help="server option sets to add, each "
                   "one quoted string, e.g. '--gil-switch-ms 0.5'")
    p.add_argument("--baseline-src", type=Path, help="source tree of the code to compare with")
    args = p.parse_args(argv)
    tmp = None
    if args.bundles is None:
        from bench.bundle_factory import BundleSpec, clustered, write_test_bundle

        tmp = Path(tempfile.mkdtemp(prefix="encode-iso-"))
        args.bundles = tmp
        write_test_bundle(tmp, BundleSpec(
            n_users=args.users, n_items=args.items, dim=64, factory="HNSW32",
            items=clustered(args.items, 64, 1), users=clustered(args.users, 64, 2),
            search_params={"ef_search": 128}, seen_per_user=20))
    runs = [("this tree", None, ())] + [
        (f"this tree {o}", None, tuple(o.split())) for o in args.options] + (
        [("baseline", args.baseline_src, ())] if args.baseline_src else [])
    try:
        results = [measure(label, args.bundles, args, src, opts) for label, src, opts in runs]
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"\n{args.flooders} flood clients, {args.seconds:.0f} s per phase; loadavg now "
          f"{loadavg()}\n")
    print("| server | image alone | status | seconds |\n|---|---|---|---|")
    for r in results:
        for name, code, sec in r["singles"]:
            print(f"| {r['label']} | {name} | {code} | {sec:.2f} |")
    print("\n| server | Recommend alone p50 / p99 / max ms (n) | under flood | p99 ratio | "
          "flood statuses | EncodeItem p50 / p99 / max ms | RSS idle -> peak MiB | alive | "
          "loadavg alone, flood |\n|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['label']} | {fmt(r['alone'])} | {fmt(r['under'])} | "
              f"{r['under']['p99'] / r['alone']['p99']:.2f} | {r['codes']} | {fmt(r['encode'])} "
              f"| {r['rss0']:.0f} -> {r['peak']:.0f} | {r['alive']} | {r['alone']['load']}, "
              f"{r['under']['load']} |")
    print(f"\nbounded decode vs full decode: {decode_closeness()}")
    bad = [r for r in results if r["label"].startswith("this tree") and (
        "INTERNAL" in r["codes"] or not r["alive"])]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
