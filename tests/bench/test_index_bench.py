"""bench.index_bench's PerPEFT layout: G unit blocks per item, one live block per query."""
from __future__ import annotations

import numpy as np


from bench import index_bench


def test_grouped_layout():
    args = index_bench.parse_args(["--dim", "8", "--groups", "3", "--centres", "5",
                                   "--group-noise", "0.5"])
    x = index_bench.clustered(50, args, seed=1)
    items = index_bench.grouped_items(x, args, seed=2)
    assert items.shape == (50, 24)
    blocks = items.reshape(50, 3, 8)
    np.testing.assert_allclose(np.linalg.norm(blocks, axis=2), 1.0, rtol=1e-5)
    cos = (blocks * x[:, None, :]).sum(2)
    assert 0.5 < cos.mean() < 0.99 and not np.allclose(blocks[:, 0], blocks[:, 1])
    queries = index_bench.block_queries(x[:20], args, seed=3).reshape(20, 3, 8)
    live = np.linalg.norm(queries, axis=2) > 0
    assert (live.sum(1) == 1).all() and len(set(live.argmax(1))) > 1
    one = index_bench.parse_args(["--dim", "8"])
    assert index_bench.grouped_items(x, one, seed=2) is x
