"""Inner-product ANN over item vectors: pure functions around one FAISS index object.

Structure. Every index is `IndexIDMap2(index_factory(d, factory, IP))`, so any factory ("Flat",
"HNSW32", "IVF1024,Flat", ...) takes arbitrary non-negative int64 item ids and returns them, and
`reconstruct(id)` works (IDMap2, unlike IDMap, keeps the reverse map; IVF inners get a direct map).
Default effort is set at build (efSearch 128, nprobe 16, refine k_factor 4) and persisted in the
file by FAISS. Compressed factories for large catalogues work the same way: "IVF4096,SQ8",
"IVF4096,PQ16,Refine(SQ8)" / "...,RFlat" (IndexRefine: the PQ scan keeps k_factor * k candidates,
re-scored by the refine codes) and "OPQ16,IVF4096,PQ16" (IndexPreTransform). Training uses a
seeded sample of at most max(TRAIN_MIN, TRAIN_PER_LIST * nlist) vectors, never the whole catalogue.

Deletes. HNSW has no `remove_ids`, and IDMap2 over IVF cannot remove either (IVF keeps its internal
ids, so IDMap2's compaction would desynchronise). So CPU Flat removes physically (O(N) compaction)
and every other index tombstones: the row's external id in `id_map` becomes `-2 - row`, a value no
real id takes. The tombstone lives inside the index (survives save/load), and re-adding the id
cannot resurrect the stale row. Searches filter tombstones with `IDSelectorRange(0, 2**63-1)`;
`compact()` rebuilds without them (rebuild when `n_deleted` passes a few percent; for SQ/PQ codes
without a Flat refine it re-encodes decoded vectors, a small extra loss). `add` is an
upsert: ids already present are removed first, so an id is never returned twice.

Filtering. Per-query exclusions (seen items) run inside the search as
`IDSelectorAnd(live, IDSelectorNot(IDSelectorBatch(excluded)))` on external ids (IDMap2 translates
the selector to rows). The SearchParameters class must match the inner index and carry its current
effort: `SearchParametersHNSW()` defaults to efSearch 16 and `SearchParametersIVF()` to nprobe 1,
silently overriding tuned values. `bounded_queue` keeps its default True: with False, faiss HNSW
ignores the selector (faiss#5504, still in 1.15.1). Unfiltered queries skip the selector and are
redone with it only if a tombstone shows up. When an approximate search returns fewer than k (a
tiny allowed set starves HNSW, faiss#4727) the query is answered exactly over the allowed rows if
at most `EXACT_FALLBACK_MAX`; otherwise missing results are padded with id -1 and score -inf.

GPU policy. With `use_gpu` None or True and `faiss.get_num_gpus() > 0`, Flat and IVF inners move
to GPU 0 via `index_cpu_to_gpu` (HNSW stays on CPU). With no GPU the index stays on CPU;
`index_cpu_to_all_gpus` is never used (with no GPU it returns an unusable empty IndexReplicas).
GPU indexes ignore IDSelectors (faiss#3114, #3924), so there, and for inners that reject selectors
(IndexPQ, pre-transforms such as OPQ, refine steps), searches over-fetch k + |excluded| + tombstones (at most 2048 on GPU) and
filter on the host. `save` always writes the CPU form.

Concurrency. CPU searches may run concurrently; add/remove/compact must not overlap them
(faiss#1216): hold a write lock or swap in a modified copy. GPU indexes are not safe for concurrent
readers (faiss#367). For single-query serving set `faiss.omp_set_num_threads(1)`: OpenMP start-up
costs more than the search. Never `downcast_index` an owned object: its temporary owner frees it.
"""
from __future__ import annotations

import logging
from pathlib import Path

import faiss
import numpy as np

from index.atomic import atomic_path
from index.gpu import on_gpu as _on_gpu, to_cpu as _to_cpu, to_gpu as _to_gpu

log = logging.getLogger(__name__)

DEFAULT_EF_SEARCH = 128
DEFAULT_NPROBE = 16
DEFAULT_K_FACTOR = 4
EXACT_FALLBACK_MAX = 65536
GPU_MAX_K = 2048
TRAIN_PER_LIST = 64
TRAIN_MIN = 65536
_MAX_ID = np.iinfo(np.int64).max


def _inner(index: faiss.Index) -> faiss.Index:
    """The concrete index wrapped by our IDMap2 (a borrowed view: keep `index` alive)."""
    return faiss.downcast_index(index.index)


def _id_map(index: faiss.Index) -> np.ndarray:
    """Writable numpy view of the IDMap2 row -> external id table (do not keep it across adds)."""
    n = index.id_map.size()
    return faiss.rev_swig_ptr(index.id_map.data(), n) if n else np.empty(0, dtype=np.int64)


def _as_vectors(vectors: np.ndarray, d: int | None = None) -> np.ndarray:
    """Validate and convert to a C-contiguous float32 (N, d) matrix."""
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    if x.ndim != 2 or (d is not None and x.shape[1] != d):
        raise ValueError(f"vectors must have shape (N, {d or 'd'}), got {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("vectors contain NaN or inf")
    return x


def _as_ids(ids: np.ndarray, n: int) -> np.ndarray:
    """Validate item ids: n unique non-negative int64 values."""
    out = np.ascontiguousarray(ids, dtype=np.int64)
    if out.shape != (n,):
        raise ValueError(f"ids must have shape ({n},), got {out.shape}")
    if n and out.min() < 0:
        raise ValueError("ids must be non-negative")
    if len(np.unique(out)) != n:
        raise ValueError("ids must be unique")
    return out


def _enable_direct_map(inner: faiss.Index) -> None:
    """Give a CPU IVF index a row -> vector map so rows can be reconstructed."""
    ivf = faiss.try_extract_index_ivf(inner)
    if ivf is not None and not _on_gpu(inner) and ivf.direct_map.no():
        ivf.make_direct_map()


def _training_sample(inner: faiss.Index, x: np.ndarray) -> np.ndarray:
    """At most TRAIN_PER_LIST vectors per IVF list (and TRAIN_MIN overall), drawn reproducibly."""
    ivf = faiss.try_extract_index_ivf(inner)
    cap = max(TRAIN_MIN, TRAIN_PER_LIST * (ivf.nlist if ivf is not None else 0))
    if len(x) <= cap:
        return x
    rows = np.sort(np.random.default_rng(0).choice(len(x), size=cap, replace=False))
    return x[rows]


def build(vectors: np.ndarray, ids: np.ndarray, factory: str,
          use_gpu: bool | None = None) -> faiss.Index:
    """Inner-product index over (N, d) vectors with external int64 ids (trained on a sample)."""
    x = _as_vectors(vectors)
    ids = _as_ids(ids, len(x))
    inner = faiss.index_factory(x.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    if isinstance(inner, faiss.IndexIDMap):
        raise ValueError(f"factory {factory!r}: leave out IDMap, build() adds IDMap2 itself")
    if not inner.is_trained:
        if len(x) == 0:
            raise ValueError(f"factory {factory!r} needs training vectors")
        inner.train(_training_sample(inner, x))
    _enable_direct_map(inner)
    index = faiss.IndexIDMap2(inner)
    _set_defaults(_inner(index))
    index = _to_gpu(index, use_gpu)
    if len(x):
        index.add_with_ids(x, ids)
    log.info("built %s index: %d x %d", factory, len(x), x.shape[1])
    return index


def _set_defaults(inner: faiss.Index) -> None:
    """Default search effort: efSearch for HNSW, nprobe for IVF, k_factor for a refine step."""
    if isinstance(inner, faiss.IndexRefine):
        inner.k_factor = DEFAULT_K_FACTOR
    if isinstance(inner, faiss.IndexHNSW):
        inner.hnsw.efSearch = DEFAULT_EF_SEARCH
    ivf = faiss.try_extract_index_ivf(inner)
    if ivf is not None:
        ivf.nprobe = min(DEFAULT_NPROBE, ivf.nlist)


def set_search_params(index: faiss.Index, ef_search: int | None = None,
                      nprobe: int | None = None, k_factor: int | None = None) -> None:
    """Set HNSW efSearch, IVF nprobe and/or refine k_factor; ValueError if there is no such knob."""
    inner = _inner(index)
    if k_factor is not None:
        if not isinstance(inner, faiss.IndexRefine) or k_factor < 1:
            raise ValueError(f"k_factor >= 1 applies to refine indexes, not {type(inner).__name__}")
        inner.k_factor = int(k_factor)
    if ef_search is not None:
        if not isinstance(inner, faiss.IndexHNSW):
            raise ValueError(f"ef_search applies to HNSW indexes, not {type(inner).__name__}")
        inner.hnsw.efSearch = int(ef_search)
    if nprobe is not None:
        ivf = inner if _on_gpu(inner) else faiss.try_extract_index_ivf(inner)
        if ivf is None or not hasattr(ivf, "nprobe"):
            raise ValueError(f"nprobe applies to IVF indexes, not {type(inner).__name__}")
        ivf.nprobe = int(nprobe)


def get_search_params(index: faiss.Index) -> dict[str, int]:
    """Current efSearch / nprobe / k_factor of the index (empty for Flat)."""
    inner = _inner(index)
    if isinstance(inner, faiss.IndexHNSW):
        return {"efSearch": int(inner.hnsw.efSearch)}
    out = {"k_factor": int(inner.k_factor)} if isinstance(inner, faiss.IndexRefine) else {}
    ivf = inner if _on_gpu(inner) else faiss.try_extract_index_ivf(inner)
    if ivf is not None and hasattr(ivf, "nprobe"):
        out["nprobe"] = int(ivf.nprobe)
    return out


def contains(index: faiss.Index, ids: np.ndarray) -> np.ndarray:
    """Boolean mask: which of `ids` are live in the index (O(N) scan of the id table)."""
    ids = np.atleast_1d(np.asarray(ids, dtype=np.int64))
    table = _id_map(index)
    if len(ids) <= 8:
        found = np.array([bool((table == i).any()) for i in ids], dtype=bool)
    else:
        found = np.isin(ids, table)
    return found & (ids >= 0)  # negative values are tombstones, never item ids


def ntotal(index: faiss.Index) -> int:
    """Number of live (not deleted) vectors."""
    return int(index.ntotal) - n_deleted(index)


def n_deleted(index: faiss.Index) -> int:
    """Number of tombstoned rows still occupying space (see compact)."""
    return int(np.count_nonzero(_id_map(index) < 0))


def live_ids(index: faiss.Index) -> np.ndarray:
    """External ids of all live vectors, in row order."""
    table = _id_map(index)
    return table[table >= 0].copy()


def add(index: faiss.Index, vectors: np.ndarray, ids: np.ndarray) -> None:
    """Insert vectors; ids already present are replaced (upsert)."""
    x = _as_vectors(vectors, index.d)
    ids = _as_ids(ids, len(x))
    present = contains(index, ids)
    if present.any():
        remove(index, ids[present])
    if len(x):
        index.add_with_ids(x, ids)


def remove(index: faiss.Index, ids: np.ndarray) -> int:
    """Delete ids (physically for CPU Flat, by tombstone otherwise); returns how many were live."""
    ids = np.unique(np.atleast_1d(np.asarray(ids, dtype=np.int64)))
    ids = ids[ids >= 0]
    if len(ids) == 0 or index.ntotal == 0:
        return 0
    inner = _inner(index)
    if isinstance(inner, faiss.IndexFlat) and not _on_gpu(inner):
        return int(index.remove_ids(ids))
    table = _id_map(index)
    rows = np.flatnonzero(np.isin(table, ids))
    if len(rows):
        table[rows] = -2 - rows
        index.construct_rev_map()
    return len(rows)


def compact(index: faiss.Index) -> faiss.Index:
    """A new index holding only the live vectors (drops tombstones); the input is unchanged."""
    cpu = _to_cpu(index)
    table = _id_map(cpu)
    live = table >= 0
    vectors = _inner(cpu).reconstruct_n(0, cpu.ntotal)[live] if cpu.ntotal else None
    fresh = faiss.clone_index(_inner(cpu))
    fresh.reset()
    _enable_direct_map(fresh)
    out = faiss.IndexIDMap2(fresh)
    if vectors is not None and len(vectors):
        out.add_with_ids(np.ascontiguousarray(vectors), table[live].copy())
    return _to_gpu(out, None) if cpu is not index else out


def _exclusion(ex: np.ndarray | set | list | None) -> np.ndarray:
    """One query's excluded ids as a unique int64 array."""
    if ex is None:
        return np.empty(0, dtype=np.int64)
    if isinstance(ex, (set, frozenset)):
        ex = np.fromiter(ex, dtype=np.int64, count=len(ex))
    return np.unique(np.asarray(ex, dtype=np.int64).ravel())


def _supports_selector(inner: faiss.Index) -> bool:
    """Whether the inner index applies an IDSelector during search."""
    return not _on_gpu(inner) and isinstance(
        inner, (faiss.IndexFlat, faiss.IndexHNSW, faiss.IndexIVF))


def _params(inner: faiss.Index, sel: faiss.IDSelector) -> faiss.SearchParameters:
    """SearchParameters of the inner index's own type, carrying its current effort and `sel`."""
    if isinstance(inner, faiss.IndexHNSW):
        return faiss.SearchParametersHNSW(sel=sel, efSearch=inner.hnsw.efSearch)
    if isinstance(inner, faiss.IndexIVF):
        return faiss.SearchParametersIVF(sel=sel, nprobe=inner.nprobe, max_codes=inner.max_codes)
    return faiss.SearchParameters(sel=sel)


def _search_one(index: faiss.Index, inner: faiss.Index, query: np.ndarray, k: int,
                excluded: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Filtered search of one (1, d) query: tombstones and `excluded` never come back."""
    live = faiss.IDSelectorRange(0, _MAX_ID)
    if len(excluded):
        banned = faiss.IDSelectorBatch(excluded)
        allowed = faiss.IDSelectorNot(banned)
        sel = faiss.IDSelectorAnd(live, allowed)
    else:
        sel = live
    params = _params(inner, sel)
    scores, ids = index.search(query, min(k, index.ntotal), params=params)
    return scores[0], ids[0]


def _search_overfetch(index: faiss.Index, query: np.ndarray, k: int,
                      excluded: np.ndarray, deleted: int) -> tuple[np.ndarray, np.ndarray]:
    """Search for more than k without selector, then drop excluded ids and tombstones."""
    fetch = min(index.ntotal, k + len(excluded) + deleted)
    if _on_gpu(_inner(index)):
        fetch = min(fetch, GPU_MAX_K)
    scores, ids = index.search(query, fetch)
    keep = (ids[0] >= 0) & ~np.isin(ids[0], excluded)
    return scores[0][keep][:k], ids[0][keep][:k]


def _search_exact(index: faiss.Index, query: np.ndarray, k: int,
                  excluded: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Brute force over the allowed rows if few; None if too many or not reconstructible."""
    table = _id_map(index)
    live = table >= 0
    if np.count_nonzero(live) - len(excluded) > EXACT_FALLBACK_MAX:  # cheap bound before isin
        return None
    rows = np.flatnonzero(live & ~np.isin(table, excluded))
    if len(rows) > EXACT_FALLBACK_MAX:
        return None
    try:
        vectors = _inner(index).reconstruct_batch(rows) if len(rows) else np.empty((0, index.d))
    except RuntimeError:
        return None
    scores = vectors @ query[0]  # (R,)
    top = np.argsort(-scores, kind="stable")[:k]
    return scores[top].astype(np.float32), table[rows[top]].copy()


def search(index: faiss.Index, queries: np.ndarray, k: int,
           exclude: list[np.ndarray | set] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-k by inner product for (Q, d) queries; per-query exclusions; pads with -1 / -inf."""
    q = _as_vectors(queries, index.d)
    if k < 1 or (exclude is not None and len(exclude) != len(q)):
        raise ValueError(f"need k >= 1 (got {k}) and one exclusion per query (or None)")
    out_scores = np.full((len(q), k), -np.inf, dtype=np.float32)  # (Q, k)
    out_ids = np.full((len(q), k), -1, dtype=np.int64)  # (Q, k)
    if index.ntotal == 0 or len(q) == 0:
        return out_scores, out_ids
    excluded = [_exclusion(exclude[i] if exclude is not None else None) for i in range(len(q))]
    inner = _inner(index)
    exact_ok = not isinstance(inner, faiss.IndexFlat)
    todo = [i for i in range(len(q)) if len(excluded[i])]
    plain = [i for i in range(len(q)) if not len(excluded[i])]
    if plain:
        scores, ids = index.search(q[plain], min(k, index.ntotal))
        for row, i in enumerate(plain):
            short = np.count_nonzero(ids[row] >= 0) < min(k, index.ntotal)
            if (ids[row] < -1).any() or (exact_ok and short):
                todo.append(i)
            else:
                _fill(out_scores[i], out_ids[i], scores[row], ids[row])
    use_selector = _supports_selector(inner)
    deleted = 0 if use_selector or not todo else n_deleted(index)  # O(N) scan: only when needed
    for i in todo:
        query = q[i:i + 1]
        if use_selector:
            scores, ids = _search_one(index, inner, query, k, excluded[i])
        else:
            scores, ids = _search_overfetch(index, query, k, excluded[i], deleted)
        if exact_ok and np.count_nonzero(ids >= 0) < k:
            scores, ids = _search_exact(index, query, k, excluded[i]) or (scores, ids)
        _fill(out_scores[i], out_ids[i], scores, ids)
    return out_scores, out_ids


def _fill(dst_scores: np.ndarray, dst_ids: np.ndarray, scores: np.ndarray,
          ids: np.ndarray) -> None:
    """Copy the valid (id >= 0) results of one query into its padded output row."""
    keep = ids >= 0
    n = int(np.count_nonzero(keep))
    dst_scores[:n] = scores[keep]
    dst_ids[:n] = ids[keep]


def save(index: faiss.Index, path: str | Path) -> None:
    """Write the index (CPU form) atomically: temp file in the same directory, fsync, rename."""
    with atomic_path(path) as tmp:
        faiss.write_index(_to_cpu(index), str(tmp))


def load(path: str | Path, use_gpu: bool | None = None) -> faiss.Index:
    """Read an index written by `save`, optionally moving it to GPU as `build` would."""
    index = faiss.read_index(str(path))
    if not isinstance(index, faiss.IndexIDMap2):
        raise ValueError(f"{path}: expected an IndexIDMap2 written by index.ann, "
                         f"got {type(index).__name__}")
    return _to_gpu(index, use_gpu)
