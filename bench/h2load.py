"""The h2load side of bench.serve_load: gRPC-framed request bodies, h2load runs and their output,
the per-body grpc-status check, and the servers' own Recommend counters from /metrics.

h2load (nghttp2's C HTTP/2 load generator; Debian: `apt-get install nghttp2-client`) counts any
HTTP 200 as a success, gRPC errors included: each body is first sent once and its `grpc-status`
trailer checked, and the servers' `recsys_requests_total{method="Recommend"}` counters must show
no status but OK.
"""
from __future__ import annotations

import argparse
import re
import resource
import shutil
import subprocess
import urllib.request
from pathlib import Path

import numpy as np

RECOMMEND_PATH = "/ptmrec.v1.Recommender/Recommend"
GRPC_HEADERS = ("content-type: application/grpc", "te: trailers")
H2LOAD_MISSING = ("h2load not found on PATH (Debian/Ubuntu: apt-get install nghttp2-client); "
                  "skipping the h2load throughput part")


def scrape(port: int) -> str:
    """A server's Prometheus text exposition."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        return resp.read().decode()


def recommend_counts(text: str) -> dict[str, float]:
    """recsys_requests_total{method="Recommend"} by status code name."""
    out: dict[str, float] = {}
    for labels, value in re.findall(r"^recsys_requests_total\{([^}]*)\} (\S+)$", text, re.M):
        names = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        if names.get("method") == "Recommend":
            out[names["code"]] = out.get(names["code"], 0.0) + float(value)
    return out


def served_version(text: str) -> float:
    """recsys_model_version (0 until a bundle is loaded)."""
    found = re.search(r"^recsys_model_version (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def grpc_frame(message: bytes) -> bytes:
    """A gRPC length-prefixed message: flag 0 (uncompressed), 4-byte big-endian length, bytes."""
    return b"\x00" + len(message).to_bytes(4, "big") + message


def write_bodies(folder: Path, spec, k: int, n: int) -> list[Path]:
    """One gRPC-framed RecommendRequest file per user, for n users spread over the known ones."""
    from serve._gen.ptmrec.v1 import recommender_pb2 as pb

    folder.mkdir(parents=True, exist_ok=True)
    users = sorted({int(u) for u in np.linspace(0, spec.n_users - 1, n)})
    paths = []
    for user in users:
        path = folder / f"recommend-user{user * spec.user_id_step}.bin"
        path.write_bytes(grpc_frame(pb.RecommendRequest(user_id=user * spec.user_id_step,
                                                        k=k).SerializeToString()))
        paths.append(path)
    return paths


def python_status(target: str, body: Path) -> str:
    """Numeric gRPC status of one Recommend decoded from `body`, sent by the Python client."""
    import grpc

    from serve._gen.ptmrec.v1 import recommender_pb2 as pb
    from serve._gen.ptmrec.v1 import recommender_pb2_grpc as pb_grpc

    request = pb.RecommendRequest.FromString(body.read_bytes()[5:])
    with grpc.insecure_channel(target) as channel:
        try:
            pb_grpc.RecommenderStub(channel).Recommend(request, timeout=10)
            return "0"
        except grpc.RpcError as err:
            return str(err.code().value[0])


def sample_status(target: str, body: Path) -> str:
    """grpc-status trailer of one Recommend with exactly h2load's bytes, sent by nghttp."""
    nghttp = shutil.which("nghttp")
    if nghttp is None:
        return python_status(target, body)
    headers = [arg for h in GRPC_HEADERS for arg in ("-H", h)]
    out = subprocess.run([nghttp, "-n", "-v", *headers, "-d", str(body),
                          f"http://{target}{RECOMMEND_PATH}"],
                         capture_output=True, text=True, timeout=60).stdout
    found = re.search(r"grpc-status: (\d+)", out)
    return found.group(1) if found else "missing"


def h2load_cmd(target: str, body: Path, conns: int, streams: int, args: argparse.Namespace,
               log: Path) -> list[str]:
    """One single-threaded h2load run posting `body` to Recommend for a fixed duration."""
    headers = [arg for h in GRPC_HEADERS for arg in ("-H", h)]
    return ["h2load", "-c", str(conns), "-m", str(streams), "-t", "1", "-D",
            f"{round(args.h2load_seconds * 1000)}ms", "--warm-up-time",
            f"{round(args.h2load_warmup * 1000)}ms", *headers,
            "-d", str(body), "--log-file", str(log), f"http://{target}{RECOMMEND_PATH}"]


def parse_h2load(text: str) -> dict:
    """req/s and request counts from h2load's summary (any HTTP 200 counts as succeeded)."""
    rps = re.search(r"finished in [\d.]+m?s, ([\d.]+) req/s", text)
    req = re.search(r"requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded, "
                    r"(\d+) failed, (\d+) errored, (\d+) timeout", text)
    codes = re.search(r"status codes: (\d+) 2xx", text)
    if not (rps and req and codes):
        raise RuntimeError(f"unexpected h2load output:\n{text[-2000:]}")
    done, http_2xx = int(req.group(2)), int(codes.group(1))
    failed = max(sum(int(x) for x in req.groups()[3:]), done - http_2xx)  # the two overlap
    return dict(rps=float(rps.group(1)), http_2xx=http_2xx, failed=failed)


def read_latencies(log: Path) -> np.ndarray:
    """Per-request durations in ms from an h2load --log-file (start us, status, duration us)."""
    rows = [line.split("\t") for line in log.read_text().splitlines() if line.strip()]
    return np.array([int(r[2]) / 1000 for r in rows], dtype=np.float64)


def run_h2load(target: str, bodies: list[Path], conns: int, streams: int,
               args: argparse.Namespace) -> dict:
    """Concurrent h2load processes, one user body each, connections split between them."""
    n = min(len(bodies), conns)
    split = [conns // n + (i < conns % n) for i in range(n)]
    logs = [b.with_suffix(".log") for b in bodies[:n]]
    for log in logs:
        log.unlink(missing_ok=True)  # h2load appends to an existing --log-file
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    procs = [subprocess.Popen(h2load_cmd(target, body, c, streams, args, log),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for body, c, log in zip(bodies, split, logs)]
    outs = [p.communicate(timeout=args.h2load_seconds + args.h2load_warmup + 120)[0]
            for p in procs]
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if any(p.returncode for p in procs):
        raise RuntimeError(f"h2load failed:\n{outs[0][-2000:]}")
    parsed = [parse_h2load(out) for out in outs]
    lat = np.concatenate([read_latencies(log) for log in logs])
    pct = (lambda q: float(np.percentile(lat, q))) if len(lat) else (lambda q: float("nan"))
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return dict(users=n, rps=sum(r["rps"] for r in parsed),
                http_2xx=sum(r["http_2xx"] for r in parsed),
                failed=sum(r["failed"] for r in parsed),
                p50=pct(50), p99=pct(99), client_cpu=cpu)

