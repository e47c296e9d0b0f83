"""Dataset layer for MMRec-compatible directories: `<name>.inter` plus optional `items.tsv`.

Format (DESIGN.md §4): `<name>.inter` is a TSV with header holding at least `userID itemID x_label`
(0 train, 1 valid, 2 test); `items.tsv` is a TSV with header `itemID text image`, the image being a
path relative to the dataset directory. Every problem is reported as `file:line: problem`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

REQUIRED_INTER = ("userID", "itemID", "x_label")
REQUIRED_ITEMS = ("itemID", "text", "image")
SPLITS = {"train": 0, "valid": 1, "test": 2}


class DatasetError(ValueError):
    """A dataset file is malformed; the message names the file and line."""


@dataclass
class ItemTable:
    """Item content indexed by item id; empty text / None image mean missing content."""

    texts: list[str]
    images: list[Path | None]

    @property
    def missing_text(self) -> int:
        """Number of items without text."""
        return sum(1 for t in self.texts if not t)

    @property
    def missing_image(self) -> int:
        """Number of items without an image."""
        return sum(1 for p in self.images if p is None)


@dataclass
class Dataset:
    """Interactions split into train/valid/test as (E, 2) int64 arrays of [user, item]."""

    name: str
    path: Path
    n_users: int
    n_items: int
    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray
    items: ItemTable | None = None
    dropped_rows: int = 0
    features: dict[str, np.ndarray] = field(default_factory=dict)

    def split(self, name: str) -> np.ndarray:
        """Return the (E, 2) pairs of one split by name."""
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; expected one of {sorted(SPLITS)}")
        return getattr(self, name)

    @cached_property
    def train_csr(self) -> tuple[np.ndarray, np.ndarray]:
        """Training items per user as CSR (indptr (U+1,), indices sorted within each row)."""
        return to_csr(self.train, self.n_users)

    @cached_property
    def train_items(self) -> np.ndarray:
        """Unique items that occur in the training split (MMRec's negative pool)."""
        return np.unique(self.train[:, 1])

    def summary(self) -> str:
        """One line describing sizes and density."""
        dens = len(self.train) / max(1, self.n_users * self.n_items)
        return (f"{self.name}: {self.n_users} users, {self.n_items} items, train/valid/test "
                f"{len(self.train)}/{len(self.valid)}/{len(self.test)}, train density {dens:.5f}")


def to_csr(pairs: np.ndarray, n_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Group (E, 2) [row, col] pairs into CSR arrays with sorted columns per row."""
    order = np.lexsort((pairs[:, 1], pairs[:, 0]))
    rows, cols = pairs[order, 0], pairs[order, 1]
    indptr = np.zeros(n_rows + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=n_rows), out=indptr[1:])
    return indptr, cols.astype(np.int64)


def find_inter_file(path: Path) -> Path:
    """Locate the single `<name>.inter` file of a dataset directory."""
    if not path.is_dir():
        raise DatasetError(f"{path}: dataset directory does not exist")
    preferred = path / f"{path.name}.inter"
    if preferred.is_file():
        return preferred
    found = sorted(path.glob("*.inter"))
    if len(found) != 1:
        raise DatasetError(f"{path}: expected exactly one *.inter file, found {len(found)}")
    return found[0]


def _read_header(path: Path, lines: list[str], required: tuple[str, ...]) -> dict[str, int]:
    """Map column names to positions, checking the required ones are present."""
    if not lines or not lines[0].strip():
        raise DatasetError(f"{path}:1: missing header (expected columns {', '.join(required)})")
    cols = lines[0].rstrip("\r\n").split("\t")
    missing = [c for c in required if c not in cols]
    if missing:
        raise DatasetError(f"{path}:1: header lacks column(s) {', '.join(missing)}; got {cols}")
    return {c: i for i, c in enumerate(cols)}


def _parse_int(path: Path, lineno: int, column: str, value: str) -> int:
    """Parse a non-negative integer field or raise a located error."""
    try:
        out = int(value)
    except ValueError:
        raise DatasetError(f"{path}:{lineno}: {column} is not an integer: {value!r}") from None
    if out < 0:
        raise DatasetError(f"{path}:{lineno}: {column} is negative: {out}")
    return out


def read_inter(path: Path) -> np.ndarray:
    """Parse an .inter file into an (E, 3) int64 array of [user, item, x_label]."""
    lines = path.read_text(encoding="utf-8").splitlines()
    cols = _read_header(path, lines, REQUIRED_INTER)
    iu, ii, il = cols["userID"], cols["itemID"], cols["x_label"]
    rows = []
    for lineno, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != len(cols):
            raise DatasetError(f"{path}:{lineno}: expected {len(cols)} tab-separated fields, "
                               f"got {len(parts)}")
        u = _parse_int(path, lineno, "userID", parts[iu])
        i = _parse_int(path, lineno, "itemID", parts[ii])
        x = _parse_int(path, lineno, "x_label", parts[il])
        if x not in (0, 1, 2):
            raise DatasetError(f"{path}:{lineno}: x_label must be 0, 1 or 2, got {x}")
        rows.append((u, i, x, lineno))
    if not rows:
        raise DatasetError(f"{path}: no interactions")
    arr = np.asarray(rows, dtype=np.int64)
    _check_duplicates(path, arr)
    return arr[:, :3]


def _check_duplicates(path: Path, arr: np.ndarray) -> None:
    """Refuse a (user, item) pair that occurs twice, naming both lines."""
    keys = arr[:, 0] * (int(arr[:, 1].max()) + 1) + arr[:, 1]
    order = np.argsort(keys, kind="stable")
    dup = np.nonzero(keys[order][1:] == keys[order][:-1])[0]
    if len(dup):
        first, second = arr[order[dup[0]]], arr[order[dup[0] + 1]]
        raise DatasetError(f"{path}:{second[3]}: duplicate interaction user {second[0]} item "
                           f"{second[1]} (first seen on line {first[3]})")


def read_items(path: Path, root: Path) -> dict[int, tuple[str, Path | None]]:
    """Parse items.tsv into {item id: (text, resolved image path or None)}."""
    lines = path.read_text(encoding="utf-8").splitlines()
    cols = _read_header(path, lines, REQUIRED_ITEMS)
    root = root.resolve()
    out: dict[int, tuple[str, Path | None]] = {}
    for lineno, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != len(cols):
            raise DatasetError(f"{path}:{lineno}: expected {len(cols)} tab-separated fields, "
                               f"got {len(parts)} (text must not contain tabs)")
        item = _parse_int(path, lineno, "itemID", parts[cols["itemID"]])
        if item in out:
            raise DatasetError(f"{path}:{lineno}: duplicate itemID {item}")
        out[item] = (parts[cols["text"]].strip(), _image_path(path, lineno, root,
                                                              parts[cols["image"]].strip()))
    return out


def _image_path(path: Path, lineno: int, root: Path, rel: str) -> Path | None:
    """Resolve an image path inside the dataset directory; empty means no image."""
    if not rel:
        return None
    full = (root / rel).resolve()
    if Path(rel).is_absolute() or not full.is_relative_to(root):
        raise DatasetError(f"{path}:{lineno}: image path {rel!r} escapes the dataset directory")
    if not full.is_file():
        raise DatasetError(f"{path}:{lineno}: image file {rel!r} does not exist")
    return full


def load_dataset(path: Path | str, load_items: bool = True) -> Dataset:
    """Load and validate a dataset directory (MMRec semantics for ids and cold users)."""
    path = Path(path)
    inter_path = find_inter_file(path)
    arr = read_inter(inter_path)
    content = None
    items_path = path / "items.tsv"
    if load_items and items_path.is_file():
        content = read_items(items_path, path)
    n_users = int(arr[:, 0].max()) + 1
    n_items = int(arr[:, 1].max()) + 1
    if content:
        n_items = max(n_items, max(content) + 1)
    train = arr[arr[:, 2] == 0, :2]
    if len(train) == 0:
        raise DatasetError(f"{inter_path}: no training rows (x_label 0)")
    has_train = np.zeros(n_users, dtype=bool)
    has_train[train[:, 0]] = True
    splits, dropped = {}, 0
    for name, label in (("valid", 1), ("test", 2)):
        rows = arr[arr[:, 2] == label, :2]
        keep = has_train[rows[:, 0]]
        dropped += int((~keep).sum())
        splits[name] = rows[keep]
    if dropped:
        log.warning("%s: dropped %d valid/test rows of users without training rows", inter_path,
                    dropped)
    items = _item_table(content, n_items) if content is not None else None
    ds = Dataset(name=inter_path.stem, path=path, n_users=n_users, n_items=n_items, train=train,
                 valid=splits["valid"], test=splits["test"], items=items, dropped_rows=dropped)
    ds.features = load_features(path, n_items)
    return ds


def _item_table(content: dict[int, tuple[str, Path | None]], n_items: int) -> ItemTable:
    """Lay item content out by id; items absent from items.tsv have no content."""
    texts, images = [""] * n_items, [None] * n_items
    for item, (text, image) in content.items():
        texts[item], images[item] = text, image
    table = ItemTable(texts=texts, images=images)
    log.info("items.tsv: %d items, %d without text, %d without image", n_items,
             table.missing_text, table.missing_image)
    return table


def load_features(path: Path, n_items: int) -> dict[str, np.ndarray]:
    """Load optional precomputed MMRec features `image_feat.npy` / `text_feat.npy`."""
    out = {}
    for modality in ("image", "text"):
        f = path / f"{modality}_feat.npy"
        if not f.is_file():
            continue
        feat = np.load(f, allow_pickle=False)
        if feat.ndim != 2 or feat.shape[0] != n_items:
            raise DatasetError(f"{f}: expected shape ({n_items}, d), got {feat.shape}")
        out[modality] = feat.astype(np.float32, copy=False)
    return out
