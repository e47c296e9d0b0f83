"""Image preprocessing identical to open_clip's eval transform, in Pillow + numpy only (no torch).

The transform itself lives in the torch-free `index.preprocess` so that training, export and serving
run one implementation; this module adds what only training needs: building the spec from an
open_clip `preprocess_cfg`, opening images from paths, and the *blank* rule for bad files.

The steps mirror `open_clip.transform.image_transform(is_train=False)` (open_clip_torch 3.3.0), which
is torchvision's `Resize` / `CenterCrop` on PIL images followed by `ToTensor` and `Normalize`; because
torchvision hands PIL images to Pillow for these steps, the output matches open_clip's `preprocess`
exactly (the parity test asserts max abs difference <= 1e-6).

A missing or unreadable image becomes a *blank image in the mean colour*: the normalised tensor is all
zeros, the encoder's "no information" input. Callers get the number of blanks back and report it.
(Serving, by contrast, refuses a request whose image does not decode.)
"""
from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any, Union

import numpy as np
from PIL import Image

from index.preprocess import ImageSpec, blank, transform

log = logging.getLogger(__name__)

ImageSource = Union[Image.Image, str, Path, bytes, None]


class PreprocessSpec(ImageSpec):
    """Everything needed to reproduce the image transform without torch (preprocess.json)."""

    @classmethod
    def from_open_clip(cls, cfg: dict[str, Any]) -> PreprocessSpec:
        """Build from an open_clip `preprocess_cfg` dict (size, mean, std, interpolation, resize_mode)."""
        size = cfg.get("size", 224)
        size = (size, size) if isinstance(size, int) else tuple(size)
        interpolation = cfg.get("interpolation", "bicubic")
        return cls(
            size=size,
            mean=_triple(cfg["mean"]),
            std=_triple(cfg["std"]),
            interpolation="bilinear" if interpolation == "bilinear" else "bicubic",
            resize_mode=cfg.get("resize_mode", "shortest"),
            fill_color=int(cfg.get("fill_color", 0)),
        )


def _triple(value: Any) -> tuple[float, float, float]:
    """A per-channel triple from a scalar or a sequence."""
    if isinstance(value, (int, float)):
        return (float(value),) * 3
    return tuple(float(v) for v in value)


def open_image(src: ImageSource) -> Image.Image | None:
    """Open and decode an image from a PIL image, a path or raw bytes; None when missing or unreadable."""
    if isinstance(src, Image.Image):
        return src
    if src is None or (isinstance(src, (str, Path)) and not str(src)):
        return None
    try:
        img = Image.open(io.BytesIO(src) if isinstance(src, bytes) else Path(src))
        img.load()
    except Exception as err:  # noqa: BLE001 - decoders raise many types; a bad file must never crash a run
        log.debug("unreadable image %s: %s", src if not isinstance(src, bytes) else "<bytes>", err)
        return None
    return img


def blank_array(spec: ImageSpec) -> np.ndarray:
    """The blank image in the mean colour: all zeros after normalisation, (3, H, W)."""
    return blank(spec)


def preprocess_image(src: ImageSource, spec: ImageSpec) -> np.ndarray | None:
    """One image -> (3, H, W) float32, or None when it is missing or unreadable."""
    img = open_image(src)
    if img is None:
        return None
    try:
        return transform(img, spec)
    except Exception as err:  # noqa: BLE001 - odd modes or broken data fall back to a blank
        log.debug("image could not be transformed: %s", err)
        return None


def preprocess_images(items: list[ImageSource], spec: ImageSpec) -> tuple[np.ndarray, int]:
    """A batch of images -> ((B, 3, H, W) float32, number of blanks substituted)."""
    out = np.empty((len(items), 3, *spec.size), dtype=np.float32)  # (B, 3, H, W)
    n_blank = 0
    for i, src in enumerate(items):
        arr = preprocess_image(src, spec)
        if arr is None:
            arr, n_blank = blank_array(spec), n_blank + 1
        out[i] = arr
    return out, n_blank
