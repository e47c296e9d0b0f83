"""Image preprocessing identical to open_clip's eval transform, in Pillow + numpy only (no torch).

The steps mirror `open_clip.transform.image_transform(is_train=False)` (open_clip_torch 3.3.0), which
is torchvision's `Resize` / `CenterCrop` on PIL images followed by `ToTensor` and `Normalize`:

1. resize (in the image's own mode, before any RGB conversion, as open_clip does):
   - `shortest` with a square target: shortest side to `size`, long side `int(size * long / short)`;
   - `shortest` with a non-square target: scale `1 / min(h/th, w/tw)`, sides rounded, always bicubic;
   - `longest`: scale `1 / max(h/th, w/tw)`, sides rounded, then centre crop-or-pad with `fill_color`;
   - `squash`: straight to (th, tw);
   Pillow's resampling (always antialiased) with `bicubic` or `bilinear`;
2. centre crop at `int(round((h - th) / 2))`, `int(round((w - tw) / 2))`, zero-padding first if smaller;
3. `convert("RGB")`, uint8 -> float32 / 255, `(x - mean) / std` per channel, layout (3, H, W).

Because torchvision hands PIL images to Pillow for these steps, the output matches open_clip's
`preprocess` exactly (the parity test asserts max abs difference <= 1e-6).

A missing or unreadable image becomes a *blank image in the mean colour*: the normalised tensor is all
zeros, the encoder's "no information" input. Callers get the number of blanks back and report it.
Serving copies this file's rules through `PreprocessSpec` (written as preprocess.json in a bundle).
"""
from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any, Literal, Union

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict

log = logging.getLogger(__name__)

ImageSource = Union[Image.Image, str, Path, bytes, None]

_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


class PreprocessSpec(BaseModel):
    """Everything needed to reproduce the image transform without torch (serialised to JSON)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: Literal["bicubic", "bilinear"] = "bicubic"
    resize_mode: Literal["shortest", "longest", "squash"] = "shortest"
    fill_color: int = 0
    blank: Literal["mean"] = "mean"

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


def _resized_size(w: int, h: int, spec: PreprocessSpec) -> tuple[int, int]:
    """Target (width, height) of the resize step, with torchvision's rounding rules."""
    th, tw = spec.size
    if spec.resize_mode == "squash":
        return tw, th
    if spec.resize_mode == "shortest" and th == tw:
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = th, int(th * long / short)
        return (new_short, new_long) if w <= h else (new_long, new_short)
    ratio_h, ratio_w = h / th, w / tw
    ratio = max(ratio_h, ratio_w) if spec.resize_mode == "longest" else min(ratio_h, ratio_w)
    return round(w / ratio), round(h / ratio)


def _resample(spec: PreprocessSpec) -> Image.Resampling:
    """Resampling filter; open_clip's non-square `shortest` path always uses bicubic."""
    if spec.resize_mode == "shortest" and spec.size[0] != spec.size[1]:
        return Image.Resampling.BICUBIC
    return _RESAMPLE[spec.interpolation]


def resize(img: Image.Image, spec: PreprocessSpec) -> Image.Image:
    """Resize step of the transform (no-op when the size already matches)."""
    size = _resized_size(img.width, img.height, spec)
    if size == (img.width, img.height):
        return img
    return img.resize(size, _resample(spec))


def center_crop_or_pad(img: Image.Image, size: tuple[int, int], fill: int = 0) -> Image.Image:
    """Centre crop to (th, tw), padding with `fill` first where the image is smaller."""
    th, tw = size
    w, h = img.size
    if tw > w or th > h:
        left, top = max(tw - w, 0) // 2, max(th - h, 0) // 2
        bands = len(img.getbands())
        canvas = Image.new(img.mode, (max(w, tw), max(h, th)), fill if bands == 1 else (fill,) * bands)
        if img.mode == "P":
            canvas.putpalette(img.getpalette())
        canvas.paste(img, (left, top))
        img, (w, h) = canvas, canvas.size
        if (w, h) == (tw, th):
            return img
    top, left = int(round((h - th) / 2.0)), int(round((w - tw) / 2.0))
    return img.crop((left, top, left + tw, top + th))


def to_array(img: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """RGB uint8 image -> normalised float32 array (3, H, W)."""
    arr = np.asarray(img.convert("RGB"), dtype=np.uint8).transpose(2, 0, 1)  # (3, H, W)
    mean = np.asarray(spec.mean, dtype=np.float32).reshape(3, 1, 1)
    std = np.asarray(spec.std, dtype=np.float32).reshape(3, 1, 1)
    return (arr.astype(np.float32) / np.float32(255.0) - mean) / std


def blank_array(spec: PreprocessSpec) -> np.ndarray:
    """The blank image in the mean colour: all zeros after normalisation, (3, H, W)."""
    return np.zeros((3, *spec.size), dtype=np.float32)


def preprocess_image(src: ImageSource, spec: PreprocessSpec) -> np.ndarray | None:
    """One image -> (3, H, W) float32, or None when it is missing or unreadable."""
    img = open_image(src)
    if img is None:
        return None
    try:
        img = resize(img, spec)
        img = center_crop_or_pad(img, spec.size, spec.fill_color if spec.resize_mode == "longest" else 0)
        return to_array(img, spec)
    except Exception as err:  # noqa: BLE001 - odd modes or broken data fall back to a blank
        log.debug("image could not be transformed: %s", err)
        return None


def preprocess_images(items: list[ImageSource], spec: PreprocessSpec) -> tuple[np.ndarray, int]:
    """A batch of images -> ((B, 3, H, W) float32, number of blanks substituted)."""
    out = np.empty((len(items), 3, *spec.size), dtype=np.float32)  # (B, 3, H, W)
    n_blank = 0
    for i, src in enumerate(items):
        arr = preprocess_image(src, spec)
        if arr is None:
            arr, n_blank = blank_array(spec), n_blank + 1
        out[i] = arr
    return out, n_blank
