"""index.preprocess: the bytes path agrees with training's on every image, and refuses bad ones.

Training (`train.encoders.preprocess`) shares `index.preprocess.transform` but opens files its own
way and substitutes a blank where serving refuses; these tests pin that both paths give the same
array for every decodable image and that exactly the images training blanks are refused here.
(Equality with open_clip's torchvision transform is tested in tests/train/encoders.)"""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from index import preprocess as sp
from index.preprocess import ImageError, ImageTooLarge
from train.encoders import preprocess as tp

MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def _noise(w: int, h: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    """A random image of a given size and mode."""
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")
    return img if mode == "RGB" else img.convert(mode)


def _bytes(img: Image.Image, fmt: str = "PNG") -> bytes:
    """Encoded image file."""
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


ODD = [_noise(300, 200), _noise(37, 91, seed=1), _noise(65, 64, "L", 2),
       _noise(128, 50, "RGBA", 3), _noise(99, 71, "P", 4), _noise(64, 64, seed=5),
       _noise(20, 20, seed=7), _noise(500, 17, "LA", 8), _noise(1, 300, seed=6)]
SPECS = [dict(size=(64, 64)), dict(size=(224, 224)), dict(size=(64, 48)),
         dict(size=(64, 64), resize_mode="longest", interpolation="bilinear", fill_color=128),
         dict(size=(64, 64), resize_mode="squash"), dict(size=(32, 32), interpolation="bilinear")]


def test_spec_round_trips_between_training_and_serving():
    train_spec = tp.PreprocessSpec(size=(64, 48), mean=MEAN, std=STD, resize_mode="longest")
    assert sp.ImageSpec.model_validate_json(train_spec.model_dump_json()).model_dump() == \
        train_spec.model_dump()


@pytest.mark.parametrize("fields", SPECS, ids=lambda f: "-".join(map(str, f.values())))
def test_parity_with_training(fields):
    ours, theirs = sp.ImageSpec(mean=MEAN, std=STD, **fields), tp.PreprocessSpec(
        mean=MEAN, std=STD, **fields)
    for img in ODD:
        for fmt in ("PNG", "WEBP") if img.mode in ("RGB", "RGBA", "L") else ("PNG",):
            data = _bytes(img, fmt)
            expected = tp.preprocess_image(data, theirs)
            thin = max(img.size) > sp.DEFAULT_MAX_ASPECT * min(img.size)
            if expected is None or thin:  # training blanks (or keeps) it; serving refuses it
                with pytest.raises(ImageError):
                    sp.preprocess(data, ours)
                continue
            got = sp.preprocess(data, ours)
            assert got.dtype == np.float32 and got.shape == expected.shape
            np.testing.assert_array_equal(got, expected, err_msg=f"{img.size} {img.mode} {fmt}")


def test_jpeg_and_blank_parity():
    ours = sp.ImageSpec(size=(32, 32), mean=MEAN, std=STD)
    theirs = tp.PreprocessSpec(size=(32, 32), mean=MEAN, std=STD)
    data = _bytes(_noise(90, 60, seed=3), "JPEG")
    np.testing.assert_array_equal(sp.preprocess(data, ours), tp.preprocess_image(data, theirs))
    np.testing.assert_array_equal(sp.preprocess(b"", ours), tp.blank_array(theirs))
    assert not sp.blank(ours).any()


@pytest.mark.parametrize("data", [b"not an image", b"\x89PNG\r\n\x1a\n" + b"\0" * 40,
                                  _bytes(_noise(50, 50))[:200]], ids=["garbage", "header", "cut"])
def test_undecodable_is_invalid_argument(data):
    with pytest.raises(ImageError, match="decoded"):
        sp.decode(data)


def test_empty_bytes_are_invalid_for_decode():
    with pytest.raises(ImageError, match="empty"):
        sp.decode(b"")


def test_pixel_limit_checked_before_decoding():
    huge = _bytes(Image.new("1", (4000, 3000)))  # 12 Mpx in a few kB
    assert len(huge) < 10_000
    with pytest.raises(ImageTooLarge, match="4000x3000"):
        sp.decode(huge, max_pixels=1_000_000)


def test_pillow_bomb_guard_is_resource_exhausted(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000_000)  # Pillow refuses > 2x this at open
    with pytest.raises(ImageTooLarge, match="bomb"):
        sp.decode(_bytes(Image.new("1", (4000, 3000))), max_pixels=10**9)


SPEC = sp.ImageSpec(size=(224, 224), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


@pytest.mark.parametrize("shape", [(1, 100_000), (1_000_000, 1), (200_000, 1)])
def test_extreme_aspect_ratio_is_refused_before_the_resize(shape):
    """A tiny thin PNG would be resized to billions of pixels before cropping (a 472-byte
    1 x 100,000 PNG took 34 s and 4 GB): it is refused as invalid input before the resize."""
    data = _bytes(Image.new("RGB", shape))
    assert len(data) < 10_000
    with pytest.raises(ImageError, match="aspect ratio") as err:
        sp.preprocess(data, SPEC)
    assert not isinstance(err.value, ImageTooLarge)       # INVALID_ARGUMENT, not exhaustion


def test_ordinary_aspect_ratios_still_pass():
    for shape in ((7000, 350), (300, 3000), (224, 224)):
        assert sp.preprocess(_bytes(Image.new("RGB", shape)), SPEC).shape == (3, 224, 224)


@pytest.mark.parametrize("shape", [(7001, 350), (20, 401), (1, 21)])
def test_aspect_over_the_limit_is_refused_from_the_header(shape, monkeypatch):
    def never(_img):
        raise AssertionError("decoded")
    monkeypatch.setattr(sp, "_load", never)
    with pytest.raises(ImageError, match="aspect ratio over the limit of 20:1") as err:
        sp.preprocess(_bytes(Image.new("L", shape)), SPEC)
    assert not isinstance(err.value, ImageTooLarge)
    monkeypatch.undo()
    assert sp.preprocess(_bytes(Image.new("L", shape)), SPEC, max_aspect=None).shape == (3, 224, 224)


def _natural(w: int, h: int) -> Image.Image:
    """A smooth large image (upsampled noise), closer to a photo than white noise."""
    return _noise(w // 50, h // 50, seed=11).resize((w, h), Image.Resampling.BICUBIC)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_large_images_decode_shrunk_and_close_to_the_full_path(fmt):
    data = _bytes(_natural(3000, 2000), fmt)
    img = sp.decode_for(data, SPEC)
    assert img.width * img.height < 3000 * 2000 / 3           # draft (JPEG) or reduce (PNG)
    assert min(img.size) >= sp.KEEP_FACTOR * 224
    full = sp.transform(sp.decode(data), SPEC)
    fast = sp.preprocess(data, SPEC)
    cos = float((full * fast).sum() / np.linalg.norm(full) / np.linalg.norm(fast))
    assert cos > 0.999 and np.abs(full - fast).max() < 0.3


def test_small_images_take_the_exact_path():
    data = _bytes(_noise(1000, 1000), "JPEG")
    np.testing.assert_array_equal(sp.preprocess(data, SPEC), sp.transform(sp.decode(data), SPEC))
