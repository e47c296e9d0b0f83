"""One measurement in a fresh spawned process (so its peak memory is its own), and its result row."""
from __future__ import annotations

import multiprocessing as mp
import queue as queue_mod
from collections.abc import Callable


def spawned_row(target: Callable, args: tuple, died: dict, poll_s: float = 5.0) -> dict:
    """Run target(queue, *args) in a spawned process and return the row it puts on the queue.
    A process that ends without one (killed for memory, a CUDA abort) gives `died` plus an
    `error` naming its exit code, instead of a wait that never ends."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(queue, *args))
    proc.start()
    row = None
    while row is None:
        try:
            row = queue.get(timeout=poll_s)
        except queue_mod.Empty:
            if not proc.is_alive():
                try:  # it may have put its row just before it ended
                    row = queue.get(timeout=1.0)
                except queue_mod.Empty:
                    proc.join()
                    return died | {"error": f"the measuring process died (exit code "
                                            f"{proc.exitcode})"}
    proc.join()
    return row
