"""Atomic checkpoint files, loaded without arbitrary pickle (`weights_only=True`)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from index.atomic import atomic_path


def save_atomic(obj: Any, path: Path) -> None:
    """torch.save `obj` over `path` atomically and durably (index.atomic)."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load(path: Path) -> Any:
    """Load a checkpoint written by save_atomic, refusing arbitrary pickled objects."""
    return torch.load(path, map_location="cpu", weights_only=True)


def rng_state() -> dict:
    """torch's global RNG streams, CPU and (once initialised) every CUDA device's, for a
    resumable checkpoint (SMORE's dropout, distillation negatives, tower dropout draw on CUDA)."""
    return {"torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None}


def restore_rng(ck: dict) -> None:
    """Put back the streams `rng_state` saved into checkpoint `ck`."""
    torch.set_rng_state(ck["torch_rng"])
    if ck.get("cuda_rng") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(ck["cuda_rng"])
