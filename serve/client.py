"""A small Python client for ptmrec.v1.Recommender, and a CLI around it.

    python -m serve.client recommend --user 42 -k 10 [--exclude 1 2] [--recent 7 8]
    python -m serve.client encode --image shoe.jpg --text "red running shoe"
    python -m serve.client upsert --item 9001 --image shoe.jpg --text "red running shoe" [--overwrite]
    python -m serve.client delete --item 9001
    python -m serve.client record --user 42 --items 9001 17 [--kind click] [--request-id ID]
    python -m serve.client info
    python -m serve.client health        # exit 0 when SERVING, 1 otherwise (Docker HEALTHCHECK)

Every command takes `--target HOST:PORT` (default 127.0.0.1:50051), `--timeout SECONDS` and
`--tls-ca PEM` (TLS with that root certificate; `--tls-cert`/`--tls-key` for mutual TLS) and
`--api-key-file FILE` (else the key in $PTMREC_API_KEY, never on the command line), before or
after the command name. Results print as JSON; an RPC error prints its
status code and message and exits 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable
from pathlib import Path

import grpc
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc

from serve._gen.ptmrec.v1 import recommender_pb2 as pb
from serve._gen.ptmrec.v1 import recommender_pb2_grpc as pb_grpc

SERVICE = pb.DESCRIPTOR.services_by_name["Recommender"].full_name
MAX_MESSAGE = 64 * 1024 * 1024
KEY_ENV = "PTMREC_API_KEY"


class RecommenderClient:
    """Blocking client with a per-call deadline."""

    def __init__(self, target: str = "127.0.0.1:50051", timeout: float = 5.0,
                 tls_ca: Path | None = None, options: Iterable[tuple[str, int]] = (),
                 api_key: str | None = None, tls_cert: Path | None = None,
                 tls_key: Path | None = None):
        options = [("grpc.max_send_message_length", MAX_MESSAGE),
                   ("grpc.max_receive_message_length", MAX_MESSAGE), *options]
        if tls_ca is not None:
            pair = ((Path(tls_key).read_bytes(), Path(tls_cert).read_bytes())
                    if tls_cert is not None else (None, None))
            creds = grpc.ssl_channel_credentials(Path(tls_ca).read_bytes(), *pair)
            self.channel = grpc.secure_channel(target, creds, options=options)
        else:
            self.channel = grpc.insecure_channel(target, options=options)
        if api_key:
            self.channel = grpc.intercept_channel(self.channel, _BearerKey(api_key))
        self.timeout = timeout
        self.stub = pb_grpc.RecommenderStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)

    def __enter__(self) -> RecommenderClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel."""
        self.channel.close()

    def recommend(self, user_id: int, k: int = 10, exclude: Iterable[int] = (),
                  exclude_seen: bool = True, recent: Iterable[int] = ()) -> pb.RecommendResponse:
        """Top-k items for a user."""
        return self.stub.Recommend(request(user_id, k, exclude, exclude_seen, recent),
                                   timeout=self.timeout)

    def recommend_batch(self, requests: list[pb.RecommendRequest]) -> pb.RecommendBatchResponse:
        """Several recommendations from one bundle snapshot."""
        return self.stub.RecommendBatch(pb.RecommendBatchRequest(requests=requests),
                                        timeout=self.timeout)

    def encode(self, image: bytes = b"", text: str = "") -> pb.EncodeItemResponse:
        """Vector of a new item (no side effects)."""
        return self.stub.EncodeItem(pb.EncodeItemRequest(image=image, text=text),
                                    timeout=self.timeout)

    def upsert(self, item_id: int, image: bytes = b"", text: str = "",
               overwrite: bool = False, request_id: str = "") -> pb.UpsertItemResponse:
        """Encode and insert an item into the live index (committed to the event store)."""
        req = pb.UpsertItemRequest(item_id=item_id, image=image, text=text, overwrite=overwrite,
                                   request_id=request_id)
        return self.stub.UpsertItem(req, timeout=self.timeout)

    def delete(self, item_id: int, request_id: str = "") -> pb.DeleteItemResponse:
        """Remove an item from the live index."""
        return self.stub.DeleteItem(pb.DeleteItemRequest(item_id=item_id, request_id=request_id),
                                    timeout=self.timeout)

    def record(self, user_id: int, item_ids: Iterable[int], timestamps: Iterable[int] = (),
               kind: str = "", request_id: str = "") -> pb.RecordInteractionsResponse:
        """Record a user's interactions with items (feedback)."""
        req = pb.RecordInteractionsRequest(user_id=user_id, item_ids=list(item_ids),
                                           timestamps=list(timestamps), kind=kind,
                                           request_id=request_id)
        return self.stub.RecordInteractions(req, timeout=self.timeout)

    def info(self) -> pb.ModelInfo:
        """Summary of the served bundle."""
        return self.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=self.timeout)

    def health(self, service: str = "") -> str:
        """Health status name ("SERVING", "NOT_SERVING", ...) of the server or a service."""
        resp = self.health_stub.Check(health_pb2.HealthCheckRequest(service=service),
                                      timeout=self.timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)


class _BearerKey(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                 grpc.StreamStreamClientInterceptor):
    """Adds `authorization: Bearer KEY` to every call."""

    def __init__(self, key: str):
        self.metadata = (("authorization", f"Bearer {key}"),)

    def _with_key(self, details):
        return details._replace(metadata=tuple(details.metadata or ()) + self.metadata)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._with_key(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._with_key(details), request)

    def intercept_stream_stream(self, continuation, details, requests):
        return continuation(self._with_key(details), requests)


def request(user_id: int, k: int = 10, exclude: Iterable[int] = (), exclude_seen: bool = True,
            recent: Iterable[int] = ()) -> pb.RecommendRequest:
    """A RecommendRequest."""
    return pb.RecommendRequest(user_id=user_id, k=k, exclude_item_ids=list(exclude),
                               exclude_seen=exclude_seen, recent_item_ids=list(recent))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(prog="python -m serve.client", description=__doc__.splitlines()[0])
    _global_options(p, suppress=False)
    common = argparse.ArgumentParser(add_help=False)
    _global_options(common, suppress=True)
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("recommend", "encode", "upsert", "delete", "record", "info", "health"):
        sub.add_parser(name, parents=[common], help=_HELP[name])
    rec = sub.choices["recommend"]
    rec.add_argument("--user", type=int, required=True)
    rec.add_argument("-k", type=int, default=10)
    rec.add_argument("--exclude", type=int, nargs="*", default=[])
    rec.add_argument("--recent", type=int, nargs="*", default=[])
    rec.add_argument("--include-seen", action="store_true", help="do not drop training items")
    for name in ("encode", "upsert"):
        cmd = sub.choices[name]
        if name == "upsert":
            cmd.add_argument("--item", type=int, required=True)
            cmd.add_argument("--overwrite", action="store_true")
        cmd.add_argument("--image", type=Path, help="image file")
        cmd.add_argument("--text", default="")
    sub.choices["delete"].add_argument("--item", type=int, required=True)
    fb = sub.choices["record"]
    fb.add_argument("--user", type=int, required=True)
    fb.add_argument("--items", type=int, nargs="+", required=True)
    fb.add_argument("--timestamps", type=int, nargs="*", default=[],
                    help="Unix seconds, one per item")
    fb.add_argument("--kind", default="", help='e.g. "click" (default "interaction")')
    for cmd in (sub.choices["upsert"], sub.choices["delete"], fb):
        cmd.add_argument("--request-id", default="", help="client id that makes a retry safe")
    sub.choices["health"].add_argument("--service", default="")
    return p.parse_args(argv)


_HELP = {"recommend": "top-k items for a user", "encode": "encode an item from an image and/or "
         "text", "upsert": "upsert an item from an image and/or text", "delete": "remove an item",
         "record": "record a user's interactions with items", "info": "bundle summary",
         "health": "exit 0 if SERVING"}


def _global_options(p: argparse.ArgumentParser, suppress: bool) -> None:
    """Connection options, accepted before or after the subcommand (after it wins); the
    subcommand's copies default to SUPPRESS so they never overwrite the main parser's values."""
    def default(value):
        return argparse.SUPPRESS if suppress else value

    p.add_argument("--target", default=default("127.0.0.1:50051"), help="HOST:PORT of the server")
    p.add_argument("--timeout", type=float, default=default(5.0), help="per-call deadline (s)")
    p.add_argument("--tls-ca", type=Path, default=default(None), help="PEM root certificate: TLS")
    p.add_argument("--tls-cert", type=Path, default=default(None),
                   help="PEM client certificate (mutual TLS, with --tls-key and --tls-ca)")
    p.add_argument("--tls-key", type=Path, default=default(None), help="PEM client key")
    p.add_argument("--api-key-file", type=Path, default=default(None),
                   help=f"file holding the API key (default: ${KEY_ENV} if set)")


def run(client: RecommenderClient, args: argparse.Namespace):
    """Execute one CLI command; returns a protobuf message or a status string."""
    image = args.image.read_bytes() if getattr(args, "image", None) else b""
    if args.command == "recommend":
        return client.recommend(args.user, args.k, args.exclude, not args.include_seen, args.recent)
    if args.command == "encode":
        return client.encode(image, args.text)
    if args.command == "upsert":
        return client.upsert(args.item, image, args.text, args.overwrite, args.request_id)
    if args.command == "delete":
        return client.delete(args.item, args.request_id)
    if args.command == "record":
        return client.record(args.user, args.items, args.timestamps, args.kind, args.request_id)
    if args.command == "info":
        return client.info()
    return client.health(args.service)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    args = parse_args(argv)
    key = (args.api_key_file.read_text(encoding="utf-8").strip() if args.api_key_file
           else os.environ.get(KEY_ENV))
    with RecommenderClient(args.target, args.timeout, args.tls_ca, api_key=key,
                           tls_cert=args.tls_cert, tls_key=args.tls_key) as client:
        try:
            result = run(client, args)
        except grpc.RpcError as err:
            print(f"{err.code().name}: {err.details()}", file=sys.stderr)
            return 1 if args.command == "health" else 2
    if isinstance(result, str):
        print(result)
        return 0 if result == "SERVING" else 1
    print(json.dumps(json_format.MessageToDict(result, preserving_proto_field_name=True),
                     indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
