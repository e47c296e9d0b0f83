"""What stage 1, stage 2 and `train.run.load_run` build alike: seeded data with its item features
and cold-start splits, the backbone's inputs, the content heads, and stage 2's tuned towers.

Training and rebuilding a finished run call the same functions in the same order, so a rebuilt run
draws the same splits and gets the same shapes as the run that trained.
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass

import numpy as np
import torch

from train.backbones import Backbone, BackboneInputs
from train.coldstart import ColdSplit, run_splits
from train.config import Stage2Config, TrainConfig
from train.data import Dataset, load_dataset
from train.encoders import build_encoder
from train.encoders.base import Tower
from train.encoders.peft_methods import apply_peft
from train.encoders.prompts import PromptConfig, prompted_text_config
from train.features import item_features
from train.heads import ContentHeads, HeadsConfig
from train.tuning import encode

log = logging.getLogger(__name__)


@dataclass
class RunData:
    """A run's data as training sees it: the full dataset, the training view, the held-out items."""

    full: Dataset              # every interaction and all item content, with item features
    train: Dataset             # the training view (cold-start and calibration items held out)
    cold: ColdSplit | None     # cold-start evaluation items (cold_start:)
    calib: ColdSplit | None    # head-calibration items (heads.calibrate)


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def prepare_data(cfg: TrainConfig, device: torch.device,
                 substitutes: dict[str, np.ndarray] | None = None) -> RunData:
    """Seed, load the dataset, encode its items (cached) and split off the held-out items.

    `substitutes` (n_items, d) per modality replace the configured encoders' features for those
    modalities (bench/feature_probe.py)."""
    seed_everything(cfg.seed)
    full = load_dataset(cfg.data.path)
    log.info(full.summary())
    if cfg.encoders:
        full.features = item_features(cfg.encoders, full, device)
    for m, f in (substitutes or {}).items():
        if m not in full.features or f.shape != full.features[m].shape:
            raise ValueError(f"substitute {m} features {f.shape} do not match the configured "
                             f"encoder's {getattr(full.features.get(m), 'shape', None)}")
        full.features[m] = np.ascontiguousarray(f, dtype=np.float32)
    train, cold, calib = run_splits(full, cfg.cold_start, cfg.heads, cfg.seed)
    for name, held in (("cold start", cold), ("head calibration", calib)):
        if held is not None:
            log.info("%s: %d items held out of training", name, len(held.items))
    return RunData(full, train, cold, calib)


def backbone_inputs(dataset: Dataset, device: torch.device) -> BackboneInputs:
    """Tensors a backbone is built from."""
    train = torch.from_numpy(dataset.train).to(device)
    feats = {m: torch.from_numpy(f).to(device) for m, f in dataset.features.items()}
    return BackboneInputs(dataset.n_users, dataset.n_items, train[:, 0], train[:, 1], feats)


def build_heads(cfg: TrainConfig, s2: Stage2Config | None, features: dict[str, torch.Tensor],
                model: Backbone, device: torch.device) -> ContentHeads | None:
    """The run's content heads, sized on the backbone's vectors; a stage-2 run always has them
    (its default covers the tuned modalities); None for a stage-1 run without `heads:`."""
    heads_cfg = cfg.heads if s2 is None else cfg.heads or HeadsConfig(modalities=s2.modalities)
    if heads_cfg is None:
        return None
    dims = {m: f.shape[1] for m, f in features.items()}
    return ContentHeads(heads_cfg, dims, model.dim).to(device)


def build_towers(enc_cfg, s2: Stage2Config) -> dict[str, Tower]:
    """Towers of the stage-1 encoders with the stage-2 PEFT method attached."""
    towers = {}
    for m in s2.modalities:
        tower_cfg = getattr(enc_cfg, m)
        if tower_cfg is None:
            raise ValueError(f"stage 2 tunes the {m} tower but the stage-1 run has no {m} encoder")
        if tower_cfg.name == "openclip_text" and isinstance(s2.method, PromptConfig):
            tower_cfg = prompted_text_config(tower_cfg, s2.method.n_ctx)
        towers[m] = apply_peft(build_encoder(tower_cfg), s2.method)
    return towers


def tuned_features(towers: dict[str, Tower], raw: dict[str, list], batch_size: int,
                   device: torch.device) -> dict[str, torch.Tensor]:
    """Every item re-encoded with the tuned towers, (n_items, d_m) per tuned modality."""
    for tower in towers.values():
        tower.eval()
    return {m: encode(t, raw[m], batch_size, device, grad=False) for m, t in towers.items()}
