"""Versioned artifact bundles on disk: write, publish, verify, load (DESIGN.md §7).

Layout: `bundles/vN/` holds flat files plus `manifest.json`; `bundles/CURRENT` holds the text
"vN\n" naming the live version. Writes go to `bundles/.tmp-<uuid>/`, every file is hashed and
fsynced, and the directory is renamed into place, so a reader sees a bundle whole or not at all;
if another writer took vN first the rename fails and we take the next number. Publishing replaces
CURRENT through a temp file and `os.replace`. Loading re-hashes every file and refuses missing,
changed or unlisted files with a `BundleError` naming the file. Bundles hold .npy (read with
`allow_pickle=False`), .faiss, .onnx and .json files only: no pickle anywhere.
"""
from __future__ import annotations

import hashlib
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

from index.atomic import fsync_path, write_text
from index.manifest import MANIFEST_NAME, FileEntry, Manifest

log = logging.getLogger(__name__)

MANIFEST = MANIFEST_NAME
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
        if p.name == MANIFEST:
            raise BundleError(f"bundle writer must not write {MANIFEST} itself")
    for p in entries:
        fsync_path(p)
    digests = _hash_all(entries)
    return {p.name: FileEntry(sha256=h, bytes=p.stat().st_size) for p, h in zip(entries, digests)}


def _write_manifest(tmp: Path, manifest: Manifest) -> None:
    """Write manifest.json into the temp directory and fsync it and the directory."""
    target = tmp / MANIFEST
    target.write_text(manifest.to_json(), encoding="utf-8")
    fsync_path(target)
    fsync_path(tmp)


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
    """Point CURRENT at vN atomically (after verifying the bundle unless verify=False)."""
    bundles_dir = Path(bundles_dir)
    name = _version_name(version)
    if verify:
        load_bundle(bundles_dir / name)
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
    unexpected = sorted(p.name for p in path.iterdir()
                        if p.name != MANIFEST and p.name not in manifest.files)
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
    return Bundle(path=path, manifest=manifest)
