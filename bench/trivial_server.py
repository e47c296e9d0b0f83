"""The throughput ceiling: a Recommender whose Recommend returns a fixed 20-item response.

Same service, same message sizes as the real server, no work: what grpcio itself answers on these
cores. `--aio` serves it with grpc.aio instead of the thread-pool server.

    python -m bench.trivial_server [--port 0] [--reuse-port] [--aio] [--workers 8]
"""
from __future__ import annotations

import argparse
import asyncio
import sys
from concurrent import futures

import grpc

from serve._gen.ptmrec.v1 import recommender_pb2 as pb
from serve._gen.ptmrec.v1 import recommender_pb2_grpc as pb_grpc

RESPONSE = pb.RecommendResponse(model_version=1, source=pb.SOURCE_USER_VECTOR, items=[
    pb.ScoredItem(item_id=1000 + i, score=1.0 - i / 100) for i in range(20)])


class Fixed(pb_grpc.RecommenderServicer):
    """Recommend answers RESPONSE."""

    def Recommend(self, request, context):
        return RESPONSE


class FixedAio(pb_grpc.RecommenderServicer):
    """Recommend answers RESPONSE (coroutine)."""

    async def Recommend(self, request, context):
        return RESPONSE


def _options(reuse_port: bool) -> list[tuple[str, int]]:
    return [("grpc.so_reuseport", int(reuse_port))]


def run_sync(port: int, reuse_port: bool, workers: int) -> None:
    """Thread-pool server until killed."""
    server = grpc.server(futures.ThreadPoolExecutor(workers), options=_options(reuse_port))
    pb_grpc.add_RecommenderServicer_to_server(Fixed(), server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    print(f"serving on 127.0.0.1:{bound}", flush=True)
    server.wait_for_termination()


async def run_aio(port: int, reuse_port: bool) -> None:
    """grpc.aio server until killed."""
    server = grpc.aio.server(options=_options(reuse_port))
    pb_grpc.add_RecommenderServicer_to_server(FixedAio(), server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(f"serving on 127.0.0.1:{bound}", flush=True)
    await server.wait_for_termination()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--reuse-port", action="store_true")
    p.add_argument("--aio", action="store_true")
    p.add_argument("--workers", type=int, default=8)
    args = p.parse_args(argv)
    if args.aio:
        asyncio.run(run_aio(args.port, args.reuse_port))
    else:
        run_sync(args.port, args.reuse_port, args.workers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
