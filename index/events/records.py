"""Event records of the store: what one row holds, its checksum, and the store's errors.

An event is one acknowledged online write, numbered by the store (`id`, strictly increasing in
commit order, never reused). Three kinds:
- `upsert`: item `item_id` with its raw `image` bytes (possibly empty) and `text`;
- `delete`: item `item_id`;
- `interactions`: user `user_id` interacted with `item_ids` at `timestamps` (Unix seconds, one per
  item), all of one `action` ("interaction" unless the client names one, e.g. "click").
`created` is the server's commit time (Unix seconds). Every row carries a CRC-32 of its canonical
encoding, so a damaged or torn row is detected on read and skipped instead of applied.
"""
from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field

import numpy as np

UPSERT, DELETE, INTERACTIONS = "upsert", "delete", "interactions"
KINDS = (UPSERT, DELETE, INTERACTIONS)
DEFAULT_ACTION = "interaction"


class StoreError(Exception):
    """The event store failed; subclasses say whether a retry can help."""


class StoreUnavailable(StoreError):
    """The store cannot be reached or is busy (database down, lock timeout): retry later."""


class StoreFull(StoreError):
    """The store has no room for the write (disk or quota full)."""


class StoreDamaged(StoreError):
    """The store's files are damaged where a read looked (SQLite: "malformed")."""


def pack_ids(values) -> bytes:
    """Little-endian int64 bytes of an id array."""
    return np.asarray(values, dtype="<i8").tobytes()


def unpack_ids(data: bytes | memoryview | None) -> np.ndarray:
    """The int64 array packed by pack_ids (empty for None)."""
    if not data:
        return np.empty(0, dtype=np.int64)
    return np.frombuffer(bytes(data), dtype="<i8").astype(np.int64)


@dataclass(frozen=True)
class Event:
    """One stored write (id 0 until the store numbers it)."""

    kind: str
    id: int = 0
    created: float = 0.0
    item_id: int | None = None
    text: str = ""
    image: bytes = b""
    user_id: int | None = None
    item_ids: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    timestamps: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    action: str = ""
    request_id: str | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown event kind {self.kind!r}")

    @property
    def size(self) -> int:
        """Payload bytes of the row (image, text, packed ids)."""
        return len(self.image) + len(self.text.encode("utf-8")) + 16 * len(self.item_ids)

    def checksum(self) -> int:
        """CRC-32 of the canonical encoding of every field except id."""
        head = "\x1f".join([self.kind, str(self.item_id), str(self.user_id), self.action,
                            self.request_id or "", repr(float(self.created))]).encode("utf-8")
        crc = zlib.crc32(head)
        for part in (self.text.encode("utf-8"), self.image, pack_ids(self.item_ids),
                     pack_ids(self.timestamps)):
            crc = zlib.crc32(struct.pack("<Q", len(part)), crc)
            crc = zlib.crc32(part, crc)
        return crc


def upsert(item_id: int, image: bytes, text: str, request_id: str | None = None) -> Event:
    """A new upsert event."""
    return Event(UPSERT, item_id=int(item_id), image=bytes(image), text=text,
                 request_id=request_id or None)


def delete(item_id: int, request_id: str | None = None) -> Event:
    """A new delete event."""
    return Event(DELETE, item_id=int(item_id), request_id=request_id or None)


def interactions(user_id: int, item_ids, timestamps, action: str = "",
                 request_id: str | None = None) -> Event:
    """A new interactions event; timestamps must match item_ids one to one."""
    items = np.asarray(item_ids, dtype=np.int64).reshape(-1)
    stamps = np.asarray(timestamps, dtype=np.int64).reshape(-1)
    if stamps.shape != items.shape:
        raise ValueError(f"{len(stamps)} timestamps for {len(items)} items")
    return Event(INTERACTIONS, user_id=int(user_id), item_ids=items, timestamps=stamps,
                 action=action or DEFAULT_ACTION, request_id=request_id or None)


@dataclass
class Batch:
    """Events read in id order, plus the ids of damaged rows that were skipped."""

    events: list[Event]
    skipped: list[int]
    last_id: int          # highest id examined (events and skipped); the read position

    def __len__(self) -> int:
        return len(self.events)
