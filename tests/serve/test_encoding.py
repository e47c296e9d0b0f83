"""serve.encoding.EncodePool: bounded admission, a queue with a deadline, low-priority threads."""
from __future__ import annotations

import os
import threading
import time

import pytest

from serve.encoding import EncodeLimits, EncodePool
from serve.errors import ResourceExhausted


def _blocker():
    """A task that runs until released, and the events to watch and release it."""
    started, release = threading.Event(), threading.Event()

    def task():
        started.set()
        release.wait(10)
        return "done"
    return task, started, release


def _in_thread(pool: EncodePool, fn) -> dict:
    """Run pool.run(fn) in a thread; the dict gets 'result' or 'error'."""
    out: dict = {}

    def go():
        try:
            out["result"] = pool.run(fn)
        except ResourceExhausted as err:
            out["error"] = err
    out["thread"] = threading.Thread(target=go)
    out["thread"].start()
    return out


def test_calls_beyond_workers_plus_queue_are_refused_at_once():
    pool = EncodePool(EncodeLimits(workers=1, queue=1, max_wait=5))
    task, started, release = _blocker()
    running = _in_thread(pool, task)
    assert started.wait(5)
    waiting = _in_thread(pool, lambda: "second")
    time.sleep(0.1)
    t = time.perf_counter()
    with pytest.raises(ResourceExhausted, match="already running or queued"):
        pool.run(lambda: "third")
    assert time.perf_counter() - t < 0.05 and pool.refused == 1
    release.set()
    for out in (running, waiting):
        out["thread"].join(5)
    assert running["result"] == "done" and waiting["result"] == "second"
    assert pool.admitted == 0
    pool.shutdown()


def test_a_call_that_waited_past_max_wait_is_refused_without_running():
    pool = EncodePool(EncodeLimits(workers=1, queue=4, max_wait=0.2))
    task, started, release = _blocker()
    running = _in_thread(pool, task)
    assert started.wait(5)
    ran = threading.Event()
    waiting = _in_thread(pool, ran.set)
    time.sleep(0.4)
    release.set()
    waiting["thread"].join(5)
    running["thread"].join(5)
    assert "waited" in str(waiting["error"]) and not ran.is_set()
    assert pool.run(lambda: 7) == 7  # free again
    pool.shutdown()


@pytest.mark.skipif(not hasattr(os, "getpriority"), reason="needs os.getpriority")
def test_encode_threads_run_at_lower_priority():
    pool = EncodePool(EncodeLimits(nice=5))
    mine = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    theirs = pool.run(lambda: os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
    assert theirs == min(19, mine + 5)
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == mine
    pool.shutdown()


def test_encode_errors_reach_the_caller():
    pool = EncodePool()

    def bad():
        raise ValueError("bad image")
    with pytest.raises(ValueError, match="bad image"):
        pool.run(bad)
    assert pool.admitted == 0
    pool.shutdown()


def test_servicer_answers_resource_exhausted_when_encoders_are_busy(servicer, holder, ctx):
    from bench.bundle_factory import probe_item
    from serve._gen.ptmrec.v1 import recommender_pb2 as pb
    from tests.serve.conftest import Aborted

    holder.encodes = EncodePool(EncodeLimits(workers=1, queue=0))
    task, started, release = _blocker()
    busy = _in_thread(holder.encodes, task)
    assert started.wait(5)
    image, text = probe_item()
    for call, request in ((servicer.EncodeItem, pb.EncodeItemRequest(image=image, text=text)),
                          (servicer.UpsertItem, pb.UpsertItemRequest(item_id=77, text=text))):
        with pytest.raises(Aborted) as err:
            call(request, ctx)
        assert err.value.code.name == "RESOURCE_EXHAUSTED"
    release.set()
    busy["thread"].join(5)
    assert len(servicer.EncodeItem(pb.EncodeItemRequest(image=image, text=text), ctx).vector)
    holder.encodes.shutdown()
