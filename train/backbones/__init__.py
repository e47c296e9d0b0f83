"""Backbone registry: a plain dict from config name to class, and a discriminated config union."""
from __future__ import annotations

from typing import Annotated, Union

from pydantic import Field

from train.backbones.base import Backbone, BackboneInputs
from train.backbones.bpr import BPR, BPRConfig
from train.backbones.freedom import FREEDOM, FREEDOMConfig
from train.backbones.fused import FusedBPR, FusedBPRConfig, FusedLightGCN, FusedLightGCNConfig
from train.backbones.lightgcn import LightGCN, LightGCNConfig
from train.backbones.mgcn import MGCN, MGCNConfig
from train.backbones.smore import SMORE, SMOREConfig
from train.backbones.vbpr import VBPR, VBPRConfig

BACKBONES: dict[str, type[Backbone]] = {
    "bpr": BPR,
    "lightgcn": LightGCN,
    "bpr_mm": FusedBPR,
    "lightgcn_mm": FusedLightGCN,
    "vbpr": VBPR,
    "freedom": FREEDOM,
    "mgcn": MGCN,
    "smore": SMORE,
}
MULTIMODAL = frozenset({"bpr_mm", "lightgcn_mm", "vbpr", "freedom", "mgcn", "smore"})

AnyBackboneConfig = Union[BPRConfig, LightGCNConfig, FusedBPRConfig, FusedLightGCNConfig,
                          VBPRConfig, FREEDOMConfig, MGCNConfig, SMOREConfig]
BackboneConfig = Annotated[AnyBackboneConfig, Field(discriminator="name")]


def build_backbone(cfg: AnyBackboneConfig, inputs: BackboneInputs) -> Backbone:
    """Instantiate the backbone a config names."""
    return BACKBONES[cfg.name](cfg, inputs)


__all__ = ["BACKBONES", "MULTIMODAL", "Backbone", "BackboneConfig", "BackboneInputs",
           "build_backbone"]
