"""Item id -> row of a live IDMap2 index, so presence, deletes and overwrites cost O(1).

`index.ann.contains` scans the id table and `ann.remove` rebuilds IDMap2's reverse map (O(N):
56 ms per delete at 1M items, under the write lock every search waits on). A serving index keeps
a `RowMap` instead: the bundle's ids sorted once at load (O(log N) lookups, 16 bytes per item) plus
a dict of the rows added since (online upserts). The index's own id table stays the truth: a row
answers for an id only while `id_map[row] == id`, so a tombstone (`-2 - row`, as `ann.remove`
writes) or a newer row for the id makes the old entry dead without touching the sorted arrays.
`remove` tombstones in place for every index type (CPU Flat too, where `ann.remove` compacts), and
does not rebuild FAISS's reverse map: use `vector(id)`, not `index.reconstruct(id)`, for items a
RowMap has removed. Searches filter tombstones as for `ann.remove` (`ann.search`); `ann.compact`
drops them. Mutations must not overlap searches (hold the model's write lock, as for `ann`).
"""
from __future__ import annotations

import faiss
import numpy as np

from index.ann import _as_ids, _as_vectors, _id_map


class RowMap:
    """Live rows of one IDMap2 index by external id."""

    def __init__(self, index: faiss.Index):
        self.index = index
        table = _id_map(index)
        order = np.argsort(table, kind="stable")
        self._ids = table[order].copy()            # (N,) sorted, tombstones (negative) first
        self._rows = order.astype(np.int64)        # (N,) row of each sorted id
        self._added: dict[int, int] = {}           # id -> row, for rows added after load

    def row(self, item_id: int) -> int | None:
        """The live row of an id, or None."""
        item_id = int(item_id)
        if item_id < 0:
            return None
        row = self._added.get(item_id)
        if row is None:
            pos = int(np.searchsorted(self._ids, item_id))
            if pos == len(self._ids) or self._ids[pos] != item_id:
                return None
            row = int(self._rows[pos])
        return row if self.index.id_map.at(row) == item_id else None

    def contains(self, item_id: int) -> bool:
        """Whether the id is live."""
        return self.row(item_id) is not None

    def vector(self, item_id: int) -> np.ndarray | None:
        """The stored (d,) vector of a live id, or None."""
        row = self.row(item_id)
        return None if row is None else self.index.index.reconstruct(row)

    def remove(self, ids: np.ndarray) -> int:
        """Tombstone the live ones among ids (O(1) each); returns how many were live."""
        removed = 0
        for item_id in np.unique(np.atleast_1d(np.asarray(ids, dtype=np.int64))).tolist():
            row = self.row(item_id)
            if row is not None:
                _id_map(self.index)[row] = -2 - row
                self._added.pop(item_id, None)
                removed += 1
        return removed

    def add(self, vectors: np.ndarray, ids: np.ndarray) -> int:
        """Insert vectors; ids already live are replaced (their old rows tombstoned); returns how
        many were replaced."""
        x = _as_vectors(vectors, self.index.d)
        ids = _as_ids(ids, len(x))
        replaced = self.remove(ids)
        first = int(self.index.ntotal)
        if len(x):
            self.index.add_with_ids(x, ids)
        for offset, item_id in enumerate(ids.tolist()):
            self._added[item_id] = first + offset
        return replaced
