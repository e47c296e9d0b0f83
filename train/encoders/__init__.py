"""Encoder registry: a plain dict from config name to tower class, and a discriminated config union."""
from __future__ import annotations

from typing import Annotated, Union

from pydantic import Field

from train.encoders.base import TokenState, Tower
from train.encoders.minilm import MiniLMConfig, MiniLMTower
from train.encoders.openclip import (
    TINY_CLIP,
    OpenClipImageConfig,
    OpenClipImageTower,
    OpenClipTextConfig,
    OpenClipTextTower,
    PretrainedUnavailableError,
)
from train.encoders.timm_cnn import TimmCnnConfig, TimmCnnTower

ENCODERS: dict[str, type[Tower]] = {
    "openclip_image": OpenClipImageTower,
    "openclip_text": OpenClipTextTower,
    "minilm": MiniLMTower,
    "timm_cnn": TimmCnnTower,
}

EncoderConfig = Annotated[
    Union[OpenClipImageConfig, OpenClipTextConfig, MiniLMConfig, TimmCnnConfig],
    Field(discriminator="name"),
]


def build_encoder(cfg: OpenClipImageConfig | OpenClipTextConfig | MiniLMConfig | TimmCnnConfig
                  ) -> Tower:
    """Instantiate the tower a config names (weights loaded on CPU, eval mode)."""
    return ENCODERS[cfg.name].from_config(cfg)


__all__ = [
    "ENCODERS",
    "TINY_CLIP",
    "EncoderConfig",
    "MiniLMConfig",
    "OpenClipImageConfig",
    "OpenClipTextConfig",
    "PretrainedUnavailableError",
    "TimmCnnConfig",
    "TokenState",
    "Tower",
    "build_encoder",
]
