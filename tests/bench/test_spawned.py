"""bench.spawned: a measuring process's row, or an error row when it dies without one."""
from __future__ import annotations

import os


from bench import common as spawned


def puts_row(queue, x):
    queue.put({"x": x})


def dies(queue, x):
    os._exit(3)  # as a process killed for memory: no row, no exception


def test_row_of_a_finished_process():
    assert spawned.spawned_row(puts_row, (7,), {"m": "a"}, poll_s=0.2) == {"x": 7}


def test_a_dead_process_gives_an_error_row_instead_of_a_hang():
    row = spawned.spawned_row(dies, (7,), {"m": "a"}, poll_s=0.2)
    assert row == {"m": "a", "error": "the measuring process died (exit code 3)"}
