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
