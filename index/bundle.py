"""Versioned artifact bundles on disk: write, publish, verify, load (DESIGN.md §7).

Layout: `bundles/vN/` holds flat files plus `manifest.json`; `bundles/CURRENT` holds the text
"vN\n" naming the live version. Writes go to `bundles/.tmp-<uuid>/`, every file is hashed and
fsynced, and the directory is renamed into place, so a reader sees a bundle whole or not at all;
if another writer took vN first the rename fails and we take the next number. Publishing replaces
CURRENT through a temp file and `os.replace`. Loading re-hashes every file and refuses missing,
changed or unlisted files with a `BundleError` naming the file. The manifest is covered too:
`manifest.sha256` (`sha256sum` format) holds the digest of manifest.json as written, so an edited
manifest (backbone, metrics, counts, ...) is refused; a bundle without it (written before this
check) is refused with a message naming `seal_manifest`. `publish(verify=True)` runs what the
server's load runs: this verification and `check_contents`, the manifest's fields against the
arrays they describe (counts, dim, ids, popularity, seen CSR, `normalized`). Bundles hold .npy (read with
`allow_pickle=False`), .faiss, .onnx and .json files only: no pickle anywhere.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError

from index import ann
from index.atomic import fsync_path, write_text
from index.manifest import MANIFEST_NAME, MANIFEST_SHA256_NAME, FileEntry, Manifest

log = logging.getLogger(__name__)

MANIFEST = MANIFEST_NAME
MANIFEST_SHA256 = MANIFEST_SHA256_NAME
CURRENT = "CURRENT"
USERS = "users.npy"
USER_IDS = "user_ids.npy"
ITEMS_INDEX = "items.faiss"
ITEM_IDS = "item_ids.npy"
POPULARITY = "popularity.npy"
SEEN_INDPTR = "seen_indptr.npy"
SEEN_ITEMS = "seen_items.npy"
IMAGE_ENCODER = "image_encoder.onnx"
TEXT_ENCODER = "text_encoder.onnx"
TOKENIZER = "tokenizer.json"
PREPROCESS = "preprocess.json"
ATTRIBUTES = "attributes.json"
ATTRIBUTES_HEAD = "attributes_head.npy"
STANDARD_FILES = (USERS, USER_IDS, ITEMS_INDEX, ITEM_IDS, POPULARITY, SEEN_INDPTR, SEEN_ITEMS,
                  IMAGE_ENCODER, TEXT_ENCODER, TOKENIZER, PREPROCESS, ATTRIBUTES, ATTRIBUTES_HEAD)

_VERSION_DIR = re.compile(r"^v([0-9]+)$")
_HASH_THREADS = 4
NORM_TOLERANCE = 1e-3


class BundleError(Exception):
    """A bundle is missing, malformed or does not match its manifest."""


@dataclass(frozen=True)
class Bundle:
    """A verified bundle directory and its manifest."""

    path: Path
    manifest: Manifest

    @property
    def version(self) -> int:
        """The bundle number N of vN."""
        return self.manifest.version

    def has(self, name: str) -> bool:
        """Whether the bundle lists this file."""
        return name in self.manifest.files

    def file(self, name: str) -> Path:
        """Path of a listed file; BundleError if the bundle has no such file."""
        if name not in self.manifest.files:
            raise BundleError(f"{self.path}: bundle has no file {name!r}")
        return self.path / name

    def load_npy(self, name: str, mmap: bool = False) -> np.ndarray:
        """Load a listed .npy file (never unpickles; optionally memory-mapped read-only)."""
        return np.load(self.file(name), allow_pickle=False, mmap_mode="r" if mmap else None)

    def read_json(self, name: str) -> Any:
        """Parse a listed JSON file."""
        return json.loads(self.file(name).read_text(encoding="utf-8"))


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _hash_all(paths: list[Path]) -> list[str]:
    """sha256 of several files, in parallel threads (hashlib releases the GIL)."""
    if len(paths) <= 1:
        return [sha256_file(p) for p in paths]
    with ThreadPoolExecutor(max_workers=min(_HASH_THREADS, len(paths))) as pool:
        return list(pool.map(sha256_file, paths))


def list_versions(bundles_dir: str | Path) -> list[int]:
    """Numbers N of the `vN` directories present, ascending."""
    bundles_dir = Path(bundles_dir)
    if not bundles_dir.is_dir():
        return []
    found = (_VERSION_DIR.match(p.name) for p in bundles_dir.iterdir() if p.is_dir())
    return sorted(int(m.group(1)) for m in found if m)


def _describe_files(tmp: Path) -> dict[str, FileEntry]:
    """Hash and size every file the writer produced; refuse anything but flat regular files."""
    entries = sorted(tmp.iterdir())
    for p in entries:
        if p.is_symlink() or not p.is_file():
            raise BundleError(f"bundle writer produced {p.name!r}, which is not a regular file")
        if p.name in (MANIFEST, MANIFEST_SHA256):
            raise BundleError(f"bundle writer must not write {p.name} itself")
    for p in entries:
        fsync_path(p)
    digests = _hash_all(entries)
    return {p.name: FileEntry(sha256=h, bytes=p.stat().st_size) for p, h in zip(entries, digests)}


def _write_manifest(tmp: Path, manifest: Manifest) -> None:
    """Write manifest.json and its sha256 into the temp directory; fsync them and the directory."""
    target = tmp / MANIFEST
    target.write_text(manifest.to_json(), encoding="utf-8")
    fsync_path(target)
    seal_manifest(tmp)
    fsync_path(tmp)


def seal_manifest(path: str | Path) -> None:
    """Write manifest.sha256 for the manifest.json now in `path` (write_bundle does it; by hand
    only for a bundle written before manifest checksums, after checking its manifest)."""
    target = Path(path) / MANIFEST_SHA256
    target.write_text(f"{sha256_file(Path(path) / MANIFEST)}  {MANIFEST}\n", encoding="utf-8")
    fsync_path(target)


def _verify_manifest_sha256(path: Path) -> None:
    """BundleError unless manifest.sha256 is present and matches manifest.json."""
    seal = path / MANIFEST_SHA256
    try:
        expected = seal.read_text(encoding="utf-8").split()[0]
    except FileNotFoundError as err:
        raise BundleError(f"{seal}: missing; the bundle predates manifest checksums: re-export "
                          "it, or check its manifest.json and run index.bundle.seal_manifest("
                          f"'{path}')") from err
    except (OSError, UnicodeDecodeError, IndexError) as err:
        raise BundleError(f"{seal}: unreadable ({err})") from err
    digest = sha256_file(path / MANIFEST)
    if not hmac.compare_digest(digest, expected):
        raise BundleError(f"{path / MANIFEST}: sha256 {digest[:12]}… does not match "
                          f"{MANIFEST_SHA256} ({expected[:12]}…): the manifest was edited")


def write_bundle(bundles_dir: str | Path, write_files: Callable[[Path], None],
                 manifest: Manifest) -> Path:
    """Write a new bundle vN (N = highest + 1) atomically; returns its directory."""
    bundles_dir = Path(bundles_dir)
    bundles_dir.mkdir(parents=True, exist_ok=True)
    tmp = bundles_dir / f".tmp-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        write_files(tmp)
        files = _describe_files(tmp)
        version = max(list_versions(bundles_dir), default=0) + 1
        for _ in range(1000):
            data = manifest.model_dump() | {"version": version, "files": files}
            try:
                final = Manifest.model_validate(data)
            except ValidationError as err:
                raise BundleError(f"invalid manifest for new bundle: {err}") from err
            _write_manifest(tmp, final)
            target = bundles_dir / f"v{version}"
            try:
                os.rename(tmp, target)
            except OSError:
                if not target.exists():
                    raise
                version = max([version, *list_versions(bundles_dir)]) + 1
                continue
            fsync_path(bundles_dir)
            log.info("wrote bundle %s (%d files)", target, len(files))
            return target
        raise BundleError(f"{bundles_dir}: could not claim a free version number")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _version_name(version: int | str) -> str:
    """Normalise 3 / "3" / "v3" to "v3"."""
    text = str(version)
    name = text if text.startswith("v") else f"v{text}"
    if not _VERSION_DIR.match(name):
        raise BundleError(f"invalid bundle version {version!r}")
    return name


def publish(bundles_dir: str | Path, version: int | str, verify: bool = True) -> None:
    """Point CURRENT at vN atomically (after the server's own load checks unless verify=False)."""
    bundles_dir = Path(bundles_dir)
    name = _version_name(version)
    if verify:
        check_contents(load_bundle(bundles_dir / name))
    elif not (bundles_dir / name).is_dir():
        raise BundleError(f"{bundles_dir / name}: no such bundle")
    write_text(bundles_dir / CURRENT, name + "\n")
    log.info("published %s in %s", name, bundles_dir)


def current_version(bundles_dir: str | Path) -> str | None:
    """The "vN" named by CURRENT, or None if nothing is published."""
    pointer = Path(bundles_dir) / CURRENT
    try:
        text = pointer.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    if not _VERSION_DIR.match(text):
        raise BundleError(f"{pointer}: expected 'vN', found {text[:40]!r}")
    return text


def load_current(bundles_dir: str | Path) -> Bundle | None:
    """Load and verify the published bundle, or None if nothing is published."""
    name = current_version(bundles_dir)
    return None if name is None else load_bundle(Path(bundles_dir) / name)


def _read_manifest(path: Path) -> Manifest:
    """Parse and validate manifest.json, turning every failure into a BundleError."""
    target = path / MANIFEST
    try:
        text = target.read_text(encoding="utf-8")
    except FileNotFoundError as err:
        raise BundleError(f"{target}: missing") from err
    except (OSError, UnicodeDecodeError) as err:
        raise BundleError(f"{target}: unreadable ({err})") from err
    try:
        return Manifest.model_validate_json(text)
    except ValidationError as err:
        raise BundleError(f"{target}: invalid manifest: {err}") from err


def _verify_files(path: Path, manifest: Manifest) -> None:
    """Check presence, size and sha256 of every listed file, and that nothing else is there."""
    own = (MANIFEST, MANIFEST_SHA256)
    unexpected = sorted(p.name for p in path.iterdir()
                        if p.name not in own and p.name not in manifest.files)
    if unexpected:
        raise BundleError(f"{path}: unexpected file {unexpected[0]!r} not listed in the manifest")
    paths = []
    for name, entry in sorted(manifest.files.items()):
        p = path / name
        if p.is_symlink() or not p.is_file():
            raise BundleError(f"{p}: listed in the manifest but missing or not a regular file")
        size = p.stat().st_size
        if size != entry.bytes:
            raise BundleError(f"{p}: size {size} bytes, manifest says {entry.bytes}")
        paths.append(p)
    for p, digest in zip(paths, _hash_all(paths)):
        expected = manifest.files[p.name].sha256
        if digest != expected:
            raise BundleError(f"{p}: sha256 mismatch (file {digest[:12]}…, "
                              f"manifest {expected[:12]}…); the file is corrupted or was changed")


def load_bundle(path: str | Path) -> Bundle:
    """Read the manifest, verify every file against it and return the Bundle."""
    path = Path(path)
    if not path.is_dir():
        raise BundleError(f"{path}: bundle directory not found")
    manifest = _read_manifest(path)
    m = _VERSION_DIR.match(path.name)
    if m and int(m.group(1)) != manifest.version:
        raise BundleError(f"{path / MANIFEST}: says version {manifest.version}, "
                          f"directory is {path.name}")
    _verify_files(path, manifest)
    _verify_manifest_sha256(path)
    return Bundle(path=path, manifest=manifest)


def check_contents(bundle: Bundle, index: Any | None = None) -> None:
    """BundleError unless the arrays agree with each other and with the manifest: what the
    server checks on every load and publish(verify=True) before CURRENT moves (fields no array
    describes, like backbone and metrics, are covered by manifest.sha256)."""
    m = bundle.manifest
    index = ann.load(bundle.file(ITEMS_INDEX), use_gpu=False) if index is None else index
    users, user_ids = bundle.load_npy(USERS, mmap=True), bundle.load_npy(USER_IDS, mmap=True)
    problems = [
        (users.shape != (m.counts.users, m.dim),
         f"{USERS} is {users.shape}, manifest says counts.users={m.counts.users}, dim={m.dim}"),
        (user_ids.shape != (len(users),), f"{USER_IDS} is {user_ids.shape}, not one per user"),
        (index.d != m.dim, f"{ITEMS_INDEX} has dimension {index.d}, manifest dim is {m.dim}"),
        (ann.ntotal(index) != m.counts.items,
         f"{ITEMS_INDEX} holds {ann.ntotal(index)} items, manifest counts.items={m.counts.items}"),
    ]
    _fail(bundle, problems)
    if len(np.unique(user_ids)) != len(user_ids):
        _fail(bundle, [(True, f"{USER_IDS} are not unique")])
    if m.normalized and len(users):
        norms = np.linalg.norm(np.asarray(users, dtype=np.float64), axis=1)
        _fail(bundle, [(np.abs(norms - 1).max() > NORM_TOLERANCE,
                        f"manifest says normalized but {USERS} has a norm of {norms.max():.4g}")])
    _check_items(bundle, index)
    if bundle.has(SEEN_INDPTR) and bundle.has(SEEN_ITEMS):
        check_csr(bundle.load_npy(SEEN_INDPTR), bundle.load_npy(SEEN_ITEMS, mmap=True), len(users))


def _check_items(bundle: Bundle, index: Any) -> None:
    """item_ids.npy (if listed) are the index's ids; popularity.npy (if listed) one per item."""
    n = ann.ntotal(index)
    if bundle.has(ITEM_IDS):
        item_ids = bundle.load_npy(ITEM_IDS, mmap=True)
        same = item_ids.shape == (n,) and np.array_equal(np.sort(item_ids),
                                                         np.sort(ann.live_ids(index)))
        _fail(bundle, [(not same, f"{ITEM_IDS} ({item_ids.shape[0]}) are not the ids of "
                        f"{ITEMS_INDEX} ({n})")])
    if bundle.has(POPULARITY):
        popularity = bundle.load_npy(POPULARITY, mmap=True)
        _fail(bundle, [(popularity.shape != (n,),
                        f"{POPULARITY} is {popularity.shape}, not one per item ({n})")])


def check_csr(indptr: np.ndarray, items: np.ndarray, n_rows: int) -> None:
    """BundleError unless (indptr, items) is a valid CSR with n_rows rows."""
    if indptr.shape != (n_rows + 1,) or indptr[0] != 0:
        raise BundleError(f"seen_indptr must have shape ({n_rows + 1},) and start at 0")
    if np.any(np.diff(indptr) < 0) or indptr[-1] != len(items):
        raise BundleError("seen_indptr must be non-decreasing and end at len(seen_items)")


def _fail(bundle: Bundle, problems: list[tuple[bool, str]]) -> None:
    """Raise one BundleError listing every failed check."""
    bad = [what for failed, what in problems if failed]
    if bad:
        raise BundleError(f"{bundle.path}: manifest and arrays disagree: {'; '.join(bad)}")
