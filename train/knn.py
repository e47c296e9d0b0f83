"""Item-item kNN graphs over content features, built in memory-bounded chunks and cached on disk.

Cosine similarity, top-k per row with the item itself included (LATTICE, Zhang et al., MM 2021;
FREEDOM, Zhou & Shen, MM 2023; MGCN, Yu et al., MM 2023; SMORE, Ong & Khong, WSDM 2025). Two
normalisations, as MMRec builds them:
- "binary" (FREEDOM): edges weigh 1, then 1/sqrt(r_i r_j) with r the row degree (+1e-7);
- "weighted" (MGCN, SMORE): edges keep their cosine value w, then d_i^-1/2 w d_j^-1/2 with d the
  row sum of w.
The full I×I similarity matrix is never formed: rows are processed `chunk` at a time. The cache key
hashes the feature CONTENT with k and the normalisation; MMRec's caches, keyed by k alone, go stale
silently when the features change (reference/ALGORITHMS.md §1.7 pitfall).
"""
from __future__ import annotations

import hashlib
import logging
import pickle
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

from train import checkpoint
from train.graph import sparse_csr

log = logging.getLogger(__name__)
Norm = Literal["binary", "weighted"]
MAX_CHUNK_ELEMENTS = 2 ** 25          # similarity entries held at once (128 MiB in float32)


def chunk_rows(n_items: int, chunk: int = 2048, max_elements: int = MAX_CHUNK_ELEMENTS) -> int:
    """Rows per chunk so that a (rows, n_items) similarity block stays within max_elements."""
    return max(1, min(chunk, max_elements // max(1, n_items)))


def knn_topk(features: torch.Tensor, k: int, chunk: int = 2048,
             max_elements: int = MAX_CHUNK_ELEMENTS) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k cosine neighbours of every row, self included: (values (I, k), indices (I, k))."""
    x = F.normalize(features.detach().float(), dim=1)                # (I, d)
    n = x.shape[0]
    k = min(k, n)
    step = chunk_rows(n, chunk, max_elements)
    values, indices = [], []
    for s in range(0, n, step):
        sim = x[s:s + step] @ x.T                                     # (c, I)
        top = torch.topk(sim, k, dim=1)
        values.append(top.values)
        indices.append(top.indices)
    return torch.cat(values), torch.cat(indices)


def normalise(rows: torch.Tensor, cols: torch.Tensor, weights: torch.Tensor, n: int,
              norm: Norm) -> torch.Tensor:
    """Symmetric normalisation of kNN edge weights with row degrees."""
    if norm == "binary":
        deg = torch.bincount(rows, minlength=n).float() + 1e-7
        return deg[rows].rsqrt() * deg[cols].rsqrt()
    if norm == "weighted":
        deg = torch.zeros(n, device=weights.device).index_add_(0, rows, weights)
        inv = torch.where(deg > 0, deg.clamp(min=1e-12).rsqrt(), torch.zeros_like(deg))
        return inv[rows] * weights * inv[cols]
    raise ValueError(f"unknown kNN normalisation {norm!r}; expected 'binary' or 'weighted'")


def feature_key(features: torch.Tensor, k: int, norm: Norm) -> str:
    """Content hash of the features (bytes, shape, dtype) together with k and the normalisation."""
    arr = features.detach().float().cpu().contiguous().numpy()
    h = hashlib.sha256()
    h.update(f"{arr.shape}|{arr.dtype}|k={k}|norm={norm}".encode())
    h.update(memoryview(arr).cast("B"))
    return h.hexdigest()


def _build(features: torch.Tensor, k: int, norm: Norm, chunk: int) -> tuple[torch.Tensor, ...]:
    """COO triplets (rows, cols, values) of the normalised kNN graph."""
    values, indices = knn_topk(features, k, chunk)                   # (I, k)
    n, k = indices.shape
    rows = torch.arange(n, device=indices.device).repeat_interleave(k)
    cols = indices.reshape(-1)
    return rows, cols, normalise(rows, cols, values.reshape(-1), n, norm)


def _load(path: Path, device: torch.device) -> tuple[torch.Tensor, ...] | None:
    """Cached triplets, or None when the file is missing or unreadable."""
    if not path.is_file():
        return None
    try:
        blob = torch.load(path, map_location=device, weights_only=True)
        return blob["rows"], blob["cols"], blob["values"]
    except (OSError, RuntimeError, KeyError, EOFError, ValueError, pickle.UnpicklingError) as err:
        log.warning("ignoring unreadable kNN cache %s: %s", path, err)
        return None


def _save(path: Path, triplets: tuple[torch.Tensor, ...]) -> None:
    """Write the triplets atomically and durably."""
    rows, cols, values = (t.cpu() for t in triplets)
    checkpoint.save_atomic({"rows": rows, "cols": cols, "values": values}, path)


def knn_graph(features: torch.Tensor, k: int, norm: Norm, cache_dir: Path | None = None,
              chunk: int = 2048) -> torch.Tensor:
    """The normalised top-k cosine graph of the item features as an (I, I) CSR matrix."""
    n = features.shape[0]
    path = None if cache_dir is None else (
        Path(cache_dir) / f"knn_{norm}_k{k}_{feature_key(features, k, norm)[:32]}.pt")
    triplets = None if path is None else _load(path, features.device)
    if triplets is None:
        triplets = _build(features, k, norm, chunk)
        if path is not None:
            _save(path, triplets)
            log.info("kNN graph (k=%d, %s) cached at %s", k, norm, path)
    return sparse_csr(*triplets, (n, n))


def weighted_sum(graphs: list[tuple[float, torch.Tensor]]) -> torch.Tensor:
    """Σ w_g G_g over sparse graphs of the same size (FREEDOM's image/text mix)."""
    parts = [(w, g.to_sparse_coo().coalesce()) for w, g in graphs]
    rows = torch.cat([g.indices()[0] for _, g in parts])
    cols = torch.cat([g.indices()[1] for _, g in parts])
    values = torch.cat([w * g.values() for w, g in parts])
    return sparse_csr(rows, cols, values, tuple(parts[0][1].shape))


def max_fuse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise max over the union of the edges of two graphs (SMORE's fusion graph)."""
    ca, cb = a.to_sparse_coo().coalesce(), b.to_sparse_coo().coalesce()
    n_cols = a.shape[1]
    keys = torch.cat([ca.indices()[0] * n_cols + ca.indices()[1],
                      cb.indices()[0] * n_cols + cb.indices()[1]])
    values = torch.cat([ca.values(), cb.values()])
    uniq, inverse = torch.unique(keys, return_inverse=True)
    fused = torch.full((len(uniq),), -torch.inf, device=values.device, dtype=values.dtype)
    fused = fused.scatter_reduce(0, inverse, values, reduce="amax")
    return sparse_csr(uniq // n_cols, uniq % n_cols, fused, tuple(a.shape))
