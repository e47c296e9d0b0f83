"""index.ann against numpy brute force: exactness, recall, exclusion, deletes, persistence."""
from __future__ import annotations

import time

import faiss
import numpy as np
import pytest

from index import ann

FACTORIES = ["Flat", "HNSW32", "IVF32,Flat"]


def clustered(n: int, d: int, centres: int, noise: float, seed: int) -> np.ndarray:
    """L2-normalised points around fixed N(0, I) centres (same centres for any seed)."""
    c = np.random.default_rng(12345).standard_normal((centres, d)).astype(np.float32)
    rng = np.random.default_rng(seed)
    x = c[rng.integers(0, centres, n)] + noise * rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def brute(x: np.ndarray, ids: np.ndarray, q: np.ndarray, k: int,
          excluded: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k of one query by inner product, skipping excluded ids."""
    keep = np.ones(len(ids), bool) if excluded is None else ~np.isin(ids, excluded)
    scores = x[keep] @ q  # (N',)
    top = np.argsort(-scores, kind="stable")[:k]
    return scores[top], ids[keep][top]


pytestmark = pytest.mark.usefixtures("one_omp_thread")


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    """3000 clustered 32-d vectors with sparse, shuffled int64 ids."""
    x = clustered(3000, 32, 60, 0.5, seed=0)
    ids = np.random.default_rng(1).choice(10**9, size=3000, replace=False).astype(np.int64)
    return x, ids


def test_flat_equals_brute_force(data):
    x, ids = data
    index = ann.build(x, ids, "Flat")
    q = clustered(40, 32, 60, 0.5, seed=2)
    scores, got = ann.search(index, q, 10)
    for row in range(len(q)):
        want_s, want_i = brute(x, ids, q[row], 10)
        np.testing.assert_array_equal(got[row], want_i)
        np.testing.assert_allclose(scores[row], want_s, rtol=1e-5, atol=1e-5)


def test_hnsw_recall_at_20_on_100k():
    x = clustered(100_000, 64, 1500, 0.35, seed=3)
    ids = np.arange(100_000, dtype=np.int64) * 7 + 3
    q = clustered(200, 64, 1500, 0.35, seed=4)
    start = time.perf_counter()
    index = ann.build(x, ids, "HNSW32")
    build_s = time.perf_counter() - start
    ann.set_search_params(index, ef_search=64)
    _, truth = ann.search(ann.build(x, ids, "Flat"), q, 20)
    _, got = ann.search(index, q, 20)
    recall = np.mean([len(np.intersect1d(a, b)) / 20 for a, b in zip(got, truth)])
    print(f"HNSW32 100k x 64: build {build_s:.1f} s, recall@20 {recall:.4f} at efSearch 64")
    assert recall >= 0.95


@pytest.mark.parametrize("factory", FACTORIES + ["PQ8x4"])
def test_exclusion_inside_search(data, factory):
    x, ids = data
    index = ann.build(x, ids, factory)
    rng = np.random.default_rng(5)
    q = clustered(60, 32, 60, 0.5, seed=6)
    _, unfiltered = ann.search(index, q, 20)
    exclude = []
    for row in range(len(q)):
        if row % 6 == 0:
            exclude.append(None)
            continue
        top = unfiltered[row][: rng.integers(1, 20)]
        extra = rng.choice(ids, size=rng.integers(0, 800), replace=False)
        ex = np.concatenate([top, extra])
        exclude.append(set(ex.tolist()) if row % 2 else ex)
    scores, got = ann.search(index, q, 20, exclude=exclude)
    for row in range(len(q)):
        ex = np.array(sorted(exclude[row] if exclude[row] is not None else []), dtype=np.int64)
        assert not np.isin(got[row], ex).any()
        assert len(set(got[row].tolist())) == 20
        if factory == "Flat":
            want_s, want_i = brute(x, ids, q[row], 20, ex)
            np.testing.assert_array_equal(got[row], want_i)
            np.testing.assert_allclose(scores[row], want_s, rtol=1e-5, atol=1e-5)


def test_overfetch_path_for_selectorless_index(data):
    """IndexPQ (like GPU indexes) rejects selectors: over-fetch and host filtering instead."""
    x, ids = data
    index = ann.build(x, ids, "PQ8x4")
    assert not ann._supports_selector(ann._inner(index))
    assert ann.remove(index, ids[:50]) == 50 and ann.n_deleted(index) == 50
    exclude = [ids[50:60]] * 20 + [None] * 20
    _, got = ann.search(index, x[:40], 20, exclude=exclude)
    assert not np.isin(got, ids[:60]).any() and (got >= 0).all()


def test_hnsw_selector_respected_with_default_bounded_queue(data):
    """faiss#5504: bounded_queue=False makes HNSW ignore the selector; our path keeps True."""
    x, ids = data
    index = ann.build(x, ids, "HNSW32")
    for row in range(50):
        _, got = ann.search(index, x[row:row + 1], 5, exclude=[ids[row:row + 1]])
        assert ids[row] not in got[0]
        assert (got[0] >= 0).all()
    inner = ann._inner(index)
    params = ann._params(inner, faiss.IDSelectorRange(0, 1))
    assert isinstance(params, faiss.SearchParametersHNSW) and params.bounded_queue
    assert params.efSearch == inner.hnsw.efSearch == ann.DEFAULT_EF_SEARCH


@pytest.mark.parametrize("factory,knob", [("HNSW32", "ef_search"), ("IVF32,Flat", "nprobe")])
def test_filtered_search_keeps_tuned_effort(factory, knob):
    """SearchParametersHNSW/IVF default to efSearch 16 / nprobe 1 unless we copy the index's."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((4000, 32)).astype(np.float32)
    ids = np.arange(4000, dtype=np.int64)
    index = ann.build(x, ids, factory)
    ann.set_search_params(index, **{knob: 32 if knob == "nprobe" else 512})
    q = rng.standard_normal((30, 32)).astype(np.float32)
    _, truth = ann.search(ann.build(x, ids, "Flat"), q, 10, exclude=[[999_999]] * len(q))
    _, got = ann.search(index, q, 10, exclude=[[999_999]] * len(q))
    recall = np.mean([len(np.intersect1d(a, b)) / 10 for a, b in zip(got, truth)])
    assert recall >= 0.97


@pytest.mark.parametrize("factory", FACTORIES)
def test_tiny_allowed_set_is_exact_and_padded(data, factory):
    x, ids = data
    index = ann.build(x[:800], ids[:800], factory)
    allowed = ids[[3, 50, 400, 401, 799]]
    exclude = [np.setdiff1d(ids[:800], allowed), ids[:800]]
    scores, got = ann.search(index, x[:2], 20, exclude=exclude)
    assert set(got[0][:5].tolist()) == set(allowed.tolist())
    assert (got[0][5:] == -1).all() and np.isneginf(scores[0][5:]).all()
    assert (got[1] == -1).all() and np.isneginf(scores[1]).all()
    assert np.all(np.diff(scores[0][:5]) <= 0)


@pytest.mark.parametrize("factory", FACTORIES)
def test_add_remove_save_load_round_trip(data, factory, tmp_path):
    x, ids = data
    index = ann.build(x[:2000], ids[:2000], factory)
    gone = ids[:100]
    assert ann.remove(index, gone) == 100
    assert ann.remove(index, gone) == 0
    assert ann.remove(index, np.array([123, -7])) == 0
    assert ann.ntotal(index) == 1900
    assert not ann.contains(index, gone).any() and ann.contains(index, ids[100:2000]).all()
    assert not ann.contains(index, np.array([-2, -3, -50])).any()
    ann.add(index, x[2000:2500], ids[2000:2500])
    ann.add(index, x[150:160], ids[150:160])  # upsert: replaces, never duplicates
    assert ann.ntotal(index) == 2400
    assert sorted(ann.live_ids(index)) == sorted(ids[100:2500])
    q = x[:300]
    _, got = ann.search(index, q, 20, exclude=[ids[120:125]] * len(q))
    assert not np.isin(got, gone).any() and not np.isin(got, ids[120:125]).any()
    for row in got:
        assert len(set(row.tolist())) == len(row)
    _, self_hit = ann.search(index, x[2000:2050], 1)
    assert np.mean(self_hit[:, 0] == ids[2000:2050]) >= 0.95
    path = tmp_path / "items.faiss"
    ann.save(index, path)
    assert [p.name for p in tmp_path.iterdir()] == ["items.faiss"]
    loaded = ann.load(path)
    assert ann.ntotal(loaded) == 2400 and ann.n_deleted(loaded) == ann.n_deleted(index)
    assert ann.get_search_params(loaded) == ann.get_search_params(index)
    np.testing.assert_array_equal(ann.search(loaded, q, 20)[1], ann.search(index, q, 20)[1])
    compacted = ann.compact(loaded)
    assert ann.n_deleted(compacted) == 0 and compacted.ntotal == 2400
    _, again = ann.search(compacted, q, 20)
    assert not np.isin(again, gone).any()
    if factory == "Flat":
        np.testing.assert_array_equal(again, ann.search(index, q, 20)[1])


def test_search_params_and_validation(data):
    x, ids = data
    hnsw = ann.build(x, ids, "HNSW16")
    ann.set_search_params(hnsw, ef_search=40)
    assert ann.get_search_params(hnsw) == {"efSearch": 40}
    ivf = ann.build(x, ids, "IVF16,Flat")
    ann.set_search_params(ivf, nprobe=4)
    assert ann.get_search_params(ivf) == {"nprobe": 4}
    flat = ann.build(x, ids, "Flat")
    with pytest.raises(ValueError):
        ann.set_search_params(flat, ef_search=10)
    with pytest.raises(ValueError):
        ann.set_search_params(hnsw, nprobe=10)
    with pytest.raises(ValueError):
        ann.build(x, -ids, "Flat")
    with pytest.raises(ValueError):
        ann.build(x[:2], np.array([5, 5]), "Flat")
    with pytest.raises(ValueError):
        ann.build(x, ids, "IDMap2,Flat")
    with pytest.raises(ValueError):
        ann.search(flat, x[:, :8], 5)
    with pytest.raises(ValueError):
        ann.search(flat, x[:3], 5, exclude=[None])


def test_empty_index_and_k_above_size(data):
    x, ids = data
    empty = ann.build(np.empty((0, 32), np.float32), np.empty(0, np.int64), "Flat")
    scores, got = ann.search(empty, x[:2], 5)
    assert (got == -1).all() and np.isneginf(scores).all()
    small = ann.build(x[:3], ids[:3], "HNSW32")
    _, got = ann.search(small, x[:1], 10)
    assert sorted(got[0][:3]) == sorted(ids[:3]) and (got[0][3:] == -1).all()


@pytest.mark.parametrize("num_gpus", [0, 1])
def test_gpu_request_falls_back_to_cpu(data, monkeypatch, num_gpus):
    """No usable GPU here: use_gpu=True must still give a working CPU index."""
    x, ids = data

    def forbidden(*args, **kwargs):
        raise AssertionError("index_cpu_to_all_gpus must never be used")

    monkeypatch.setattr(faiss, "get_num_gpus", lambda: num_gpus)
    monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", forbidden, raising=False)
    for factory in ("Flat", "IVF16,Flat"):
        index = ann.build(x, ids, factory, use_gpu=True)
        assert not ann._on_gpu(ann._inner(index))
        _, got = ann.search(index, x[:5], 1)
        assert (got[:, 0] == ids[:5]).all()
