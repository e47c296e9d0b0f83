"""The next training dataset: a base dataset directory plus the store's online items and feedback.

`write_training_dataset(store, base, out)` writes `out/` in the dataset format (DESIGN.md §4; the
reader is train/data.py, which this module does not import): the base `<name>.inter` plus one row
per new (user, item) pair recorded online, `items.tsv` with the base's items updated by online
upserts and deletes (images written under `online_images/`, base images hard-linked or copied),
and `events.json` naming the watermark: the last event id the dataset includes. Events up to the
base's own watermark (a dataset written here earlier) are not applied twice.

Policy (documented in docs/events.md):
- upserts set an item's text and image (the latest wins); a delete removes the item from
  items.tsv and drops its rows recorded before the delete, base rows included;
- a pair the base or an earlier event already holds is not repeated (the format refuses
  duplicates); rating is 1 and timestamp the recorded time;
- split: `crc32("user:item") % 10` gives 0-7 train, 8 valid, 9 test, except that a pair is train
  when its item or its user has no training row yet, so every item with feedback becomes a warm
  item and no user is left with valid/test rows only (MMRec would drop them).
Precomputed `image_feat.npy` / `text_feat.npy` are carried over only when no item was added,
changed or deleted (they would no longer line up).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

from index.atomic import write_bytes, write_text
from index.events.records import DELETE, INTERACTIONS, UPSERT, Event, StoreError
from index.events.store import SQLStore

log = logging.getLogger(__name__)

MARKER = "events.json"
ONLINE_IMAGES = "online_images"
FEATURES = ("image_feat.npy", "text_feat.npy")


@dataclass
class DatasetSummary:
    """What write_training_dataset wrote."""

    path: str
    watermark: int
    base: str
    base_watermark: int
    store: str
    items_upserted: int = 0
    items_deleted: int = 0
    rows_added: int = 0
    rows_dropped: int = 0
    duplicates: int = 0
    splits: dict[str, int] = field(default_factory=lambda: {"train": 0, "valid": 0, "test": 0})


def dataset_watermark(path: Path) -> int:
    """The watermark recorded in a dataset directory (0 for a dataset not written here)."""
    marker = Path(path) / MARKER
    return int(json.loads(marker.read_text())["watermark"]) if marker.is_file() else 0


def find_inter(path: Path) -> Path:
    """The single `<name>.inter` of a dataset directory (same rule as train/data.py)."""
    preferred = path / f"{path.name}.inter"
    if preferred.is_file():
        return preferred
    found = sorted(path.glob("*.inter"))
    if len(found) != 1:
        raise ValueError(f"{path}: expected exactly one *.inter file, found {len(found)}")
    return found[0]


def choose_base(store: SQLStore, base: Path) -> Path:
    """`base`, or the dataset a compaction recorded when the store no longer holds what base
    lacks; StoreError when neither covers the compacted events."""
    compacted = int(store.meta("compacted_through", "0"))
    if compacted <= dataset_watermark(base):
        return base
    recorded = store.meta("base_dataset")
    if recorded and Path(recorded).is_dir() and dataset_watermark(Path(recorded)) >= compacted:
        log.info("store compacted through event %d: building on %s instead of %s", compacted,
                 recorded, base)
        return Path(recorded)
    raise StoreError(f"{store.display} was compacted through event {compacted}, but {base} "
                     f"includes events only through {dataset_watermark(base)}: use the dataset "
                     f"the live bundle was trained on (its events.json) as the base")


class _Builder:
    """Accumulates the base dataset and the events in memory, then writes the directory."""

    def __init__(self, base: Path, summary: DatasetSummary):
        self.base, self.summary = base, summary
        self.inter = find_inter(base)
        lines = self.inter.read_text(encoding="utf-8").splitlines()
        self.header = lines[0].rstrip("\r\n").split("\t")
        cols = {c: i for i, c in enumerate(self.header)}
        self.iu, self.ii, self.il = cols["userID"], cols["itemID"], cols["x_label"]
        self.rows = [(line.split("\t"), 0) for line in lines[1:] if line.strip()]
        self.pairs = {(int(r[self.iu]), int(r[self.ii])) for r, _ in self.rows}
        self.train_items = {int(r[self.ii]) for r, _ in self.rows if r[self.il] == "0"}
        self.train_users = {int(r[self.iu]) for r, _ in self.rows if r[self.il] == "0"}
        self.items = self._read_items()
        self.images: dict[int, bytes] = {}
        self.deleted_at: dict[int, int] = {}

    def _read_items(self) -> dict[int, tuple[str, str]]:
        """itemID -> (text, image path relative to the base) from items.tsv, if any."""
        path = self.base / "items.tsv"
        if not path.is_file():
            return {}
        out = {}
        for line in path.read_text(encoding="utf-8").splitlines()[1:]:
            if line.strip():
                item, text, image = (line.split("\t") + ["", ""])[:3]
                out[int(item)] = (text, image)
        return out

    def apply(self, event: Event) -> None:
        """Fold one event into the dataset being built."""
        if event.kind == UPSERT:
            self.items[event.item_id] = (_clean(event.text), "")
            self.images[event.item_id] = event.image
            self.summary.items_upserted += 1
        elif event.kind == DELETE:
            self.items.pop(event.item_id, None)
            self.images.pop(event.item_id, None)
            self.deleted_at[event.item_id] = event.id
            self.pairs = {p for p in self.pairs if p[1] != event.item_id}
            self.train_items.discard(event.item_id)
            self.summary.items_deleted += 1
        elif event.kind == INTERACTIONS:
            for item, stamp in zip(event.item_ids.tolist(), event.timestamps.tolist()):
                self._interaction(event, int(item), int(stamp))

    def _interaction(self, event: Event, item: int, stamp: int) -> None:
        """Append one new (user, item) row with its split label."""
        user = int(event.user_id)
        if (user, item) in self.pairs:
            self.summary.duplicates += 1
            return
        label = _split(user, item)
        if item not in self.train_items or user not in self.train_users:
            label = 0
        if label == 0:
            self.train_items.add(item)
            self.train_users.add(user)
        row = [""] * len(self.header)
        row[self.iu], row[self.ii], row[self.il] = str(user), str(item), str(label)
        for name, value in (("rating", "1"), ("timestamp", str(stamp))):
            if name in self.header:
                row[self.header.index(name)] = value
        self.rows.append((row, event.id))
        self.pairs.add((user, item))
        self.summary.rows_added += 1
        self.summary.splits[("train", "valid", "test")[label]] += 1

    def write(self, out: Path) -> None:
        """Write the dataset files into `out` (a fresh directory)."""
        kept = [r for r, at in self.rows if self.deleted_at.get(int(r[self.ii]), -1) < at]
        self.summary.rows_dropped = len(self.rows) - len(kept)
        lines = ["\t".join(self.header)] + ["\t".join(r) for r in kept]
        (out / self.inter.name).write_text("\n".join(lines) + "\n", encoding="utf-8")
        items = ["itemID\ttext\timage"]
        for item in sorted(self.items):
            text, image = self.items[item]
            if item in self.images:
                image = self._online_image(out, item, self.images[item])
            elif image:
                _link(self.base / image, out / image)
            items.append(f"{item}\t{text}\t{image}")
        (out / "items.tsv").write_text("\n".join(items) + "\n", encoding="utf-8")
        s = self.summary
        if not (s.items_upserted or s.items_deleted):
            for name in FEATURES:
                if (self.base / name).is_file():
                    _link(self.base / name, out / name)

    def _online_image(self, out: Path, item: int, data: bytes) -> str:
        """Write an upserted image; returns its relative path ("" for no image)."""
        if not data:
            return ""
        rel = f"{ONLINE_IMAGES}/{item}.{_image_suffix(data)}"
        write_bytes(out / rel, data)
        return rel


def _clean(text: str) -> str:
    """Item text on one TSV line."""
    return " ".join(text.replace("\t", " ").split())


def _split(user: int, item: int) -> int:
    """0 train, 1 valid, 2 test from a stable hash of the pair (8:1:1)."""
    bucket = zlib.crc32(f"{user}:{item}".encode()) % 10
    return 0 if bucket < 8 else (1 if bucket == 8 else 2)


def _image_suffix(data: bytes) -> str:
    """File suffix of encoded image bytes (by signature)."""
    for magic, suffix in ((b"\x89PNG", "png"), (b"\xff\xd8", "jpg"), (b"GIF8", "gif"),
                          (b"BM", "bmp")):
        if data.startswith(magic):
            return suffix
    return "webp" if data[8:12] == b"WEBP" else "img"


def _link(src: Path, dst: Path) -> None:
    """Hard-link src to dst (copy across file systems)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def write_training_dataset(store: SQLStore, base: str | Path, out: str | Path,
                           through: int | None = None) -> DatasetSummary:
    """Write base + events (base watermark, through] into `out`; the summary holds the watermark."""
    base, out = Path(base), Path(out)
    base = choose_base(store, base)
    through = store.head() if through is None else through
    start = dataset_watermark(base)
    summary = DatasetSummary(path=str(out), watermark=max(through, start), base=str(base),
                             base_watermark=start, store=store.display)
    builder = _Builder(base, summary)
    position, skipped = start, []
    while position < through:
        batch = store.read(position, through)
        if batch.last_id <= position:
            break
        for event in batch.events:
            builder.apply(event)
        skipped += batch.skipped
        position = batch.last_id
    if skipped:
        log.error("%d damaged events were skipped: %s", len(skipped), skipped[:20])
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty")
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex}")
    tmp.mkdir(parents=True)
    try:
        builder.write(tmp)
        write_text(tmp / MARKER, json.dumps(asdict(summary) | {"skipped": skipped}, indent=2))
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("training dataset %s: base %s + events %d..%d: %d items upserted, %d deleted, "
             "%d rows added (%s), %d duplicates", out, base, start + 1, through,
             summary.items_upserted, summary.items_deleted, summary.rows_added, summary.splits,
             summary.duplicates)
    return summary

