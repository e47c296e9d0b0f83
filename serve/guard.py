"""The server interceptor that answers and counts what is refused before a handler runs.

`Gate` sees every call before gRPC hands it to a handler, and refuses, in this order:
- an unknown method: UNIMPLEMENTED (counted as method="unknown", so labels stay bounded);
- missing or wrong credentials, or a read key on a write method (serve.auth): UNAUTHENTICATED /
  PERMISSION_DENIED, with no detail about the keys;
- more than `max_concurrent` calls of the Recommender service queued or running
  (`CountingPool.outstanding`, the count gRPC's own `maximum_concurrent_rpcs` keeps, which
  stays off so that this one place answers and counts): RESOURCE_EXHAUSTED;
- an item encode (EncodeItem, UpsertItem) while the encode pool is full (`busy`, serve.encoding):
  RESOURCE_EXHAUSTED before the message is parsed, so a client that loops on refusals costs as
  little as a refused call can;
- a message over `max_message_bytes`: RESOURCE_EXHAUSTED; bytes that are not a valid protobuf
  message: INVALID_ARGUMENT.
Each refusal is recorded in `recsys_requests_total{method,code}` and
`recsys_request_duration_seconds`, the names the servicer uses for the calls it answers.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass

import grpc

from serve.metrics import Metrics

UNKNOWN_METHOD = "unknown"
ENCODING_METHODS = frozenset({"EncodeItem", "UpsertItem"})


class CountingPool(futures.ThreadPoolExecutor):
    """A thread pool that knows how many submitted calls are queued or running."""

    def __init__(self, workers: int, thread_name_prefix: str = "rpc"):
        super().__init__(workers, thread_name_prefix=thread_name_prefix)
        self._lock = threading.Lock()
        self.outstanding = 0

    def submit(self, fn, /, *args, **kwargs) -> futures.Future:
        """Submit and count until the future is done."""
        with self._lock:
            self.outstanding += 1
        try:
            future = super().submit(fn, *args, **kwargs)
        except BaseException:
            self._done(None)
            raise
        future.add_done_callback(self._done)
        return future

    def _done(self, _future) -> None:
        with self._lock:
            self.outstanding -= 1


@dataclass(frozen=True)
class Refusal:
    """A call refused before its handler: status code name and the detail sent back."""

    code: str
    detail: str


Check = Callable[[str, tuple], Refusal | None]


class Gate(grpc.ServerInterceptor):
    """Refuses (and counts) unknown methods, unauthorised calls, overload, bad messages."""

    def __init__(self, metrics: Metrics, pool: CountingPool, max_concurrent: int,
                 max_message_bytes: int, limited_service: str, check: Check | None = None,
                 busy: Callable[[], bool] | None = None):
        self.metrics, self.pool, self.max_concurrent = metrics, pool, max_concurrent
        self.max_message_bytes, self.limited = max_message_bytes, f"/{limited_service}/"
        self.check, self.busy = check, busy

    def intercept_service(self, continuation, details):
        """The handler to run: the real one (wrapped) or one that answers a refusal."""
        start = time.perf_counter()
        handler = continuation(details)
        if handler is None:
            self.metrics.observe(UNKNOWN_METHOD, "UNIMPLEMENTED", time.perf_counter() - start)
            return None
        method = details.method.rsplit("/", 1)[-1]
        refusal = self.check(details.method, details.invocation_metadata) if self.check else None
        limited = details.method.startswith(self.limited)
        if refusal is None and limited and self.pool.outstanding >= self.max_concurrent:
            refusal = Refusal("RESOURCE_EXHAUSTED", "too many concurrent requests; retry later")
        if (refusal is None and limited and method in ENCODING_METHODS and self.busy is not None
                and self.busy()):
            refusal = Refusal("RESOURCE_EXHAUSTED", "all item encoders are busy; retry later")
        if refusal is not None:
            return _refusing(handler, refusal, self._abort(method, refusal, start))
        if limited and not (handler.request_streaming or handler.response_streaming):
            return self._checked(handler, method, start)
        return handler

    def _abort(self, method: str, refusal: Refusal, start: float) -> Callable:
        """A behaviour that counts the refusal and answers it."""
        def behaviour(_request, context):
            self.metrics.observe(method, refusal.code, time.perf_counter() - start)
            context.abort(getattr(grpc.StatusCode, refusal.code), refusal.detail)
        return behaviour

    def _checked(self, handler: grpc.RpcMethodHandler, method: str,
                 start: float) -> grpc.RpcMethodHandler:
        """The unary handler with its message size-checked and parsed here, so failures count."""
        parse, inner, limit = handler.request_deserializer, handler.unary_unary, self.max_message_bytes

        def deserialize(data: bytes):
            if len(data) > limit:
                return Refusal("RESOURCE_EXHAUSTED", f"message of {len(data)} bytes is over the "
                               f"limit of {limit}")
            try:
                return parse(data)
            except Exception:  # noqa: BLE001 - any parse failure is the client's bytes
                return Refusal("INVALID_ARGUMENT", "request bytes are not a valid message")

        def behaviour(request, context):
            if isinstance(request, Refusal):
                return self._abort(method, request, start)(request, context)
            return inner(request, context)

        return grpc.unary_unary_rpc_method_handler(behaviour, deserialize,
                                                   handler.response_serializer)


def _refusing(handler: grpc.RpcMethodHandler, refusal: Refusal,
              behaviour: Callable) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that answers `refusal` whatever the bytes."""
    if handler.request_streaming and handler.response_streaming:
        make = grpc.stream_stream_rpc_method_handler
    elif handler.request_streaming:
        make = grpc.stream_unary_rpc_method_handler
    elif handler.response_streaming:
        make = grpc.unary_stream_rpc_method_handler
    else:
        make = grpc.unary_unary_rpc_method_handler
    return make(behaviour, lambda _data: refusal, handler.response_serializer)
