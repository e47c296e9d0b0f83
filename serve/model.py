"""One loaded bundle, ready to answer: user vectors, FAISS index, popularity, seen items, encoder.

Recommend (DESIGN.md §8): a known user's vector, blended with the items the user interacted with
since the bundle (RecordInteractions; serve.online.blend documents the blend), is searched in the
index with the user's training items (the seen CSR), the recorded items and the request's
exclusions filtered inside the search (`index.ann.search(exclude=...)`, an IDSelector), never by
over-fetching. An unknown user gets, when `recent_item_ids` are given or interactions were
recorded and some are in the index, the mean of their vectors (read back with `reconstruct`) as
the query; otherwise the most popular training items, minus exclusions and deleted items. The
response says which source answered.

Bundle files beyond the index (contract with the exporter): `users.npy` float32 (U, d) with
`user_ids.npy` int64 (U,) naming its rows; `item_ids.npy` int64 (I,); `popularity.npy` (I,)
interaction counts aligned with item_ids (optional: without it the fallback follows item_ids
order); `seen_indptr.npy` int64 (U+1,) and `seen_items.npy` int64 item ids, a CSR over the user
rows (optional: without them nothing is "seen").

Mutation (upsert/delete) takes the write side of a readers-writer lock, searches the read side;
both are O(1) (index.rows.RowMap: presence from an id -> row map, deletes tombstone in place).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import NamedTuple

import numpy as np

from index import ann
from index import bundle as files
from index.bundle import Bundle, BundleError, check_contents
from index.query import search_one
from index.rows import RowMap
from index.preprocess import DEFAULT_MAX_ASPECT, DEFAULT_MAX_PIXELS, ImageSpec
from serve.encoder import ItemEncoder
from serve.errors import AlreadyExists, FailedPrecondition, NotFound
from serve.limits import Query
from serve.online import FoldIn, Interactions, blend
from serve.rwlock import RWLock

log = logging.getLogger(__name__)

USER, RECENT, POPULAR = "user_vector", "recent_items", "popularity"
NEAREST = "nearest"  # ServingModel.nearest, not a Recommend source


@dataclass(frozen=True)
class Recommendation:
    """Ranked items for one query and where they came from."""

    item_ids: np.ndarray     # (n,) int64, n <= k
    scores: np.ndarray       # (n,) float32
    source: str              # USER, RECENT or POPULAR
    reason: str = ""         # why a fallback answered ("" for USER)
    recent_used: int = 0     # recorded / recent items folded into the query


class Plan(NamedTuple):
    """How recommend answers a query (ServingModel.plan)."""

    vector: np.ndarray | None    # (d,) float32 query; None: the popularity fallback answers
    excluded: np.ndarray         # (E,) int64 ids filtered out of the search
    source: str                  # USER, RECENT or POPULAR
    reason: str
    used: int                    # recorded / recent items folded into the query


def _ids_and_order(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted ids and the rows they come from, for O(log U) lookups."""
    order = np.argsort(ids, kind="stable")
    return ids[order], order


def load_image_spec(bundle: Bundle) -> ImageSpec:
    """The image preprocessing spec: preprocess.json if listed, else the manifest's fields."""
    enc = bundle.manifest.encoder
    if enc.preprocess_file:
        return ImageSpec.model_validate(bundle.read_json(enc.preprocess_file))
    if enc.interpolation == "nearest":
        raise BundleError("nearest interpolation is not supported without a preprocess.json")
    return ImageSpec(size=(enc.image_size, enc.image_size), mean=enc.mean, std=enc.std,
                     interpolation=enc.interpolation, resize_mode=enc.resize_mode)


def load_encoder(bundle: Bundle, threads: int = 1,
                 max_pixels: int = DEFAULT_MAX_PIXELS,
                 max_aspect: float | None = DEFAULT_MAX_ASPECT) -> ItemEncoder | None:
    """The bundle's cold-start encoder, or None when it ships no towers and no attributes."""
    m, enc = bundle.manifest, bundle.manifest.encoder
    if enc is None or (enc.image_encoder is None and enc.text_encoder is None
                       and enc.attributes_file is None):
        return None
    image = bundle.file(enc.image_encoder) if enc.image_encoder else None
    text = bundle.file(enc.text_encoder) if enc.text_encoder else None
    tok = bundle.file(enc.tokenizer_file) if enc.tokenizer_file else None
    encoder = ItemEncoder.from_files(
        m.dim, m.normalized, image_onnx=image, image_spec=load_image_spec(bundle) if image else None,
        text_onnx=text, tokenizer_json=tok, context_length=enc.context_length,
        text_inputs=enc.text_inputs, threads=threads,
        attributes_json=bundle.file(enc.attributes_file) if enc.attributes_file else None,
        attributes_head=bundle.file(enc.attributes_head) if enc.attributes_head else None)
    encoder.max_pixels, encoder.max_aspect = max_pixels, max_aspect
    return encoder


class ServingModel:
    """A bundle in memory with recommend / encode / insert / remove."""

    def __init__(self, bundle: Bundle, users: np.ndarray, user_ids: np.ndarray, index,
                 item_ids: np.ndarray, popularity: np.ndarray, seen: tuple | None,
                 encoder: ItemEncoder | None, fold_in: FoldIn | None = None):
        self.bundle, self.manifest = bundle, bundle.manifest
        self.fold_in = fold_in or FoldIn()
        self.watermark = self.position = bundle.manifest.event_watermark
        self.online = Interactions(self.fold_in.per_user)
        self.users, self.index, self.encoder = users, index, encoder
        self._user_sorted, self._user_rows = _ids_and_order(user_ids)
        order = np.argsort(-popularity, kind="stable")
        self._pop_ids = item_ids[order]
        self._pop_scores = popularity[order].astype(np.float32)
        self._seen = seen
        self._lock = RWLock()
        self.rows = RowMap(index)  # O(1) presence, deletes and overwrites (index.rows)
        self._deleted: set[int] = set()
        self._deleted_arr: np.ndarray | None = np.empty(0, dtype=np.int64)  # None: stale
        self.n_items = ann.ntotal(index)
        self.upserts = self.deletes = 0
        self.loaded_at = datetime.now(timezone.utc)

    @classmethod
    def from_bundle(cls, bundle: Bundle, encoder_threads: int = 1,
                    max_pixels: int = DEFAULT_MAX_PIXELS,
                    max_aspect: float | None = DEFAULT_MAX_ASPECT, fold_in: FoldIn | None = None) -> ServingModel:
        """Load and cross-check every serving file of a verified bundle."""
        index = ann.load(bundle.file(files.ITEMS_INDEX), use_gpu=False)
        check_contents(bundle, index)  # the checks publish(verify=True) runs
        users = np.ascontiguousarray(bundle.load_npy(files.USERS), dtype=np.float32)
        user_ids = bundle.load_npy(files.USER_IDS).astype(np.int64)
        item_ids = (bundle.load_npy(files.ITEM_IDS).astype(np.int64) if bundle.has(files.ITEM_IDS)
                    else ann.live_ids(index))
        popularity = (bundle.load_npy(files.POPULARITY).astype(np.float64)
                      if bundle.has(files.POPULARITY) else np.zeros(len(item_ids)))
        seen = None
        if bundle.has(files.SEEN_INDPTR) and bundle.has(files.SEEN_ITEMS):
            seen = (bundle.load_npy(files.SEEN_INDPTR).astype(np.int64),
                    bundle.load_npy(files.SEEN_ITEMS).astype(np.int64))
        encoder = load_encoder(bundle, encoder_threads, max_pixels, max_aspect)
        return cls(bundle, users, user_ids, index, item_ids, popularity, seen, encoder, fold_in)

    @property
    def version(self) -> int:
        """Bundle version N of vN."""
        return self.manifest.version

    def user_row(self, user_id: int) -> int | None:
        """Row of a user in users.npy, or None for an unknown user."""
        pos = int(np.searchsorted(self._user_sorted, user_id))
        if pos < len(self._user_sorted) and self._user_sorted[pos] == user_id:
            return int(self._user_rows[pos])
        return None

    def seen_items(self, row: int) -> np.ndarray:
        """Training items of the user at `row` (empty without a seen CSR)."""
        if self._seen is None:
            return np.empty(0, dtype=np.int64)
        indptr, items = self._seen
        return items[indptr[row]:indptr[row + 1]]

    def recommend(self, q: Query) -> Recommendation:
        """Top-k for a validated query: user vector (with fold-in), recent items or popularity."""
        plan = self.plan(q)
        if plan.vector is None:
            return self._popular(q.k, plan.excluded, plan.reason)
        rec = self._search(plan.vector, q.k, plan.excluded, plan.source, plan.reason)
        return Recommendation(rec.item_ids, rec.scores, plan.source, plan.reason, plan.used)

    def plan(self, q: Query) -> Plan:
        """What recommend(q) searches with: the query vector (None: popularity answers), the
        excluded ids, the source and reason, and how many recent items were folded in."""
        row = self.user_row(q.user_id)
        recorded = self.online.items(q.user_id)  # (R,) oldest first
        if row is not None:
            parts = [self.seen_items(row), recorded, q.exclude] if q.exclude_seen else [q.exclude]
            parts = [p for p in parts if len(p)]
            excluded = (parts[0] if len(parts) == 1 else np.concatenate(parts) if parts
                        else q.exclude)
            recent, used = self._fold_in(recorded[-self.fold_in.items:]) if len(recorded) else (
                None, 0)
            vec = blend(self.users[row], recent, used, self.fold_in, self.manifest.user_groups)
            return Plan(vec, excluded, USER, "", used)
        recent = np.concatenate([q.recent, recorded[-self.fold_in.items:]])
        excluded = np.concatenate([q.recent, recorded, q.exclude]) if q.exclude_seen else q.exclude
        if not len(recent):
            return Plan(None, excluded, POPULAR, "unknown user", 0)
        vec, used = self._fold_in(recent)
        if vec is None:
            return Plan(None, excluded, POPULAR, "unknown user; no recent item is in the index", 0)
        return Plan(vec, excluded, RECENT, f"unknown user; mean of {used} recent item vectors",
                    used)

    def nearest(self, vec: np.ndarray, k: int, exclude: np.ndarray | None = None
                ) -> Recommendation:
        """The k live items nearest to a (d,) vector (inner product), minus `exclude`."""
        excluded = np.empty(0, np.int64) if exclude is None else exclude
        return self._search(np.asarray(vec, dtype=np.float32), k, excluded, NEAREST)

    def item_vector(self, item_id: int) -> np.ndarray | None:
        """The (d,) vector of a live item, or None when it is not in the index."""
        with self._lock.read():
            return self.rows.vector(int(item_id))

    @property
    def user_ids(self) -> np.ndarray:
        """The ids of the users the bundle knows, sorted (U,) int64."""
        return self._user_sorted

    def _search(self, vec: np.ndarray, k: int, excluded: np.ndarray, source: str,
                reason: str = "") -> Recommendation:
        """Filtered top-k of one (d,) query vector."""
        with self._lock.read():
            scores, ids = search_one(self.index, vec, k, excluded)  # (n,), n <= k
        return Recommendation(ids, scores, source, reason)

    def _fold_in(self, recent: np.ndarray) -> tuple[np.ndarray | None, int]:
        """Mean vector of the recent items present in the index, and how many there were."""
        with self._lock.read():
            vectors = [v for v in map(self.rows.vector, np.unique(recent).tolist())
                       if v is not None]
        if not vectors:
            return None, 0
        vec = np.mean(vectors, axis=0).astype(np.float32)  # (d,)
        norm = float(np.linalg.norm(vec))
        if self.manifest.normalized and norm > 0:
            vec /= norm
        return vec, len(vectors)

    def _popular(self, k: int, excluded: np.ndarray, reason: str) -> Recommendation:
        """Most popular training items, minus exclusions and deleted items."""
        deleted = self._deleted_arr
        if deleted is None:
            with self._lock.read():  # the set changes under the write lock
                deleted = np.fromiter(self._deleted, np.int64, len(self._deleted))
            self._deleted_arr = deleted
        banned = np.union1d(excluded, deleted)
        head = self._pop_ids[:k + len(banned)]
        keep = ~np.isin(head, banned)
        return Recommendation(head[keep][:k], self._pop_scores[:len(head)][keep][:k], POPULAR,
                              reason)

    def require_encoder(self) -> ItemEncoder:
        """The encoder, or FailedPrecondition when the bundle has none."""
        if self.encoder is None:
            raise FailedPrecondition(f"bundle v{self.version} has no item encoders; "
                                     "EncodeItem and UpsertItem are unavailable")
        return self.encoder

    def encode(self, image: bytes, text: str) -> np.ndarray:
        """Vector of a raw item (no side effects)."""
        return self.require_encoder().encode(image, text)

    def has_item(self, item_id: int) -> bool:
        """Whether the item is live in the index (O(log N) through the RowMap)."""
        with self._lock.read():
            return self._has(item_id)

    def _has(self, item_id: int) -> bool:
        """has_item without taking the lock."""
        return self.rows.contains(item_id)

    def insert(self, item_id: int, vec: np.ndarray, overwrite: bool) -> bool:
        """Add an item vector; returns whether it replaced one (AlreadyExists unless overwrite)."""
        with self._lock.write():
            present = self._has(item_id)
            if present and not overwrite:
                raise AlreadyExists(f"item {item_id} is already in the index; set overwrite")
            self.rows.add(vec[None], np.array([item_id], dtype=np.int64))
            if item_id in self._deleted:
                self._deleted.discard(item_id)
                self._deleted_arr = None
            self.n_items += 0 if present else 1
            self.upserts += 1
        return present

    def remove(self, item_id: int) -> None:
        """Delete an item from the index; NotFound when it is not there."""
        with self._lock.write():
            if self.rows.remove(np.array([item_id], dtype=np.int64)) == 0:
                raise NotFound(f"item {item_id} is not in the index")
            self._deleted.add(item_id)
            self._deleted_arr = None
            self.n_items -= 1
            self.deletes += 1

    def smoke(self) -> None:
        """Answer one query (and encode a blank item); raise if anything looks wrong."""
        user = int(self._user_sorted[0]) if len(self._user_sorted) else 0
        k = min(10, max(1, self.n_items))
        rec = self.recommend(Query(user, k, np.empty(0, np.int64), False, np.empty(0, np.int64)))
        if self.n_items and (not len(rec.item_ids) or not np.isfinite(rec.scores).all()):
            raise BundleError(f"smoke query for user {user} returned {rec}")
        if self.encoder is not None:
            vec = self.encoder.encode_blank()
            if vec.shape != (self.manifest.dim,) or not np.isfinite(vec).all():
                raise BundleError(f"smoke encode returned shape {vec.shape} or non-finite values")

    def info(self) -> dict:
        """Manifest summary plus live state, for GetModelInfo."""
        m = self.manifest
        return dict(
            model_version=m.version, created=m.created.isoformat(), source_run=m.source_run,
            config_hash=m.config_hash, backbone=m.backbone, dim=m.dim, metric=m.metric,
            normalized=m.normalized, faiss_factory=m.faiss_factory,
            search_params=ann.get_search_params(self.index), users=m.counts.users,
            items=m.counts.items, index_items=self.n_items, cold_start=self.encoder is not None,
            metrics=dict(m.metrics), loaded_at=self.loaded_at.isoformat(), upserts=self.upserts,
            deletes=self.deletes, user_groups=m.user_groups, event_watermark=self.watermark,
            store_position=self.position, online_users=len(self.online),
            online_interactions=self.online.total)
