"""Frozen item features for stage 1: encode every item's image and text once, cached on disk; parse
structured attributes out of the text when `encoders.attributes` is configured (index/attributes.py;
cheap, never cached)."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from index.attributes import AttributesConfig, AttributesSpec
from train.data import Dataset
from train.encoders import EncoderConfig, build_encoder
from train.encoders.cache import extract

log = logging.getLogger(__name__)


class EncodersConfig(BaseModel):
    """Which frozen towers produce the item features (any may be absent)."""

    model_config = ConfigDict(extra="forbid")
    image: EncoderConfig | None = None
    text: EncoderConfig | None = None
    attributes: AttributesConfig | None = Field(
        None, description="attribute fields parsed from the item text: the 'attributes' modality "
        "of the content heads (backbones read image and text only)")
    cache_dir: Path = Path(".cache/features")
    batch_size: int = Field(64, ge=1)


def item_features(cfg: EncodersConfig, dataset: Dataset, device: torch.device) -> dict[str,
                                                                                     np.ndarray]:
    """(n_items, d_m) features per configured modality, from the cache or freshly encoded."""
    if dataset.items is None:
        raise ValueError(f"{dataset.path}: encoders are configured but the dataset has no "
                         f"items.tsv")
    raw = {"image": dataset.items.images, "text": dataset.items.texts}
    out = {}
    for modality in ("image", "text"):
        tower_cfg = getattr(cfg, modality)
        if tower_cfg is None:
            continue
        tower = build_encoder(tower_cfg)
        if tower.modality != modality:
            raise ValueError(f"encoders.{modality} is a {tower.modality} tower ({tower_cfg.name})")
        if getattr(tower_cfg, "init_seed", None) is not None:
            log.warning("encoders.%s: %s has RANDOM weights (no pretrained checkpoint given); "
                        "its features carry no pretrained knowledge", modality, tower_cfg.model)
        result = extract(tower, raw[modality], cfg.cache_dir, cfg.batch_size, device)
        log.info("%s features %s from %s (%d items missing %s)", modality,
                 result.features.shape, tower.describe(), result.n_missing, modality)
        out[modality] = result.features
    if cfg.attributes is not None:
        spec = attribute_spec(cfg.attributes, dataset)
        out["attributes"] = spec.encode(dataset.items.texts)
        log.info("attribute features %s; share of items with each field: %s",
                 out["attributes"].shape, {k: round(v, 3) for k, v in
                                           spec.coverage(out["attributes"]).items()})
    return out


def attribute_spec(cfg: AttributesConfig, dataset: Dataset) -> AttributesSpec:
    """The attribute vocabularies fitted on the catalogue's texts (deterministic: the exporter
    refits the same spec from the same items.tsv)."""
    return AttributesSpec.fit(cfg, dataset.items.texts)
