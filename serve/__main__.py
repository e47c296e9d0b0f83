"""Run the recommendation server until SIGTERM or SIGINT.

    python -m serve --bundles bundles/ [--state DIR | --store postgresql://...] [--host 127.0.0.1]
                    [--port 50051] [--metrics-port 9100] [--tls-cert cert.pem --tls-key key.pem]
                    [--api-keys keys.txt | --tls-client-ca ca.pem | --insecure-allow-anonymous]
                    [--poll-seconds 2] [--store-wait-seconds 300] [--no-store-listen]
                    [--workers 8] [--drain-seconds 2] [--grace-seconds 5]
                    [--ui-port 8080 [--ui-host 127.0.0.1] [--catalogue DATA_DIR]]

API keys come from --api-keys FILE and/or the PTMREC_API_KEYS environment variable, never from
the command line (serve.auth).
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import warnings
from pathlib import Path

from serve.limits import MIB, Limits

KEYS_ENV = "PTMREC_API_KEYS"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(prog="python -m serve", description=__doc__.splitlines()[0])
    p.add_argument("--bundles", type=Path, required=True, help="directory holding vN/ and CURRENT")
    p.add_argument("--state", type=Path, help="folder of the SQLite event store (default: "
                   "BUNDLES/.state)")
    p.add_argument("--store", help="postgresql://user@host:port/db: a store shared by several "
                   "processes or machines (instead of SQLite under --state)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (0.0.0.0 to expose)")
    p.add_argument("--port", type=int, default=50051, help="gRPC port (0: pick a free one)")
    p.add_argument("--metrics-host", default="127.0.0.1")
    p.add_argument("--metrics-port", type=int, default=9100, help="Prometheus port; -1 disables")
    p.add_argument("--ui-host", default="127.0.0.1", help="inspection page bind address")
    p.add_argument("--ui-port", type=int, help="inspection page port (0: pick a free one); "
                   "off unless given")
    p.add_argument("--catalogue", type=Path, help="MMRec dataset directory (items.tsv, images) "
                   "for the inspection page's item texts and images")
    p.add_argument("--tls-cert", type=Path, help="PEM certificate chain (with --tls-key)")
    p.add_argument("--tls-key", type=Path, help="PEM private key")
    p.add_argument("--tls-client-ca", type=Path, help="PEM CA: require client certificates "
                   "signed by it (mutual TLS)")
    p.add_argument("--api-keys", type=Path, help=f"file of ROLE:KEY lines (read, write), re-read "
                   f"on change; also ${KEYS_ENV}")
    p.add_argument("--encode-role", choices=("read", "write"), default="write",
                   help="role EncodeItem needs")
    p.add_argument("--public-health", action=argparse.BooleanOptionalAction, default=True,
                   help="grpc.health.v1 without a key")
    p.add_argument("--public-reflection", action=argparse.BooleanOptionalAction, default=False,
                   help="server reflection without a key")
    p.add_argument("--insecure-allow-anonymous", action="store_true",
                   help="serve without authentication on a non-loopback address")
    p.add_argument("--poll-seconds", type=float, default=2.0,
                   help="how often to check CURRENT and the event store")
    p.add_argument("--store-listen", action=argparse.BooleanOptionalAction, default=True,
                   help="PostgreSQL: apply other processes' writes as soon as they commit "
                   "(LISTEN/NOTIFY); --no-store-listen: only every --poll-seconds (e.g. behind "
                   "PgBouncer in transaction mode)")
    p.add_argument("--store-wait-seconds", type=float, default=300.0,
                   help="PostgreSQL unreachable at start: health NOT_SERVING and retry this long, "
                   "then exit 2 (0: wait forever)")
    p.add_argument("--fold-in-half", type=float, default=5.0,
                   help="recorded interactions at which they weigh half of a known user's query")
    p.add_argument("--retry-seconds", type=float, default=60.0,
                   help="wait before retrying a bundle that failed to load")
    p.add_argument("--workers", type=int, default=8, help="RPC thread pool size")
    p.add_argument("--max-concurrent-rpcs", type=int, default=256)
    p.add_argument("--drain-seconds", type=float, default=2.0, help="after SIGTERM: health "
                   "NOT_SERVING at once, calls still answered this long (balancers move away)")
    p.add_argument("--grace-seconds", type=float, default=5.0,
                   help="then: new calls refused, in-flight calls get this long to finish")
    p.add_argument("--reuse-port", action="store_true",
                   help="let several server processes listen on the same port (SO_REUSEPORT)")
    p.add_argument("--faiss-threads", type=int, default=1, help="OpenMP threads per search")
    p.add_argument("--encoder-threads", type=int, default=1, help="onnxruntime intra-op threads")
    p.add_argument("--encode-workers", type=int, default=1, help="item encodes run at a time "
                   "(low-priority threads)")
    p.add_argument("--encode-queue", type=int, default=8, help="encodes admitted to wait; more "
                   "are refused at once (RESOURCE_EXHAUSTED)")
    p.add_argument("--encode-max-wait", type=float, default=1.0,
                   help="seconds an admitted encode may wait before it is refused")
    p.add_argument("--encode-nice", type=int, default=10, help="nice increment of encode threads")
    p.add_argument("--max-image-mib", type=float, default=8.0)
    p.add_argument("--max-image-mpx", type=float, default=50.0, help="largest image, megapixels")
    p.add_argument("--max-image-aspect", type=float, default=20.0,
                   help="longest side / shortest side of an image")
    p.add_argument("--max-text-chars", type=int, default=20_000)
    p.add_argument("--log-level", default="INFO")
    return p.parse_args(argv)


def auth_from_args(args: argparse.Namespace, environ=os.environ):
    """AuthConfig from parsed options and the PTMREC_API_KEYS variable."""
    from serve.auth import AuthConfig

    return AuthConfig(api_keys=args.api_keys, api_keys_text=environ.get(KEYS_ENV) or None,
                      encode_role=args.encode_role, public_health=args.public_health,
                      public_reflection=args.public_reflection, tls_client_ca=args.tls_client_ca,
                      insecure_allow_anonymous=args.insecure_allow_anonymous)


def config_from_args(args: argparse.Namespace):
    """ServerConfig from parsed options."""
    from serve.online import FoldIn
    from serve.server import ServerConfig

    from serve.encoding import EncodeLimits

    limits = Limits(max_image_bytes=int(args.max_image_mib * MIB),
                    max_image_pixels=int(args.max_image_mpx * 1_000_000),
                    max_image_aspect=args.max_image_aspect, max_text_chars=args.max_text_chars)
    encode = EncodeLimits(workers=args.encode_workers, queue=args.encode_queue,
                          max_wait=args.encode_max_wait, nice=args.encode_nice)
    return ServerConfig(
        bundles=args.bundles, state=args.state, store=args.store, host=args.host, port=args.port,
        metrics_host=args.metrics_host, fold_in=FoldIn(half=args.fold_in_half),
        ui_host=args.ui_host, ui_port=args.ui_port, catalogue=args.catalogue,
        metrics_port=None if args.metrics_port < 0 else args.metrics_port,
        tls_cert=args.tls_cert, tls_key=args.tls_key, poll_seconds=args.poll_seconds,
        store_listen=args.store_listen, store_wait_seconds=args.store_wait_seconds,
        retry_seconds=args.retry_seconds, workers=args.workers,
        max_concurrent_rpcs=args.max_concurrent_rpcs, grace_seconds=args.grace_seconds,
        drain_seconds=args.drain_seconds,
        reuse_port=args.reuse_port, auth=auth_from_args(args),
        faiss_threads=args.faiss_threads, encoder_threads=args.encoder_threads, limits=limits,
        encode=encode)


def ui_url(host: str, port: int) -> str:
    """The inspection page's address (a wildcard bind is shown as loopback)."""
    host = {"0.0.0.0": "127.0.0.1", "::": "[::1]"}.get(host, host)
    return f"http://{f'[{host}]' if ':' in host and not host.startswith('[') else host}:{port}/"


def main(argv: list[str] | None = None) -> int:
    """Start the server and block until a termination signal."""
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")  # corrupt uploads
    from serve.server import start

    try:
        running = start(config_from_args(args))
    except RuntimeError as err:
        logging.getLogger("serve").error("%s", err)
        return 2
    stop = running.exit  # a signal, or a start that cannot succeed (running.failure)

    def on_signal(signum, _frame):
        logging.getLogger("serve").info("received %s, shutting down",
                                        signal.Signals(signum).name)
        if stop.is_set():
            running.cut_drain()
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    print(f"serving on {args.host}:{running.port}"
          + (f", metrics on {args.metrics_host}:{running.metrics_port}"
             if running.metrics_port is not None else "")
          + (f", inspection page on {ui_url(args.ui_host, running.ui_port)}"
             if running.ui_port is not None else ""), flush=True)
    stop.wait()
    if running.failure is not None:
        logging.getLogger("serve").error("%s", running.failure)
        running.stop()
        return 2
    running.stop(drain=args.drain_seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
