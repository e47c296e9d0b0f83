"""Throw malformed requests at a real server and show it stays alive and correct.

Starts `python -m serve` on a free loopback port over a small synthetic bundle (tiny ONNX
encoders), then sends (1) one request of each of 40+ kinds of malformed or edge-case input and
checks the status code against the documented one, and (2) `--random` random EncodeItem
payloads (random bytes, mutated and truncated images in many formats and sizes, random Unicode
texts up to past the length limit), bounded by `--max-seconds`. Prints the status counts, then
checks that the server process is alive, health is SERVING, a Recommend returns exactly what it
returned before, and the index size is unchanged.

    python -m bench.bad_inputs [--random 10000] [--max-seconds 300]
"""
from __future__ import annotations

import argparse
import io
import os
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from PIL import Image

from bench.common import ROOT

from serve._gen.ptmrec.v1 import recommender_pb2 as pb
from serve.client import RecommenderClient
from bench.bundle_factory import BundleSpec, png, write_test_bundle

MIB = 1024 * 1024
OK, INVALID, EXHAUSTED = "OK", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"
RANDOM_ALLOWED = {OK, INVALID, EXHAUSTED}


def image_bytes(img: Image.Image, fmt: str) -> bytes:
    """Encode a PIL image."""
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def rec(**fields) -> pb.RecommendRequest:
    """A RecommendRequest with defaults user 10, k 10."""
    return pb.RecommendRequest(**({"user_id": 10, "k": 10} | fields))


def cases(good: bytes) -> list[tuple[str, str, object, str]]:
    """(name, method, request, expected status) of each malformed or edge-case kind."""
    bomb = image_bytes(Image.new("1", (20_000, 20_000)), "PNG")
    jpeg = bytearray(image_bytes(Image.new("RGB", (64, 64), (200, 10, 10)), "JPEG"))
    jpeg[200:260] = b"\xff" * 60
    up = lambda **f: pb.UpsertItemRequest(**({"item_id": 5_000_000, "text": "red"} | f))  # noqa: E731
    enc = lambda **f: pb.EncodeItemRequest(**f)  # noqa: E731
    return [
        ("k=0", "Recommend", rec(k=0), INVALID), ("k=-1", "Recommend", rec(k=-1), INVALID),
        ("k=1001", "Recommend", rec(k=1001), INVALID),
        ("k=int32 max", "Recommend", rec(k=2**31 - 1), INVALID),
        ("user -1", "Recommend", rec(user_id=-1), INVALID),
        ("user int64 min", "Recommend", rec(user_id=-2**63), INVALID),
        ("user int64 max (unknown)", "Recommend", rec(user_id=2**63 - 1), OK),
        ("negative exclude id", "Recommend", rec(exclude_item_ids=[1, -5]), INVALID),
        ("10,001 exclude ids", "Recommend", rec(exclude_item_ids=list(range(10_001))), INVALID),
        ("10,000 exclude ids (all items)", "Recommend", rec(exclude_item_ids=list(range(1000, 11_000))), OK),
        ("negative recent id", "Recommend", rec(user_id=7, recent_item_ids=[-1]), INVALID),
        ("1,001 recent ids", "Recommend", rec(user_id=7, recent_item_ids=list(range(1001))), INVALID),
        ("unknown recent ids", "Recommend", rec(user_id=7, recent_item_ids=[9, 10**12]), OK),
        ("k=1000 of 2,000 items", "Recommend", rec(k=1000), OK),
        ("empty batch", "RecommendBatch", pb.RecommendBatchRequest(), INVALID),
        ("257-request batch", "RecommendBatch", pb.RecommendBatchRequest(requests=[rec()] * 257), INVALID),
        ("bad request in batch", "RecommendBatch", pb.RecommendBatchRequest(requests=[rec(), rec(k=0)]), INVALID),
        ("no image, no text", "EncodeItem", enc(), INVALID),
        ("whitespace text only", "EncodeItem", enc(text=" \t\n "), INVALID),
        ("random bytes image", "EncodeItem", enc(image=os.urandom(5000)), INVALID),
        ("truncated PNG", "EncodeItem", enc(image=good[: len(good) // 2]), INVALID),
        ("PNG signature only", "EncodeItem", enc(image=good[:8]), INVALID),
        ("corrupted JPEG body", "EncodeItem", enc(image=bytes(jpeg)), INVALID),
        ("1x1 GIF", "EncodeItem", enc(image=image_bytes(Image.new("P", (1, 1)), "GIF")), OK),
        ("1x20000 PNG (aspect over 20:1)", "EncodeItem", enc(image=image_bytes(Image.new("L", (1, 20_000)), "PNG")), INVALID),
        ("1x100,000 PNG", "EncodeItem", enc(image=image_bytes(Image.new("L", (1, 100_000)), "PNG")), INVALID),
        ("1x1,000,000 PNG", "EncodeItem", enc(image=image_bytes(Image.new("L", (1, 1_000_000)), "PNG")), INVALID),
        ("7000x7000 PNG, 49 Mpx of ~160 KB", "EncodeItem", enc(image=image_bytes(Image.new("RGB", (7000, 7000), (200, 10, 10)), "PNG")), OK),
        ("400x20 PNG (20:1)", "EncodeItem", enc(image=image_bytes(Image.new("RGB", (400, 20)), "PNG")), OK),
        ("CMYK TIFF", "EncodeItem", enc(image=image_bytes(Image.new("CMYK", (50, 40)), "TIFF")), OK),
        ("16-bit PNG", "EncodeItem", enc(image=image_bytes(Image.new("I;16", (30, 30)), "PNG")), OK),
        ("image 8 MiB + 1", "EncodeItem", enc(image=b"\0" * (8 * MIB + 1)), EXHAUSTED),
        ("image 12 MiB (over gRPC max)", "EncodeItem", enc(image=b"\0" * (12 * MIB)), EXHAUSTED),
        ("decompression bomb 20000x20000", "EncodeItem", enc(image=bomb), EXHAUSTED),
        ("text 20,001 chars", "EncodeItem", enc(text="a" * 20_001), EXHAUSTED),
        ("text 20,000 chars", "EncodeItem", enc(text="red " * 5000), OK),
        ("text with NUL/control chars", "EncodeItem", enc(text="red\x00\x01\x1b[31m shoe"), OK),
        ("text emoji and RTL", "EncodeItem", enc(text="👟 حذاء أحمر 红色的鞋"), OK),
        ("upsert negative id", "UpsertItem", up(item_id=-1), INVALID),
        ("upsert existing without overwrite", "UpsertItem", up(item_id=1000), "ALREADY_EXISTS"),
        ("upsert empty item", "UpsertItem", up(text=""), INVALID),
        ("upsert garbage image", "UpsertItem", up(image=b"GIF89a\x00\x00"), INVALID),
        ("delete unknown", "DeleteItem", pb.DeleteItemRequest(item_id=123_456_789), "NOT_FOUND"),
        ("delete negative", "DeleteItem", pb.DeleteItemRequest(item_id=-7), INVALID),
    ]


def call(client: RecommenderClient, method: str, request, timeout: float = 10) -> str:
    """Status code name of one RPC."""
    try:
        getattr(client.stub, method)(request, timeout=timeout)
        return OK
    except grpc.RpcError as err:
        return err.code().name


def raw_cases(channel: grpc.Channel) -> list[tuple[str, str, str]]:
    """Requests that bypass the generated stubs: bad protobuf bytes, unknown method, deadline."""
    def raw(method: str, payload: bytes, timeout: float = 5) -> str:
        stub = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
        try:
            stub(payload, timeout=timeout)
            return OK
        except grpc.RpcError as err:
            return err.code().name

    bad_utf8 = b"\x12\x03\xff\xfe\xfd"  # field 2 (text) with invalid UTF-8
    return [
        ("garbage protobuf bytes", raw("/ptmrec.v1.Recommender/Recommend", b"\xff\xff\xff\xff"),
         INVALID),
        ("invalid UTF-8 in text", raw("/ptmrec.v1.Recommender/EncodeItem", bad_utf8), INVALID),
        ("unknown method", raw("/ptmrec.v1.Recommender/Nope", b""), "UNIMPLEMENTED"),
        ("valid bytes, no stub", raw("/ptmrec.v1.Recommender/Recommend", b"\x08\x0a\x10\x0a"), OK),
        ("health of unknown service", raw("/grpc.health.v1.Health/Check", b"\x0a\x04nope"),
         "NOT_FOUND"),
    ]


def random_payload(rng: random.Random, bases: list[bytes]) -> pb.EncodeItemRequest:
    """One random EncodeItem request: noise, mutated or cut images, random texts."""
    kind = rng.randrange(6)
    if kind == 0:
        image = rng.randbytes(rng.randrange(0, 65_536))
    elif kind == 1:
        image = bytearray(rng.choice(bases))
        for _ in range(rng.randrange(1, 20)):
            image[rng.randrange(len(image))] = rng.randrange(256)
        image = bytes(image)
    elif kind == 2:
        base = rng.choice(bases)
        image = base[: rng.randrange(len(base))]
    elif kind == 3:
        image = rng.choice(bases)
    else:
        image = b""
    length = rng.choice([0, 0, 5, 50, 500, 19_999, 20_001])
    text = "".join(chr(rng.choice([rng.randrange(32, 127), rng.randrange(0x80, 0xD7FF)]))
                   for _ in range(length))
    return pb.EncodeItemRequest(image=image, text=text)


def base_images(rng: random.Random, n: int = 60) -> list[bytes]:
    """Valid images in assorted formats, modes and sizes."""
    out = []
    for i in range(n):
        w, h = rng.randrange(1, 400), rng.randrange(1, 400)
        fmt = rng.choice(["PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF"])
        mode = "RGB" if fmt == "JPEG" else rng.choice(["RGB", "L", "P", "RGBA"])
        if fmt in ("WEBP",) and mode == "P":
            mode = "RGB"
        img = Image.open(io.BytesIO(png((rng.randrange(256),) * 3, (w, h), seed=i))).convert(mode)
        out.append(image_bytes(img, fmt))
    return out


def fuzz(target: str, n: int, max_seconds: float, threads: int = 4) -> Counter:
    """Send n random EncodeItem payloads from a few threads; counts of status codes."""
    rng = random.Random(0)
    bases = base_images(rng)
    requests = [random_payload(rng, bases) for _ in range(n)]
    deadline = time.monotonic() + max_seconds
    counts: Counter = Counter()
    with RecommenderClient(target, timeout=30) as client:
        def one(req):
            return "SKIPPED (time bound)" if time.monotonic() > deadline else call(client, "EncodeItem", req)

        with ThreadPoolExecutor(threads) as pool:
            counts.update(pool.map(one, requests))
    return counts


def main(argv: list[str] | None = None) -> int:
    """Run everything and print the tables; non-zero exit if anything unexpected happened."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--random", type=int, default=10_000)
    p.add_argument("--max-seconds", type=float, default=300)
    args = p.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="bad-inputs-"))
    write_test_bundle(root, BundleSpec(n_users=200, n_items=2000))
    proc = subprocess.Popen([sys.executable, "-m", "serve", "--bundles", str(root), "--port", "0",
                             "--metrics-port", "-1", "--log-level", "CRITICAL"],
                            cwd=ROOT, stdout=subprocess.PIPE, text=True,
                            env=os.environ | {"PYTHONUNBUFFERED": "1"})
    target = proc.stdout.readline().split()[2].rstrip(",")
    failures = 0
    try:
        with RecommenderClient(target, timeout=30) as client:
            while client.health() != "SERVING":
                time.sleep(0.1)
            before = list(client.recommend(10, 20).items)
            items_before = client.info().index_items
            good = png((10, 200, 10), (80, 60))
            print("| # | malformed input | RPC | expected | got |\n|---|---|---|---|---|")
            rows = []
            for n, m, r, exp in cases(good):
                t = time.perf_counter()
                got = call(client, m, r)
                rows.append((f"{n} ({time.perf_counter() - t:.2f} s)", m, exp, got))
            rows += [(n, "(raw)", exp, got) for n, got, exp in raw_cases(client.channel)]
            for i, (name, method, exp, got) in enumerate(rows, 1):
                failures += got != exp
                print(f"| {i} | {name} | {method} | {exp} | {got}{'' if got == exp else ' ✗'} |")
            start = time.perf_counter()
            counts = fuzz(target, args.random, args.max_seconds)
            print(f"\n{sum(counts.values()):,} random EncodeItem payloads in "
                  f"{time.perf_counter() - start:.1f} s:\n\n| status | count |\n|---|---|")
            for code, n in counts.most_common():
                print(f"| {code} | {n:,} |")
            failures += sum(n for code, n in counts.items() if code not in RANDOM_ALLOWED)
            alive = proc.poll() is None and client.health() == "SERVING"
            same = list(client.recommend(10, 20).items) == before
            unchanged = client.info().index_items == items_before
            print(f"\nafter: process alive and SERVING: {alive}; Recommend(user 10) unchanged: "
                  f"{same}; index items unchanged ({items_before}): {unchanged}")
            failures += (not alive) + (not same) + (not unchanged)
    finally:
        proc.terminate()
        code = proc.wait(60)
        print(f"server exit code after SIGTERM: {code}")
        subprocess.run(["rm", "-rf", str(root)], check=False)
    print("RESULT:", "all as documented" if failures == 0 else f"{failures} unexpected")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
