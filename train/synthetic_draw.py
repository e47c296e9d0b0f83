"""Attribute vocabulary and Pillow drawing for the synthetic catalogue (see `train/synthetic.py`).

Each item is a silhouette of its category, filled with its colour and pattern, on a background
tinted by its style. Shapes are given in unit coordinates and drawn at twice the target size, then
downsampled, so edges are anti-aliased. Everything is a pure function of the attributes and a seed.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

CATEGORIES = ("shoe", "bag", "hat", "lamp", "mug", "chair", "watch", "shirt")
COLOURS = {
    "red": (205, 35, 40), "orange": (240, 130, 20), "yellow": (235, 205, 30),
    "green": (40, 150, 60), "blue": (35, 80, 200), "purple": (125, 50, 165),
    "pink": (240, 120, 175), "black": (30, 30, 30),
}
PATTERNS = ("plain", "striped", "dotted", "checked")
STYLES = ("vintage", "sporty", "minimal", "luxury", "cozy", "rustic", "modern", "playful")
STYLE_BACKGROUNDS = {
    "vintage": (236, 222, 196), "sporty": (214, 236, 244), "minimal": (246, 246, 246),
    "luxury": (232, 226, 206), "cozy": (246, 226, 216), "rustic": (226, 216, 200),
    "modern": (222, 226, 234), "playful": (236, 246, 216),
}

Point = tuple[float, float]
Mapper = Callable[[float, float], tuple[int, int]]


def _box(t: Mapper, x0: float, y0: float, x1: float, y1: float) -> list[tuple[int, int]]:
    """Map a unit-coordinate box to two pixel corners."""
    return [t(x0, y0), t(x1, y1)]


def _shoe(d: ImageDraw.ImageDraw, t: Mapper, w: int) -> None:
    """A low sneaker seen from the side: upper, rounded toe and a flat sole."""
    d.polygon([t(0.12, 0.66), t(0.12, 0.32), t(0.34, 0.32), t(0.46, 0.48), t(0.74, 0.52),
               t(0.88, 0.66)], fill=255)
    d.ellipse(_box(t, 0.66, 0.46, 0.92, 0.72), fill=255)
    d.rounded_rectangle(_box(t, 0.08, 0.64, 0.94, 0.76), radius=w, fill=255)


def _bag(d: ImageDraw.ImageDraw, t: Mapper, w: int) -> None:
    """A tote: wide body with an arched handle."""
    d.rounded_rectangle(_box(t, 0.18, 0.40, 0.82, 0.88), radius=2 * w, fill=255)
    d.arc(_box(t, 0.32, 0.14, 0.68, 0.62), start=180, end=360, fill=255, width=w)


def _hat(d: ImageDraw.ImageDraw, t: Mapper, w: int) -> None:
    """A brimmed hat: wide flat brim and a tall crown."""
    d.ellipse(_box(t, 0.06, 0.60, 0.94, 0.78), fill=255)
    d.rounded_rectangle(_box(t, 0.30, 0.24, 0.70, 0.68), radius=2 * w, fill=255)


def _lamp(d: ImageDraw.ImageDraw, t: Mapper, w: int) -> None:
    """A table lamp: trapezoid shade, thin stem and an oval base."""
    d.polygon([t(0.36, 0.10), t(0.64, 0.10), t(0.82, 0.44), t(0.18, 0.44)], fill=255)
    d.rectangle(_box(t, 0.46, 0.44, 0.54, 0.82), fill=255)
    d.ellipse(_box(t, 0.28, 0.78, 0.72, 0.90), fill=255)


def _mug(d: ImageDraw.ImageDraw, t: Mapper, w: int) -> None:
    """A mug: upright body with a ring handle on the right."""
    d.rounded_rectangle(_box(t, 0.20, 0.26, 0.64, 0.84), radius=w, fill=255)
    d.ellipse(_box(t, 0.52, 0.38, 0.86, 0.70), outline=255, width=w)


def _chair(d: ImageDraw.ImageDraw, t: Mapper, w: int) -> None:
    """A chair in side view: tall back, seat and two legs."""
    d.rectangle(_box(t, 0.26, 0.08, 0.36, 0.90), fill=255)
    d.rectangle(_box(t, 0.26, 0.50, 0.78, 0.60), fill=255)
    d.rectangle(_box(t, 0.68, 0.60, 0.78, 0.90), fill=255)


def _watch(d: ImageDraw.ImageDraw, t: Mapper, w: int) -> None:
    """A wristwatch: vertical strap, round face and a crown."""
    d.rectangle(_box(t, 0.40, 0.04, 0.60, 0.96), fill=255)
    d.ellipse(_box(t, 0.26, 0.28, 0.74, 0.76), fill=255)
    d.rectangle(_box(t, 0.72, 0.47, 0.80, 0.57), fill=255)


def _shirt(d: ImageDraw.ImageDraw, t: Mapper, w: int) -> None:
    """A T-shirt: body with short sleeves and a neck notch."""
    d.polygon([t(0.30, 0.14), t(0.42, 0.12), t(0.50, 0.20), t(0.58, 0.12), t(0.70, 0.14),
               t(0.92, 0.34), t(0.82, 0.46), t(0.72, 0.38), t(0.72, 0.90), t(0.28, 0.90),
               t(0.28, 0.38), t(0.18, 0.46), t(0.08, 0.34)], fill=255)


SHAPES: dict[str, Callable[[ImageDraw.ImageDraw, Mapper, int], None]] = {
    "shoe": _shoe, "bag": _bag, "hat": _hat, "lamp": _lamp,
    "mug": _mug, "chair": _chair, "watch": _watch, "shirt": _shirt,
}


def _accent(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    """A contrasting shade of a colour for patterns and outlines."""
    base = np.asarray(rgb, dtype=np.float64)
    target = 255.0 if base.mean() < 90 else 0.0
    return tuple(int(v) for v in np.round(0.55 * base + 0.45 * target))


def _texture(size: int, rgb: tuple[int, int, int], pattern: str,
             rng: np.random.Generator) -> Image.Image:
    """Fill a canvas with the item colour and draw its pattern over it."""
    img = Image.new("RGB", (size, size), rgb)
    d = ImageDraw.Draw(img)
    acc = _accent(rgb)
    period = max(4, int(size * rng.uniform(0.10, 0.16)))
    if pattern == "striped":
        diagonal = rng.random() < 0.5
        for k in range(-size, 2 * size, period):
            end = (k + size, size) if diagonal else (k, size)
            d.line([(k, 0), end], fill=acc, width=max(1, period // 2))
    elif pattern == "dotted":
        r = max(1, period // 4)
        for y in range(period // 2, size, period):
            for x in range(period // 2, size, period):
                d.ellipse([x - r, y - r, x + r, y + r], fill=acc)
    elif pattern == "checked":
        for y in range(0, size, period):
            for x in range(0, size, period):
                if (x // period + y // period) % 2:
                    d.rectangle([x, y, x + period - 1, y + period - 1], fill=acc)
    return img


def draw_item(category: str, colour: str, pattern: str, style: str, size: int = 64,
              seed: int = 0) -> Image.Image:
    """Render one item image (RGB, size x size) from its attributes and a drawing seed."""
    rng = np.random.default_rng(seed)
    big = 2 * size
    scale = big * rng.uniform(0.80, 0.95)
    dx, dy = (big - scale) / 2 + rng.uniform(-0.04, 0.04, size=2) * big

    def t(x: float, y: float) -> tuple[int, int]:
        return int(round(dx + x * scale)), int(round(dy + y * scale))

    mask = Image.new("L", (big, big), 0)
    SHAPES[category](ImageDraw.Draw(mask), t, max(2, int(0.07 * scale)))
    jitter = rng.integers(-8, 9, size=3)
    bg = tuple(int(c) for c in np.clip(np.asarray(STYLE_BACKGROUNDS[style]) + jitter, 0, 255))
    rgb = COLOURS[colour]
    canvas = Image.composite(_texture(big, rgb, pattern, rng), Image.new("RGB", (big, big), bg),
                             mask)
    edge = mask.filter(ImageFilter.FIND_EDGES)
    canvas = Image.composite(Image.new("RGB", (big, big), _accent(rgb)), canvas, edge)
    return canvas.resize((size, size), Image.Resampling.LANCZOS)
