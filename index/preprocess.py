"""Image preprocessing for the ONNX image tower, torch-free, from preprocess.json.

This is the one implementation of open_clip's eval transform in Pillow + numpy: training
(`train.encoders.preprocess`, which adds the open_clip spec and the blank rule for bad files), the
exporter's parity checks and serving all call `transform`. `tests/train/encoders/test_preprocess.py`
asserts equality with open_clip's own torchvision transform on odd images:

1. resize in the image's own mode: `shortest` (square target: short side to size, long side
   `int(size * long / short)`; non-square: scale `1 / min(h/th, w/tw)`, rounded, always bicubic),
   `longest` (scale `1 / max(...)`, rounded, then pad with `fill_color`), or `squash`;
2. centre crop at `int(round((h - th) / 2))`, `int(round((w - tw) / 2))`, zero-padding if smaller;
3. RGB, uint8 / 255, `(x - mean) / std`, layout (3, H, W).

Unlike training, where an unreadable file silently becomes a blank, a request's image must
decode: failures raise `ImageError`, and images over the pixel limit `ImageTooLarge` (serve/
maps them to INVALID_ARGUMENT and RESOURCE_EXHAUSTED). A missing image (no bytes) is the blank
mean-colour image: all zeros after normalisation, as in training.

Bounded cost (serving's `preprocess` only; training decodes in full). Everything is checked from
the header, before any pixel is decoded: pixels (`max_pixels`, against decompression bombs; keep
it below Pillow's own `Image.MAX_IMAGE_PIXELS`) and the aspect ratio (`max_aspect`, default
20:1: a centre crop of a 20:1 image already keeps only 5% of it, and the resize of a 1 x 100,000
image would need billions of pixels). Then a JPEG of over `SHRINK_ABOVE` pixels (4 Mpx) is decoded
at 1/2, 1/4 or 1/8 scale (`Image.draft`, DCT scaling: a 24 Mpx JPEG costs what a 1.5 Mpx one
does) and any other such image is box-reduced by an integer factor (`Image.reduce`) to at least
`KEEP_FACTOR` times the resize target before the bicubic resize. Both leave at least twice the
target's resolution, so the result stays within a few 1e-2 of the full-resolution path (cosine >
0.999 on natural images; bench.encode_isolation prints the figure). Memory per decode is the
decoded image, 4 bytes per pixel for RGB (about 200 MB at the 50 Mpx limit, a 1/4- to 1/64-size
draft for large JPEGs), plus the reduced copy (at most a quarter of that).
"""
from __future__ import annotations

import io
from typing import Literal

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict

_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
DEFAULT_MAX_PIXELS = 50_000_000
DEFAULT_MAX_ASPECT = 20.0  # longest side / shortest side, checked from the header
_REDUCIBLE = ("L", "LA", "RGB", "RGBA")  # "1" and "P" resize with NEAREST anyway (Pillow)
SHRINK_ABOVE = 4_000_000  # pixels: smaller images take the exact (training) path
KEEP_FACTOR = 2  # JPEG draft / reduce keep at least this many times the resize target per side
MAX_RESIZE_AREA = 100  # the resize step may make at most this many times the target's pixels


class ImageError(ValueError):
    """Image bytes that cannot be decoded or transformed."""


class ImageTooLarge(ImageError):
    """An image over the pixel limit, or a decompression bomb."""


class ImageSpec(BaseModel):
    """preprocess.json: the fields of train.encoders.preprocess.PreprocessSpec."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: Literal["bicubic", "bilinear"] = "bicubic"
    resize_mode: Literal["shortest", "longest", "squash"] = "shortest"
    fill_color: int = 0
    blank: Literal["mean"] = "mean"


def open_header(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS,
                max_aspect: float | None = None) -> Image.Image:
    """Open image bytes lazily (header only) and check pixels and aspect ratio before decoding."""
    if not data:
        raise ImageError("image is empty")
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as err:
        raise ImageTooLarge(f"image refused as a decompression bomb: {err}") from err
    except Exception as err:  # noqa: BLE001 - Pillow raises many types for bad headers
        raise ImageError(f"image could not be decoded: {type(err).__name__}") from err
    w, h = img.size
    if w * h > max_pixels:
        raise ImageTooLarge(f"image has {w}x{h} pixels, more than the limit of {max_pixels}")
    if max_aspect is not None and min(w, h) >= 1 and max(w, h) > max_aspect * min(w, h):
        raise ImageError(f"image of {w}x{h} pixels has an aspect ratio over the limit of "
                         f"{max_aspect:g}:1")
    return img


def _load(img: Image.Image) -> Image.Image:
    """Decode the pixels of an opened image; ImageError on truncated or corrupt data."""
    try:
        img.load()
    except Exception as err:  # noqa: BLE001 - truncated or corrupt data, many exception types
        raise ImageError(f"image could not be decoded: {type(err).__name__}") from err
    return img


def decode(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode image bytes fully; ImageError if impossible, ImageTooLarge if huge."""
    return _load(open_header(data, max_pixels))


def decode_for(data: bytes, spec: ImageSpec, max_pixels: int = DEFAULT_MAX_PIXELS,
               max_aspect: float | None = DEFAULT_MAX_ASPECT) -> Image.Image:
    """Decode at no more than KEEP_FACTOR x the resize target per side: JPEG draft, else reduce."""
    img = open_header(data, max_pixels, max_aspect)
    if img.width * img.height <= SHRINK_ABOVE:
        return _load(img)
    tw, th = resized_size(img.width, img.height, spec)
    if img.format == "JPEG" and min(tw, th) >= 1:
        try:
            img.draft(None, (KEEP_FACTOR * tw, KEEP_FACTOR * th))
        except (ValueError, OSError) as err:
            raise ImageError(f"image could not be decoded: {type(err).__name__}") from err
    img = _load(img)
    factor = int(min(img.width / max(tw, 1), img.height / max(th, 1)) // KEEP_FACTOR)
    if factor >= 2 and img.mode in _REDUCIBLE:
        try:
            img = img.reduce(factor)
        except (ValueError, OSError) as err:
            raise ImageError(f"image could not be reduced: {err}") from err
    return img


def resized_size(w: int, h: int, spec: ImageSpec) -> tuple[int, int]:
    """Target (width, height) of the resize step, with torchvision's rounding rules."""
    th, tw = spec.size
    if spec.resize_mode == "squash":
        return tw, th
    if spec.resize_mode == "shortest" and th == tw:
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(th * long / short)
        return (th, new_long) if w <= h else (new_long, th)
    ratio_h, ratio_w = h / th, w / tw
    ratio = max(ratio_h, ratio_w) if spec.resize_mode == "longest" else min(ratio_h, ratio_w)
    return round(w / ratio), round(h / ratio)


def _resample(spec: ImageSpec) -> Image.Resampling:
    """Resampling filter; the non-square `shortest` path is always bicubic (as open_clip)."""
    if spec.resize_mode == "shortest" and spec.size[0] != spec.size[1]:
        return Image.Resampling.BICUBIC
    return _RESAMPLE[spec.interpolation]


def _pad(img: Image.Image, th: int, tw: int, fill: int) -> Image.Image:
    """Centre the image on a canvas at least (th, tw), filled with `fill`."""
    w, h = img.size
    bands = len(img.getbands())
    canvas = Image.new(img.mode, (max(w, tw), max(h, th)), fill if bands == 1 else (fill,) * bands)
    if img.mode == "P":
        canvas.putpalette(img.getpalette())
    canvas.paste(img, (max(tw - w, 0) // 2, max(th - h, 0) // 2))
    return canvas


def crop_or_pad(img: Image.Image, size: tuple[int, int], fill: int = 0) -> Image.Image:
    """Centre crop to (th, tw), padding with `fill` first where the image is smaller."""
    th, tw = size
    if tw > img.width or th > img.height:
        img = _pad(img, th, tw, fill)
        if img.size == (tw, th):
            return img
    w, h = img.size
    top, left = int(round((h - th) / 2.0)), int(round((w - tw) / 2.0))
    return img.crop((left, top, left + tw, top + th))


def normalise(img: Image.Image, spec: ImageSpec) -> np.ndarray:
    """RGB uint8 image -> normalised float32 (3, H, W)."""
    arr = np.asarray(img.convert("RGB"), dtype=np.uint8).transpose(2, 0, 1)  # (3, H, W)
    mean = np.asarray(spec.mean, dtype=np.float32).reshape(3, 1, 1)
    std = np.asarray(spec.std, dtype=np.float32).reshape(3, 1, 1)
    return (arr.astype(np.float32) / np.float32(255.0) - mean) / std


def blank(spec: ImageSpec) -> np.ndarray:
    """The blank image in the mean colour: zeros after normalisation, (3, H, W)."""
    return np.zeros((3, *spec.size), dtype=np.float32)


def transform(img: Image.Image, spec: ImageSpec) -> np.ndarray:
    """Decoded image -> (3, H, W) float32; ImageError if its shape cannot be resized."""
    size = resized_size(img.width, img.height, spec)
    if min(size) < 1:
        raise ImageError(f"image of {img.width}x{img.height} pixels is too thin to resize")
    if size[0] * size[1] > max(MAX_RESIZE_AREA * spec.size[0] * spec.size[1], DEFAULT_MAX_PIXELS):
        raise ImageError(f"image of {img.width}x{img.height} pixels has an aspect ratio that "
                         f"would resize it to {size[0]}x{size[1]} before cropping to "
                         f"{spec.size[1]}x{spec.size[0]}; at most {MAX_RESIZE_AREA}x the "
                         "target's pixels are allowed")
    try:
        if size != img.size:
            img = img.resize(size, _resample(spec))
        fill = spec.fill_color if spec.resize_mode == "longest" else 0
        return normalise(crop_or_pad(img, spec.size, fill), spec)
    except (ValueError, OSError) as err:
        raise ImageError(f"image could not be transformed: {err}") from err


def preprocess(data: bytes, spec: ImageSpec, max_pixels: int = DEFAULT_MAX_PIXELS,
               max_aspect: float | None = DEFAULT_MAX_ASPECT) -> np.ndarray:
    """Image bytes -> (3, H, W) float32 at bounded cost (decode_for); no bytes -> the blank."""
    if not data:
        return blank(spec)
    return transform(decode_for(data, spec, max_pixels, max_aspect), spec)
