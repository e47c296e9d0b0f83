"""Pillow + numpy preprocessing equals open_clip's own eval transform; blanks for bad images."""
from __future__ import annotations

import io

import numpy as np
import open_clip
import pytest
from PIL import Image

from train.encoders.preprocess import PreprocessSpec, blank_array, preprocess_image, preprocess_images

MEAN, STD = open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD


def _noise(w: int, h: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    """A random image of a given size and mode."""
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")
    return img if mode == "RGB" else img.convert(mode)


ODD_IMAGES = [
    _noise(300, 200), _noise(37, 91, seed=1), _noise(65, 64, "L", 2), _noise(128, 50, "RGBA", 3),
    _noise(99, 71, "P", 4), _noise(64, 64, seed=5), _noise(1, 300, seed=6), _noise(20, 20, seed=7),
]


@pytest.mark.parametrize(
    "size,resize_mode,interpolation",
    [(64, "shortest", "bicubic"), (224, "shortest", "bicubic"), ((64, 48), "shortest", "bicubic"),
     (64, "longest", "bilinear"), (64, "squash", "bicubic")],
)
def test_matches_open_clip_transform(size, resize_mode, interpolation):
    ref = open_clip.image_transform(size, is_train=False, mean=MEAN, std=STD,
                                    resize_mode=resize_mode, interpolation=interpolation)
    spec = PreprocessSpec.from_open_clip(
        {"size": size, "mean": MEAN, "std": STD, "resize_mode": resize_mode, "interpolation": interpolation})
    for img in ODD_IMAGES:
        ours = preprocess_image(img, spec)
        try:
            theirs = ref(img).numpy()
        except ValueError:  # open_clip cannot resize a 1x300 image to a 0-pixel side; we give a blank
            assert ours is None
            continue
        assert ours.shape == theirs.shape
        assert np.abs(ours - theirs).max() <= 1e-6, (img.size, img.mode)


def test_paths_bytes_and_pil_agree(tmp_path):
    spec = PreprocessSpec.from_open_clip({"size": 64, "mean": MEAN, "std": STD})
    img = _noise(120, 80)
    img.save(tmp_path / "a.png")
    from_path = preprocess_image(tmp_path / "a.png", spec)
    from_str = preprocess_image(str(tmp_path / "a.png"), spec)
    from_bytes = preprocess_image((tmp_path / "a.png").read_bytes(), spec)
    np.testing.assert_array_equal(from_path, preprocess_image(img, spec))
    np.testing.assert_array_equal(from_path, from_str)
    np.testing.assert_array_equal(from_path, from_bytes)


def test_missing_and_corrupt_images_become_counted_blanks(tmp_path):
    spec = PreprocessSpec.from_open_clip({"size": 64, "mean": MEAN, "std": STD})
    good = tmp_path / "good.jpg"
    _noise(90, 70).save(good)
    (tmp_path / "corrupt.png").write_bytes(b"not an image at all")
    buf = io.BytesIO()
    _noise(90, 70).save(buf, format="JPEG")
    (tmp_path / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    items = [good, tmp_path / "missing.png", tmp_path / "corrupt.png", tmp_path / "truncated.jpg", None, ""]
    batch, n_blank = preprocess_images(items, spec)
    assert batch.shape == (6, 3, 64, 64) and batch.dtype == np.float32
    assert n_blank == 5
    assert np.abs(batch[0]).sum() > 0
    for row in batch[1:]:
        np.testing.assert_array_equal(row, blank_array(spec))  # the mean colour normalises to zeros


def test_spec_round_trips_through_json():
    spec = PreprocessSpec.from_open_clip({"size": (64, 48), "mean": MEAN, "std": STD, "interpolation": "random"})
    assert spec.interpolation == "bicubic"
    assert PreprocessSpec.model_validate_json(spec.model_dump_json()) == spec
