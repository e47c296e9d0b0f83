"""Frozen feature extraction (PTMRec stage 1): batched, no grad, progress bar, cached on disk.

The cache key is sha256(tower.identity() + sha256 over the item contents): image files are hashed by
their bytes (not their paths), texts by the string the encoder sees. `identity()` includes a digest of
the tower's current weights, so a changed item, encoder, checkpoint or preprocessing never reuses a
stale file. Files are `<cache_dir>/<modality>-<key>.npy` (float32, (N, d)) plus a `.json` sidecar with
the counts; both are written to a temporary file and moved into place (index.atomic).
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from index.atomic import write_bytes
from train import distributed
from train.encoders.base import Tower

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Extraction:
    """Features of N items and what happened on the way."""

    features: np.ndarray  # (N, d) float32
    n_missing: int  # images replaced by blanks, or empty texts
    path: Path
    cache_hit: bool


def _image_digest(item: Any) -> bytes:
    """sha256 of what an image item contains: file bytes, raw bytes or decoded pixels."""
    h = hashlib.sha256()
    if isinstance(item, Image.Image):
        h.update(f"pil|{item.mode}|{item.size}|".encode())
        h.update(item.tobytes())
    elif isinstance(item, bytes):
        h.update(b"bytes|" + item)
    elif isinstance(item, (str, Path)) and str(item) and Path(item).is_file():
        with open(item, "rb") as f:
            h.update(b"bytes|")
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    else:
        h.update(b"missing")
    return h.digest()


def content_digest(items: list, modality: str) -> str:
    """sha256 over the ordered contents of all items."""
    h = hashlib.sha256(f"{modality}|{len(items)}|".encode())
    for item in items:
        if modality == "image":
            h.update(_image_digest(item))
        else:
            h.update(hashlib.sha256(("" if item is None else str(item)).encode()).digest())
    return h.hexdigest()


def cache_key(tower: Tower, items: list, identity: str | None = None) -> str:
    """sha256(identity + content digest): the file name of a tower's features for these items."""
    blob = f"{identity or tower.identity()}\n{content_digest(items, tower.modality)}"
    return hashlib.sha256(blob.encode()).hexdigest()


def _save(path: Path, features: np.ndarray, meta: dict) -> None:
    """Sidecar first, then the array, so an existing array always has its counts."""
    write_bytes(path.with_suffix(".json"), json.dumps(meta, indent=2).encode())
    buf = io.BytesIO()
    np.save(buf, features, allow_pickle=False)
    write_bytes(path, buf.getvalue())


def _load(path: Path, n_items: int) -> tuple[np.ndarray, int] | None:
    """Cached (features, n_missing), or None when absent or unusable."""
    if not path.is_file():
        return None
    try:
        features = np.load(path, allow_pickle=False)
        meta = json.loads(path.with_suffix(".json").read_text())
    except (OSError, ValueError) as err:
        log.warning("ignoring unreadable feature cache %s: %s", path, err)
        return None
    if features.ndim != 2 or features.shape[0] != n_items or features.dtype != np.float32:
        log.warning("ignoring feature cache %s with shape %s", path, features.shape)
        return None
    return features, int(meta.get("n_missing", 0))


def _to_device(prepared: Any, device: torch.device) -> Any:
    """Move a tensor or a dict of tensors."""
    if isinstance(prepared, dict):
        return {k: v.to(device) for k, v in prepared.items()}
    return prepared.to(device)


def _device_of(module: torch.nn.Module) -> torch.device:
    """Device of a module's first parameter (CPU when it has none)."""
    return next((p.device for p in module.parameters()), torch.device("cpu"))


def encode_all(tower: Tower, items: list, batch_size: int, device: torch.device,
               progress: bool) -> tuple[np.ndarray, int]:
    """Encode every item in batches under inference mode -> ((N, d) float32, n_missing)."""
    home, was_training = _device_of(tower), tower.training
    tower.to(device).eval()
    rows, n_missing = [], 0
    try:
        with torch.inference_mode(), tqdm(total=len(items), unit=tower.modality, disable=not progress,
                                          desc=f"encode {tower.modality}s") as bar:
            for start in range(0, len(items), batch_size):
                chunk = items[start:start + batch_size]
                prepared, missing = tower.prepare_counted(chunk)
                rows.append(tower(_to_device(prepared, device)).float().cpu().numpy())  # (b, d)
                n_missing += missing
                bar.update(len(chunk))
    finally:
        tower.to(home).train(was_training)
    if not rows:
        return np.zeros((0, tower.out_dim), dtype=np.float32), 0
    return np.concatenate(rows).astype(np.float32, copy=False), n_missing


def extract(tower: Tower, items: list, cache_dir: Path, batch_size: int = 64,
            device: str | torch.device = "cpu", progress: bool = True) -> Extraction:
    """Features of `items` from the cache, or encoded, cached and reported."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    items = list(items)
    identity = tower.identity()
    path = cache_dir / f"{tower.modality}-{cache_key(tower, items, identity)}.npy"
    cached = _load(path, len(items))
    what = "images missing or unreadable (blank used)" if tower.modality == "image" else "texts empty"
    if all(distributed.gather(cached is not None)):
        log.info("feature cache hit %s (%d of %d %s)", path.name, cached[1], len(items), what)
        return Extraction(cached[0], cached[1], path, cache_hit=True)
    features, n_missing = encode_sharded(tower, items, batch_size, torch.device(device), progress)
    meta = {"identity": identity, "modality": tower.modality, "n_items": len(items),
            "dim": int(features.shape[1]), "n_missing": n_missing}
    if distributed.is_local_main():
        _save(path, features, meta)
    log.info("encoded %d %ss -> %s", len(items), tower.modality, path.name)
    if n_missing:
        log.warning("%d of %d %s", n_missing, len(items), what)
    return Extraction(features, n_missing, path, cache_hit=False)


def encode_sharded(tower: Tower, items: list, batch_size: int, device: torch.device,
                   progress: bool) -> tuple[np.ndarray, int]:
    """encode_all, each rank its contiguous part of the items under torchrun, gathered in rank
    order on every rank (a rank that dies fails the gather: nothing is cached)."""
    if not distributed.active():
        return encode_all(tower, items, batch_size, device, progress)
    mine = encode_all(tower, items[distributed.part(len(items))], batch_size, device,
                      progress and distributed.is_main())
    parts = distributed.gather(mine)
    return np.concatenate([p[0] for p in parts]), sum(p[1] for p in parts)


def extract_features(tower: Tower, items: list, cache_dir: Path, batch_size: int = 64,
                     device: str | torch.device = "cpu") -> np.ndarray:
    """(N, d) float32 features of `items`, cached on disk under an identity + content key."""
    return extract(tower, items, cache_dir, batch_size=batch_size, device=device).features
