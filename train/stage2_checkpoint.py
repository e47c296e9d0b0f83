"""Stage 2's per-epoch checkpoint: what `python -m train.stage2 --resume` (and torchrun's
`--max-restarts`) continues from. Rank 0 alone writes it; every rank reads it."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from train import checkpoint, distributed
from train.fit import FitState

log = logging.getLogger(__name__)


def _to(obj, device: torch.device):
    """`obj` with every tensor in its dicts moved to `device`."""
    if torch.is_tensor(obj):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


@dataclass
class Loop:
    """The live objects of a stage-2 run that its per-epoch checkpoint holds besides FitState."""

    modules: torch.nn.ModuleDict
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    current: dict   # {"feats": the features the backbone reads now}
    kept: dict      # the best state's figures and features

    def save(self, path: Path, state: FitState, start_valid: dict | None) -> None:
        """Write the resumable checkpoint of the last finished epoch (rank 0 only)."""
        if distributed.is_main():
            checkpoint.save_atomic({
                "modules": self.modules.state_dict(), "optimizer": self.optimizer.state_dict(),
                "generator": self.generator.get_state(), **checkpoint.rng_state(),
                "current": self.current, "kept": self.kept, "start_valid": start_valid,
                "state": state.__dict__}, path)

    def restore(self, path: Path) -> tuple[FitState, dict | None]:
        """Load the checkpoint into the live objects; (FitState, start figures)."""
        ck = checkpoint.load(path)
        self.modules.load_state_dict(ck["modules"])
        self.optimizer.load_state_dict(ck["optimizer"])
        self.generator.set_state(ck["generator"])
        checkpoint.restore_rng(ck)
        device = next(self.modules.parameters()).device
        self.current.update(_to(ck["current"], device))
        self.kept.update(_to(ck["kept"], device))
        log.info("resumed from %s after stage-2 epoch %d", path, ck["state"]["epoch"])
        return FitState(**ck["state"]), ck["start_valid"]
