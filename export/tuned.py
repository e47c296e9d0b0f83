"""Stage-2 runs for the exporter: read them, rebuild the tuned towers, make the towers export-ready.

A stage-2 run directory (`python -m train.stage2 --out RUN`) holds `stage2.yaml` (the method),
`stage1_config.yaml` (the stage-1 run's config: data, encoders, backbone, heads, cold start),
`metrics.json` and `best.pt`, whose state has the backbone, the content heads and every tower
parameter (frozen and tuned) at the best validation epoch. The towers are rebuilt exactly as
stage 2 built them (`train.stage2.build_towers`) and loaded from that state; the items are then
re-encoded with them, as stage 2 did before each validation.

Export form of a tuned tower: deep prompts stay as the token hook and are traced into the ONNX
graph; LoRA / (IA)^3 adapters are merged into the base weights of a copy (`merge_peft`), so the
graph is a plain tower. Parity is always checked against the tuned tower as trained. A PerPEFT run
(`groups` > 1) exports one graph computing every group's block (train/perpeft.py); merged adapters
then give each group its own copy of the weights.
"""
from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from peft.tuners.tuners_utils import BaseTunerLayer

from export.onnx_export import ExportError
from train.config import TrainConfig, load_config
from train.encoders.base import Tower
from train.encoders.peft_methods import PEFT_METHODS, merge_peft
from train.perpeft import GroupedTower
from train.stage2 import STAGE1_CONFIG, Stage2Config
from train.tuning import encode

STAGE2_YAML = "stage2.yaml"
STAGE1_YAML = "config.yaml"


@dataclass(frozen=True)
class Tuning:
    """The stage-2 method baked into the exported towers ("none" for a stage-1 run)."""

    method: str = "none"
    modalities: tuple[str, ...] = ()
    n_ctx: int = 0
    depth: int = 0

    def manifest_fields(self, exported: Iterable[str]) -> dict:
        """The EncoderSpec fields recording this tuning of the `exported` towers ({} if none)."""
        present = set(exported)
        modalities = [m for m in self.modalities if m in present]
        if self.method == "none" or not modalities:
            return {}
        return {"encoder_tuning": self.method, "tuned_modalities": modalities,
                "n_ctx": self.n_ctx, "prompt_depth": self.depth}


def is_stage2_run(run_dir: Path) -> bool:
    """A directory written by train.stage2 (it has stage2.yaml and no stage-1 config.yaml)."""
    return (run_dir / STAGE2_YAML).is_file() and not (run_dir / STAGE1_YAML).is_file()


def read_stage2(run_dir: Path, stage1_config: Path | None = None) -> tuple[TrainConfig,
                                                                          Stage2Config]:
    """(stage-1 config, stage-2 config) of a stage-2 run; `stage1_config` overrides the copy."""
    s2 = Stage2Config.model_validate(yaml.safe_load((run_dir / STAGE2_YAML).read_text()) or {})
    path = stage1_config or run_dir / STAGE1_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{path}: a stage-2 run needs its stage-1 config (train.stage2 "
                                f"writes {STAGE1_CONFIG}); for an older run pass its stage-1 run "
                                "with --stage1-run STAGE1_RUN")
    cfg = load_config(path)
    if cfg.encoders is None:
        raise ExportError(f"{path}: a stage-2 run needs a stage-1 config with encoders")
    return cfg, s2


def config_hash(cfg: TrainConfig, s2: Stage2Config | None) -> str:
    """The run's config hash: stage 1's own, or sha256 over both configs for a stage-2 run."""
    if s2 is None:
        return cfg.config_hash()
    blob = {"stage1": cfg.model_dump(mode="json"), "stage2": s2.model_dump(mode="json")}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


def tuning_of(s2: Stage2Config, towers: dict[str, Tower]) -> Tuning:
    """What a stage-2 config put into its towers (prompt depth as capped per tower)."""
    depth = n_ctx = 0
    if s2.method.name == "prompt":
        depth = max((t.token_hook.depth for t in towers.values() if t.token_hook is not None),
                    default=0)
        n_ctx = s2.method.n_ctx if depth else 0
    return Tuning(s2.method.name, tuple(sorted(towers)), n_ctx, depth)


def tuned_features(towers: dict[str, Tower], raw: dict[str, list], batch_size: int,
                   device: torch.device) -> dict[str, torch.Tensor]:
    """Every item re-encoded with the tuned towers, (n_items, d_m) per tuned modality."""
    for tower in towers.values():
        tower.eval()
    return {m: encode(t, raw[m], batch_size, device, grad=False) for m, t in towers.items()}


def deployable(tower: Tower, tuning: Tuning) -> Tower:
    """The tower as it is exported: adapters merged into a copy (plain weights), else itself."""
    method = PEFT_METHODS.get(tuning.method)
    if method is None or not method.merges:
        return tower
    if isinstance(tower, GroupedTower):  # PerPEFT: each group merged into its own weights
        return GroupedTower([deployable(member, tuning) for member in tower.members])
    merged = merge_peft(copy.deepcopy(tower)).eval()
    # as trainable as a freshly built tower: with every weight frozen, nn.MultiheadAttention takes
    # its fused fast path, which the legacy (TorchScript) exporter cannot export
    merged.requires_grad_(True)
    left = [n for n, m in merged.named_modules() if isinstance(m, BaseTunerLayer)]
    if left:
        raise ExportError(f"{tuning.method} adapters left after merging: {left[:3]}")
    return merged
