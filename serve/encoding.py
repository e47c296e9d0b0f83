"""A bounded, low-priority executor for item encodes, so encoding can never starve Recommend.

EncodeItem and UpsertItem decode, resize and run the ONNX towers: up to a few hundred ms of CPU
and ~4 bytes per image pixel of memory each (index.preprocess). They run here, not in the RPC
thread: `workers` threads (default 1) whose Linux nice value is raised by `nice` (default 10,
`setpriority` on the thread, so the kernel gives Recommend's threads the cores first; CFS weighs
nice 10 at about a tenth of nice 0), at most `queue` more waiting (default 8). A call that finds
workers + queue encodes already admitted is refused at once with RESOURCE_EXHAUSTED, and one that
waited `max_wait` seconds (default 1) without starting is refused the same way when its turn
comes, without running: the queue never grows and a client learns of overload within `max_wait`.
Waiting is what protects Recommend from clients that retry at once: measured with 8 clients
looping on the worst images (bench.encode_isolation), a queue of 2 answered ~2,000 refusals a
second, whose gRPC cost alone took the GIL from Recommend (p99 x3-x10), while with a queue of 8
the same clients wait, cost nothing, and Recommend's p50 / p99 stayed at their unloaded values.

Memory bound: at most `workers` images are decoded at a time, so the encode memory of a process
is workers x (4 B x max image pixels + the resize copies), about 220 MB per worker at the 50 Mpx
default, plus the request messages the admitted calls hold ((workers + queue) x max image bytes: 72 MiB at the defaults).
The RPC threads that wait here hold no CPU, and the server adds workers + queue threads to its
RPC pool so other calls always keep `--workers` threads. While the pool is full, the
serve.guard.Gate refuses EncodeItem / UpsertItem before their message is parsed: a refusal costs
the server about as little as any gRPC call can, which matters when clients retry at once.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent import futures
from typing import TypeVar

from pydantic import BaseModel, ConfigDict, Field

from serve.errors import ResourceExhausted

log = logging.getLogger(__name__)
T = TypeVar("T")


class EncodeLimits(BaseModel):
    """How many encodes run and wait per process, for how long, at which priority."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    workers: int = Field(1, ge=1, description="encodes running at a time")
    queue: int = Field(8, ge=0, description="encodes admitted to wait beyond the running ones")
    max_wait: float = Field(1.0, gt=0, description="seconds an admitted encode may wait to start")
    nice: int = Field(10, ge=0, le=19, description="nice increment of the encode threads")


def _lower_priority(nice: int) -> None:
    """Raise this thread's nice value (Linux: per thread); best effort elsewhere."""
    if nice <= 0 or not hasattr(os, "setpriority"):
        return
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
    except OSError as err:
        log.warning("could not lower the encode threads' priority: %s", err)


class EncodePool:
    """Runs encodes on a few low-priority threads; refuses what would queue beyond the bound."""

    def __init__(self, limits: EncodeLimits | None = None):
        self.limits = limits or EncodeLimits()
        self._pool = futures.ThreadPoolExecutor(
            self.limits.workers, thread_name_prefix="encode", initializer=_lower_priority,
            initargs=(self.limits.nice,))
        self._lock = threading.Lock()
        self.admitted = 0       # running + waiting
        self.refused = 0

    @property
    def full(self) -> bool:
        """Whether a call now would be refused (workers + queue encodes admitted)."""
        return self.admitted >= self.limits.workers + self.limits.queue

    def run(self, fn: Callable[..., T], *args) -> T:
        """fn(*args) on an encode thread; ResourceExhausted when full or after max_wait queued."""
        cap = self.limits.workers + self.limits.queue
        with self._lock:
            if self.admitted >= cap:
                self.refused += 1
                raise ResourceExhausted(f"{cap} item encodes are already running or queued; "
                                        "retry later")
            self.admitted += 1
        try:
            return self._pool.submit(self._start, time.monotonic(), fn, args).result()
        finally:
            with self._lock:
                self.admitted -= 1

    def _start(self, queued_at: float, fn: Callable[..., T], args: tuple) -> T:
        """Run fn unless it waited longer than max_wait."""
        waited = time.monotonic() - queued_at
        if waited > self.limits.max_wait:
            with self._lock:
                self.refused += 1
            raise ResourceExhausted(f"the item encode waited {waited:.2f} s for a free encoder "
                                    f"(limit {self.limits.max_wait:g} s); retry later")
        return fn(*args)

    def shutdown(self) -> None:
        """Stop the threads after the running encodes."""
        self._pool.shutdown(wait=True, cancel_futures=True)
