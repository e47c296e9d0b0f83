"""Backbone registry: a plain dict from config name to class, and a discriminated config union."""
from __future__ import annotations

from typing import Annotated, Union

from pydantic import Field

from train.backbones.base import Backbone, BackboneInputs
from train.backbones.bpr import BPR, BPRConfig
from train.backbones.lightgcn import LightGCN, LightGCNConfig

BACKBONES: dict[str, type[Backbone]] = {
    "bpr": BPR,
    "lightgcn": LightGCN,
}

BackboneConfig = Annotated[Union[BPRConfig, LightGCNConfig], Field(discriminator="name")]


def build_backbone(cfg: BPRConfig | LightGCNConfig, inputs: BackboneInputs) -> Backbone:
    """Instantiate the backbone a config names."""
    return BACKBONES[cfg.name](cfg, inputs)


__all__ = ["BACKBONES", "Backbone", "BackboneConfig", "BackboneInputs", "build_backbone"]
