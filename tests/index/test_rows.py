"""index.rows.RowMap: O(1) presence, delete and overwrite agree with index.ann on every factory."""
from __future__ import annotations

import numpy as np
import pytest

from index import ann
from index.rows import RowMap

FACTORIES = ["Flat", "HNSW8", "IVF4,Flat"]


def _index(factory: str, n: int = 300, d: int = 8):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids = np.arange(n, dtype=np.int64) * 3 + 100
    return ann.build(x, ids, factory, use_gpu=False), x, ids


@pytest.mark.parametrize("factory", FACTORIES)
def test_presence_delete_overwrite(factory):
    index, x, ids = _index(factory)
    rows = RowMap(index)
    assert all(rows.contains(i) for i in ids[:20]) and not rows.contains(101)
    assert not rows.contains(-5)
    np.testing.assert_allclose(rows.vector(int(ids[7])), x[7], rtol=1e-6)
    assert rows.remove(np.array([ids[7], ids[8], 99999])) == 2
    assert not rows.contains(ids[7]) and rows.vector(int(ids[7])) is None
    assert rows.remove(np.array([ids[7]])) == 0
    assert ann.ntotal(index) == len(ids) - 2
    new = -x[9:10]
    assert rows.add(new, np.array([ids[9]])) == 1              # overwrite
    np.testing.assert_allclose(rows.vector(int(ids[9])), new[0], rtol=1e-6)
    assert rows.add(x[7:8], np.array([ids[7]])) == 0           # re-add a deleted id
    assert rows.add(x[0:1], np.array([5])) == 0                # a new id
    assert rows.contains(ids[7]) and rows.contains(5)
    live = set(ann.live_ids(index).tolist())
    assert live == (set(ids.tolist()) - {int(ids[8])}) | {5}
    mask = ann.contains(index, np.array(sorted(live | {int(ids[8]), 101})))
    assert [rows.contains(i) for i in sorted(live | {int(ids[8]), 101})] == mask.tolist()


@pytest.mark.parametrize("factory", FACTORIES)
def test_searches_never_return_removed_or_stale_rows(factory):
    index, x, ids = _index(factory)
    rows = RowMap(index)
    gone = ids[:50]
    rows.remove(gone)
    rows.add(-x[50:60], ids[50:60])                            # overwritten: old rows stale
    if "IVF" in factory:
        ann.set_search_params(index, nprobe=4)
    _, got = ann.search(index, x[:60], 10)
    assert not set(got.ravel().tolist()) & set(gone.tolist())
    assert (np.bincount(got[got >= 0].ravel() - 100) <= 60).all()
    scores, top = ann.search(index, -x[50:51], 1)
    assert top[0, 0] == ids[50] and scores[0, 0] == pytest.approx(1.0, abs=1e-5)


def test_saved_index_keeps_tombstones(tmp_path):
    index, _, ids = _index("HNSW8")
    RowMap(index).remove(ids[:3])
    ann.save(index, tmp_path / "items.faiss")
    again = ann.load(tmp_path / "items.faiss", use_gpu=False)
    rows = RowMap(again)
    assert not any(rows.contains(i) for i in ids[:3]) and rows.contains(ids[3])
    assert ann.n_deleted(again) == 3 and not ann.contains(again, ids[:3]).any()
