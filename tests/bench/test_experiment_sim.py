"""bench.experiment_sim helpers: the held-out items and the users-needed search."""
from __future__ import annotations

from bench.experiment_sim import held_out_items
from bench.experiment_sim import users_needed


def test_held_out_items_are_the_test_rows(tmp_path):
    path = tmp_path / "x.inter"
    path.write_text("userID\titemID\trating\ttimestamp\tx_label\n"
                    "0\t1\t5\t1\t0\n0\t2\t5\t1\t2\n1\t3\t5\t1\t2\n1\t4\t5\t1\t1\n0\t5\t5\t1\t2\n")
    assert held_out_items(path) == {0: {2, 5}, 1: {3}}


def test_users_needed_shrinks_with_the_effect():
    weak = [1] * 40 + [0] * 60
    strong, close = [1] * 80 + [0] * 20, [1] * 50 + [0] * 50
    big, small = users_needed(strong, weak, reps=100), users_needed(close, weak, reps=100)
    assert big is not None and small is not None and big < small
    assert 10 < big < 100 and 150 < small < 1500
