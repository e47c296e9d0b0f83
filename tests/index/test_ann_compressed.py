"""index.ann on compressed factories (IVF-SQ8, IVF-PQ with a refine step, OPQ) for large
catalogues."""
from __future__ import annotations

import numpy as np
import pytest

from index import ann
from tests.index.test_ann import clustered

COMPRESSED = ["IVF16,SQ8", "IVF16,PQ8x4,Refine(SQ8)", "IVF16,PQ8x4,RFlat", "OPQ8,IVF16,PQ8x4"]


pytestmark = pytest.mark.usefixtures("one_omp_thread")


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """10,000 clustered 32-d items with sparse shuffled ids, and 100 queries."""
    x = clustered(10_000, 32, 60, 0.5, seed=10)
    ids = np.random.default_rng(11).choice(10**9, size=10_000, replace=False).astype(np.int64)
    return x, ids, clustered(100, 32, 60, 0.5, seed=12)


@pytest.fixture(scope="module")
def truth(data) -> np.ndarray:
    """Exact top-20 ids of the queries."""
    x, ids, q = data
    return ann.search(ann.build(x, ids, "Flat"), q, 20)[1]


def recall(got: np.ndarray, want: np.ndarray) -> float:
    """Mean fraction of the true top-k found."""
    return float(np.mean([len(np.intersect1d(a, b)) / want.shape[1] for a, b in zip(got, want)]))


@pytest.mark.parametrize("factory", COMPRESSED)
def test_round_trip_add_remove_save_load(data, factory, tmp_path):
    x, ids, q = data
    index = ann.build(x[:8000], ids[:8000], factory)
    gone = ids[:200]
    assert ann.remove(index, gone) == 200 and ann.ntotal(index) == 7800
    ann.add(index, x[8000:], ids[8000:])
    ann.add(index, x[300:310], ids[300:310])  # upsert: replaces, never duplicates
    assert ann.ntotal(index) == 9800 and sorted(ann.live_ids(index)) == sorted(ids[200:])
    ann.set_search_params(index, nprobe=16)
    _, got = ann.search(index, q, 20, exclude=[ids[250:260]] * len(q))
    assert not np.isin(got, gone).any() and not np.isin(got, ids[250:260]).any()
    assert all(len(set(row.tolist())) == 20 for row in got)
    path = tmp_path / "items.faiss"
    ann.save(index, path)
    loaded = ann.load(path)
    assert type(ann._inner(loaded)) is type(ann._inner(index))
    assert ann.get_search_params(loaded) == ann.get_search_params(index)
    assert ann.ntotal(loaded) == 9800 and ann.n_deleted(loaded) == 210  # 200 removed, 10 upserted
    np.testing.assert_array_equal(ann.search(loaded, q, 20)[1], ann.search(index, q, 20)[1])
    compacted = ann.compact(loaded)
    assert ann.n_deleted(compacted) == 0 and compacted.ntotal == 9800
    assert not np.isin(ann.search(compacted, q, 20)[1], gone).any()


@pytest.mark.parametrize("factory,floor", [("IVF16,SQ8", 0.9), ("IVF16,PQ8x4,Refine(SQ8)", 0.9),
                                           ("IVF16,PQ8x4,RFlat", 0.95)])
def test_recall_against_flat(data, truth, factory, floor):
    """All lists probed, so only the codes cost recall; a refine step (k_factor 8) wins it back."""
    x, ids, q = data
    index = ann.build(x, ids, factory)
    ann.set_search_params(index, nprobe=16)
    if "Refine" in factory or "RFlat" in factory:
        ann.set_search_params(index, k_factor=8)
    got = recall(ann.search(index, q, 20)[1], truth)
    assert got >= floor, f"{factory}: recall@20 {got:.3f}"


@pytest.mark.parametrize("factory", ["IVF16,PQ8x4,Refine(SQ8)", "IVF16,PQ8x4,RFlat"])
def test_k_factor_knob(data, truth, factory, tmp_path):
    x, ids, q = data
    index = ann.build(x, ids, factory)
    assert ann.get_search_params(index) == {"k_factor": ann.DEFAULT_K_FACTOR,
                                            "nprobe": ann.DEFAULT_NPROBE}
    ann.set_search_params(index, k_factor=1)
    low = recall(ann.search(index, q, 20)[1], truth)
    ann.set_search_params(index, k_factor=8)
    high = recall(ann.search(index, q, 20)[1], truth)
    assert high > low + 0.05
    ann.save(index, tmp_path / "items.faiss")
    assert ann.get_search_params(ann.load(tmp_path / "items.faiss"))["k_factor"] == 8
    with pytest.raises(ValueError):
        ann.set_search_params(index, k_factor=0)
    with pytest.raises(ValueError):
        ann.set_search_params(ann.build(x, ids, "IVF16,SQ8"), k_factor=4)
