"""The online half of `make demo`: start the real server on a bundle and talk to it over gRPC.

    python -m serve.demo --bundles runs/demo/bundles --data runs/demo/data

Starts `python -m serve` as a child process on free loopback ports, waits for the health service
to say SERVING, then: top-10 for a few users, EncodeItem of a "new" item (image and text of an
existing catalogue item under an unused id, so the result is checkable), UpsertItem of it, the items
nearest to it (Recommend for an unknown user folded in from it), the users that now get it in
their top-10, a scrape of the Prometheus metrics; then it prints the address of the inspection
page (served with `--ui-port 0 --catalogue DATA`) and keeps the server up until Enter is pressed
(not when stdin is not a terminal, under CI=1 or with --no-wait), and stops it with SIGTERM.
Torch-free.
"""
from __future__ import annotations

import argparse
import csv
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc

from serve.client import RecommenderClient
from serve.views import users_who_get

METRIC_PREFIXES = ("recsys_requests_total", "recsys_index_items", "recsys_model_version",
                   "recsys_reloads_total", "recsys_encode_duration_seconds_count",
                   "recsys_recommend_source_total")


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_items(data: Path) -> dict[int, tuple[str, str]]:
    """itemID -> (image path, text) from the dataset's items.tsv."""
    with open(data / "items.tsv", newline="", encoding="utf-8") as fh:
        rows = csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
        return {int(r["itemID"]): (r.get("image") or "", r.get("text") or "") for r in rows}


def start_server(bundles: Path, data: Path, port: int,
                 metrics_port: int) -> tuple[subprocess.Popen, str | None]:
    """`python -m serve` as a child process with the inspection page on a free port; returns it
    and the page's address (from the line the server prints once it listens)."""
    cmd = [sys.executable, "-m", "serve", "--bundles", str(bundles), "--port", str(port),
           "--metrics-port", str(metrics_port), "--ui-port", "0", "--catalogue", str(data),
           "--log-level", "WARNING"]
    print("$ " + " ".join(cmd[1:]), flush=True)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True,
                            env=os.environ | {"PYTHONUNBUFFERED": "1"})
    line = proc.stdout.readline()
    print(line, end="", flush=True)
    found = re.search(r"inspection page on (\S+)", line)
    return proc, found.group(1) if found else None


def interactive() -> bool:
    """Whether to wait for Enter: a terminal on stdin and not CI."""
    return sys.stdin.isatty() and os.environ.get("CI") != "1"


def wait_serving(client: RecommenderClient, proc: subprocess.Popen, timeout: float) -> None:
    """Poll the gRPC health service until SERVING; fail if the server exits or times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode} before SERVING")
        try:
            if client.health() == "SERVING":
                return
        except grpc.RpcError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"server not SERVING after {timeout:.0f} s")


def show_top(client: RecommenderClient, user: int, k: int = 10) -> list[int]:
    """Print and return a user's top-k."""
    resp = client.recommend(user, k=k)
    items = [it.item_id for it in resp.items]
    source = type(resp).DESCRIPTOR.fields_by_name["source"].enum_type.values_by_number[
        resp.source].name
    print(f"  user {user:>5}: {items}  ({source.removeprefix('SOURCE_').lower()})")
    return items


def scrape(metrics_port: int) -> list[str]:
    """Selected lines of the Prometheus exposition."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return [line for line in text.splitlines() if line.startswith(METRIC_PREFIXES)]


def talk(client: RecommenderClient, data: Path, metrics_port: int, n_users: int) -> None:
    """The scripted conversation with a SERVING server."""
    info = client.info()
    print(f"bundle v{info.model_version}: {info.backbone}, {info.users} users, "
          f"{info.index_items} items, dim {info.dim}, cold start {info.cold_start}")
    users = list(range(n_users))
    print(f"top-10 for users {users} (training items excluded):")
    tops = {u: show_top(client, u) for u in users}

    items = read_items(data)
    source = tops[users[0]][0]
    new_id = max(items) + 1000
    image_path, text = items[source]
    image = (data / image_path).read_bytes() if image_path else b""
    vec = client.encode(image=image, text=text).vector
    print(f"EncodeItem(content of item {source}): {len(vec)}-d vector, "
          f"first values {[round(v, 3) for v in vec[:4]]}")
    up = client.upsert(new_id, image=image, text=text, overwrite=True)  # rerun: it is stored
    print(f"UpsertItem({new_id}): index now holds {up.index_items} items")
    near = client.recommend(10**12, k=10, recent=[new_id])
    print(f"nearest to new item {new_id} (unknown user folded in from it): "
          f"{[it.item_id for it in near.items]}")
    hits = users_who_get(new_id, range(info.users),
                         lambda u: [it.item_id for it in client.recommend(u, k=10).items])
    print(f"new item {new_id} is in the top-10 of {len(hits)} of {info.users} users"
          + (f"; user {hits[0]}:" if hits else ""))
    if hits:
        show_top(client, hits[0])
    print("metrics (selection):")
    for line in scrape(metrics_port):
        print("  " + line)


def main(argv: list[str] | None = None) -> int:
    """Run the demo conversation; exit code 0 on success."""
    p = argparse.ArgumentParser(prog="python -m serve.demo", description=__doc__.splitlines()[0])
    p.add_argument("--bundles", type=Path, required=True)
    p.add_argument("--data", type=Path, required=True, help="dataset directory (items.tsv)")
    p.add_argument("--users", type=int, default=3, help="users to show")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for SERVING")
    p.add_argument("--no-wait", action="store_true", help="stop at once instead of waiting for "
                   "Enter with the inspection page up")
    args = p.parse_args(argv)
    port, metrics_port = free_port(), free_port()
    proc, page = start_server(args.bundles, args.data, port, metrics_port)
    try:
        with RecommenderClient(f"127.0.0.1:{port}", timeout=10.0) as client:
            wait_serving(client, proc, args.timeout)
            print(f"server SERVING on 127.0.0.1:{port}, metrics on :{metrics_port}")
            talk(client, args.data, metrics_port, args.users)
        print(f"inspection page: {page} (a user: {page}user/0)", flush=True)
        if interactive() and not args.no_wait:
            try:
                input("the server keeps running; press Enter to stop it ")
            except (EOFError, KeyboardInterrupt):
                print()
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
        print(f"server stopped (exit code {code})")
    return 0 if code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
