"""index.query.search_one: the over-fetch path gives ann.search's answer (exact on Flat)."""
from __future__ import annotations

import numpy as np
import pytest

from index import ann
from index.query import OVERFETCH_MAX, search_one
from index.rows import RowMap


def _flat(n: int = 500, d: int = 8):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((n, d)).astype(np.float32)
    return ann.build(x, np.arange(n, dtype=np.int64) + 10, "Flat", use_gpu=False), x


@pytest.mark.parametrize("n_excluded", [0, 1, 20, OVERFETCH_MAX, OVERFETCH_MAX + 1, 490])
def test_equals_ann_search_on_flat(n_excluded):
    index, x = _flat()
    rng = np.random.default_rng(n_excluded)
    RowMap(index).remove(np.arange(10, 30))                    # tombstones in the way
    for i in range(20):
        excluded = rng.choice(np.arange(10, 510), n_excluded).astype(np.int64)  # duplicates too
        scores, ids = search_one(index, x[i], 10, excluded)
        want_s, want_i = ann.search(index, x[i:i + 1], 10, exclude=[excluded])
        keep = want_i[0] >= 0
        np.testing.assert_array_equal(ids, want_i[0][keep])
        np.testing.assert_allclose(scores, want_s[0][keep], rtol=1e-5)
        assert not set(ids.tolist()) & (set(excluded.tolist()) | set(range(10, 30)))


def test_short_index_returns_what_is_allowed():
    index, x = _flat(n=12)
    scores, ids = search_one(index, x[0], 10, np.arange(10, 15, dtype=np.int64))
    assert sorted(ids.tolist()) == list(range(15, 22)) and len(scores) == 7
