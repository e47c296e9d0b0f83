"""Item texts and images for the inspection page, read from an MMRec-format catalogue directory.

    DIR/items.tsv    header `itemID<TAB>text<TAB>image` (other columns ignored), one item a line;
                     `image` is a path relative to DIR (empty: no image)

The format is the one training reads (train/data.py); this reader is torch-free and separate
because serve/ never imports train/. Errors name `file:line`. An image path that is absolute or
resolves (symlinks followed) outside DIR is refused when the catalogue loads, and every read
resolves the path again, so nothing outside DIR is ever served. A listed image that is missing on
disk, unreadable, over the size limit or not a PNG, JPEG, GIF or WebP is "no image" (the page
shows a placeholder); SVG is never served from the catalogue (it can carry script).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

ITEMS_FILE = "items.tsv"
REQUIRED = ("itemID", "text", "image")
MAX_IMAGE_BYTES = 16 * 1024 * 1024
_MAGIC = ((b"\x89PNG\r\n\x1a\n", "image/png"), (b"\xff\xd8\xff", "image/jpeg"),
          (b"GIF87a", "image/gif"), (b"GIF89a", "image/gif"))


class CatalogueError(ValueError):
    """A catalogue directory or items.tsv that cannot be used (the message names file:line)."""


@dataclass(frozen=True)
class Entry:
    """One catalogue item: its text and its image path inside the catalogue (None: no image)."""

    text: str
    image: Path | None


def image_type(head: bytes) -> str | None:
    """The content type of PNG, JPEG, GIF or WebP bytes (from their signature), else None."""
    for magic, kind in _MAGIC:
        if head.startswith(magic):
            return kind
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    return None


def _header(path: Path, line: str) -> dict[str, int]:
    """Column positions of the header line, which must name the required columns."""
    cols = line.rstrip("\r\n").split("\t")
    missing = [c for c in REQUIRED if c not in cols]
    if missing:
        raise CatalogueError(f"{path}:1: header lacks column(s) {', '.join(missing)}; "
                             f"expected {' '.join(REQUIRED)} separated by tabs, got {cols}")
    return {c: i for i, c in enumerate(cols)}


def _item_id(path: Path, lineno: int, value: str) -> int:
    """A non-negative integer itemID, or a located error."""
    try:
        item = int(value)
    except ValueError:
        raise CatalogueError(f"{path}:{lineno}: itemID is not an integer: {value!r}") from None
    if item < 0:
        raise CatalogueError(f"{path}:{lineno}: itemID is negative: {item}")
    return item


def _inside(root: Path, rel: str) -> Path | None:
    """`root/rel` resolved, or None when rel is absolute or the result lies outside root."""
    if not rel or Path(rel).is_absolute():
        return None
    full = (root / rel).resolve()
    return full if full.is_relative_to(root) else None


def parse_items(path: Path, root: Path) -> dict[int, Entry]:
    """{item id: Entry} of an items.tsv whose image paths are relative to `root` (resolved)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise CatalogueError(f"cannot read {path}: {err}") from err
    if not lines or not lines[0].strip():
        raise CatalogueError(f"{path}:1: missing header (expected {' '.join(REQUIRED)})")
    cols = _header(path, lines[0])
    out: dict[int, Entry] = {}
    for lineno, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != len(cols):
            raise CatalogueError(f"{path}:{lineno}: expected {len(cols)} tab-separated fields, "
                                 f"got {len(parts)} (a text must not contain tabs)")
        item = _item_id(path, lineno, parts[cols["itemID"]].strip())
        if item in out:
            raise CatalogueError(f"{path}:{lineno}: duplicate itemID {item}")
        rel = parts[cols["image"]].strip()
        image = _inside(root, rel)
        if rel and image is None:
            raise CatalogueError(f"{path}:{lineno}: image path {rel!r} is outside the "
                                 f"catalogue directory {root}")
        out[item] = Entry(parts[cols["text"]].strip(), image)
    return out


class Catalogue:
    """Texts and images by item id; `image` re-checks every path at read time."""

    def __init__(self, root: Path, entries: dict[int, Entry]):
        self.root, self.entries = root, entries

    @classmethod
    def load(cls, directory: Path | str) -> Catalogue:
        """Read DIR/items.tsv; CatalogueError when it is missing or does not parse."""
        root = Path(directory).resolve()
        if not root.is_dir():
            raise CatalogueError(f"catalogue directory {directory} does not exist")
        path = root / ITEMS_FILE
        if not path.is_file():
            raise CatalogueError(f"{path} does not exist (the catalogue needs an items.tsv with "
                                 f"columns {' '.join(REQUIRED)})")
        entries = parse_items(path, root)
        missing = sum(1 for e in entries.values() if e.image is not None and not e.image.is_file())
        log.info("catalogue %s: %d items, %d without an image, %d images missing on disk", root,
                 len(entries), sum(1 for e in entries.values() if e.image is None), missing)
        return cls(root, entries)

    @classmethod
    def empty(cls) -> Catalogue:
        """No catalogue: every item shows its id and a placeholder."""
        return cls(Path("."), {})

    def __len__(self) -> int:
        return len(self.entries)

    def text(self, item_id: int) -> str | None:
        """The item's text, or None when the catalogue does not list the item."""
        entry = self.entries.get(item_id)
        return None if entry is None else entry.text

    def has_image(self, item_id: int) -> bool:
        """Whether the item's image file exists inside the catalogue directory now."""
        return self._path(item_id) is not None

    def image(self, item_id: int, max_bytes: int = MAX_IMAGE_BYTES) -> tuple[bytes, str] | None:
        """(bytes, content type) of the item's image, or None (no, missing, too big or not an
        image type the page serves)."""
        path = self._path(item_id)
        if path is None:
            return None
        try:
            if path.stat().st_size > max_bytes:
                return None
            data = path.read_bytes()
        except OSError:
            return None
        kind = image_type(data[:16])
        return None if kind is None else (data, kind)

    def _path(self, item_id: int) -> Path | None:
        """The image file, resolved again (a symlink swapped since loading cannot escape)."""
        entry = self.entries.get(item_id)
        if entry is None or entry.image is None:
            return None
        full = entry.image.resolve()
        return full if full.is_relative_to(self.root) and full.is_file() else None
