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

ENCODERS: dict[str, type[Tower]] = {
    "openclip_image": OpenClipImageTower,
    "openclip_text": OpenClipTextTower,
    "minilm": MiniLMTower,
}

EncoderConfig = Annotated[
    Union[OpenClipImageConfig, OpenClipTextConfig, MiniLMConfig], Field(discriminator="name")
]


def build_encoder(cfg: OpenClipImageConfig | OpenClipTextConfig | MiniLMConfig) -> Tower:
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
    "TokenState",
    "Tower",
    "build_encoder",
]
