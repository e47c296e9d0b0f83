"""Feature cache: hits on identical inputs, misses on any changed item or encoder, atomic files."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from train.encoders import TINY_CLIP, OpenClipImageConfig, OpenClipTextConfig, build_encoder
from train.encoders.cache import extract, extract_features

TEXTS = ["red round shoe", "", "blue square hat", None, "green striped scarf"]


@pytest.fixture(scope="module")
def text_tower():
    return build_encoder(OpenClipTextConfig(model=TINY_CLIP, init_seed=0))


@pytest.fixture(scope="module")
def image_tower():
    return build_encoder(OpenClipImageConfig(model=TINY_CLIP, init_seed=0))


def _png(path, colour: tuple[int, int, int], size=(50, 40)) -> None:
    """Write a plain-colour PNG with one dark square."""
    arr = np.full((size[1], size[0], 3), colour, dtype=np.uint8)
    arr[5:15, 5:15] = 0
    Image.fromarray(arr).save(path)


def test_text_hit_miss_and_report(text_tower, tmp_path):
    first = extract(text_tower, TEXTS, tmp_path, batch_size=2, progress=False)
    assert first.features.shape == (5, 64) and first.features.dtype == np.float32
    assert not first.cache_hit and first.n_missing == 2
    again = extract(text_tower, TEXTS, tmp_path, batch_size=4, progress=False)
    assert again.cache_hit and again.n_missing == 2 and again.path == first.path
    np.testing.assert_array_equal(again.features, first.features)
    with torch.no_grad():
        direct = text_tower(text_tower.prepare(["" if t is None else t for t in TEXTS])).numpy()
    np.testing.assert_allclose(first.features, direct, atol=1e-6)
    changed = extract(text_tower, TEXTS[:2] + ["blue square cap"] + TEXTS[3:], tmp_path, progress=False)
    assert not changed.cache_hit and changed.path != first.path
    np.testing.assert_allclose(np.delete(changed.features, 2, 0), np.delete(first.features, 2, 0), atol=1e-6)
    assert not np.allclose(changed.features[2], first.features[2])
    assert not list(tmp_path.glob("*.tmp")) and len(list(tmp_path.glob("*.npy"))) == 2


def test_changed_encoder_misses(text_tower, tmp_path):
    base = extract(text_tower, TEXTS, tmp_path, progress=False)
    other_seed = build_encoder(OpenClipTextConfig(model=TINY_CLIP, init_seed=1))
    assert not extract(other_seed, TEXTS, tmp_path, progress=False).cache_hit
    shorter = build_encoder(OpenClipTextConfig(model=TINY_CLIP, init_seed=0, context_length=16))
    assert not extract(shorter, TEXTS, tmp_path, progress=False).cache_hit
    saved = text_tower.ln_final.weight.detach().clone()
    with torch.no_grad():
        text_tower.ln_final.weight.add_(0.5)  # weights edited in place: the identity follows the state
    try:
        edited = extract(text_tower, TEXTS, tmp_path, progress=False)
    finally:
        with torch.no_grad():
            text_tower.ln_final.weight.copy_(saved)
    assert not edited.cache_hit and edited.path != base.path
    assert extract(text_tower, TEXTS, tmp_path, progress=False).cache_hit


def test_images_keyed_by_file_bytes(image_tower, tmp_path, caplog):
    data = tmp_path / "data"
    data.mkdir()
    paths = [data / f"{i}.png" for i in range(3)]
    for p, colour in zip(paths, [(200, 10, 10), (10, 200, 10), (10, 10, 200)]):
        _png(p, colour)
    (data / "broken.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg")
    items = paths + [data / "absent.png", data / "broken.jpg"]
    cache = tmp_path / "cache"
    with caplog.at_level(logging.WARNING):
        first = extract(image_tower, items, cache, batch_size=2, progress=False)
    assert first.n_missing == 2 and "2 of 5 images missing or unreadable" in caplog.text
    np.testing.assert_allclose(first.features[3], first.features[4], atol=1e-6)  # both blank
    assert extract(image_tower, items, cache, progress=False).cache_hit
    _png(paths[1], (10, 200, 11))  # same path, new bytes
    changed = extract(image_tower, items, cache, progress=False)
    assert not changed.cache_hit
    assert not np.allclose(changed.features[1], first.features[1])
    np.testing.assert_allclose(changed.features[0], first.features[0], atol=1e-6)
    same_bytes_elsewhere = data / "copy.png"
    same_bytes_elsewhere.write_bytes(paths[0].read_bytes())
    moved = extract(image_tower, [same_bytes_elsewhere] + items[1:], cache, progress=False)
    assert moved.cache_hit and moved.path == changed.path


def test_corrupt_cache_file_is_recomputed(text_tower, tmp_path):
    first = extract(text_tower, TEXTS, tmp_path, progress=False)
    first.path.write_bytes(b"garbage")
    again = extract(text_tower, TEXTS, tmp_path, progress=False)
    assert not again.cache_hit
    np.testing.assert_array_equal(again.features, first.features)
    np.testing.assert_array_equal(np.load(first.path), first.features)


def test_extract_features_returns_the_array(text_tower, tmp_path):
    feats = extract_features(text_tower, TEXTS[:3], tmp_path, batch_size=64, device="cpu")
    assert feats.shape == (3, 64) and feats.dtype == np.float32
    assert extract_features(text_tower, [], tmp_path).shape == (0, 64)
    assert text_tower.training is False and next(text_tower.parameters()).device.type == "cpu"
