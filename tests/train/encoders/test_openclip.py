"""open_clip towers equal encode_image / encode_text; weights from seeds, checkpoints and tags."""
from __future__ import annotations

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from pydantic import TypeAdapter, ValidationError
from safetensors.torch import save_file
from torch import nn

from train.encoders import (
    ENCODERS, TINY_CLIP, EncoderConfig, OpenClipImageConfig, OpenClipTextConfig,
    PretrainedUnavailableError, build_encoder,
)
from train.encoders.openclip import create_clip

TEXTS = ["a red round shoe", "", "Blue cotton T-shirt, size M. " * 8, "café ünïcode ✓"]


def _reference(seed: int) -> open_clip.CLIP:
    """The same tiny model built directly with open_clip."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return open_clip.create_model(TINY_CLIP).eval()


def _images() -> list[Image.Image]:
    """A few odd-sized random images."""
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in [(90, 60), (64, 64), (33, 200)]]


def test_image_tower_equals_encode_image():
    tower = build_encoder(OpenClipImageConfig(model=TINY_CLIP, init_seed=3))
    ref = _reference(3)
    preprocess = open_clip.image_transform(64, is_train=False)
    pixels = torch.stack([preprocess(im) for im in _images()])  # (3, 3, 64, 64)
    with torch.no_grad():
        ours = tower(tower.prepare(_images()))
        theirs = ref.encode_image(pixels)
    assert ours.shape == (3, tower.out_dim) == (3, 64)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)


def test_text_tower_equals_encode_text():
    tower = build_encoder(OpenClipTextConfig(model=TINY_CLIP, init_seed=3))
    ref = _reference(3)
    tokens = open_clip.get_tokenizer(TINY_CLIP)(TEXTS)
    prepared, n_empty = tower.prepare_counted(TEXTS)
    assert n_empty == 1
    assert torch.equal(prepared, tokens)
    with torch.no_grad():
        torch.testing.assert_close(tower(prepared), ref.encode_text(tokens), atol=1e-6, rtol=0)


def test_shorter_context_keeps_short_texts_equal():
    full = build_encoder(OpenClipTextConfig(model=TINY_CLIP, init_seed=3))
    short = build_encoder(OpenClipTextConfig(model=TINY_CLIP, init_seed=3, context_length=16))
    with torch.no_grad():
        torch.testing.assert_close(short(short.prepare(TEXTS[:2])), full(full.prepare(TEXTS[:2])), atol=1e-5, rtol=0)
    assert short.identity() != full.identity()


def test_towers_share_one_load_but_not_a_half():
    image = build_encoder(OpenClipImageConfig(model=TINY_CLIP, init_seed=11))
    text = build_encoder(OpenClipTextConfig(model=TINY_CLIP, init_seed=11))
    image2 = build_encoder(OpenClipImageConfig(model=TINY_CLIP, init_seed=11))
    assert image._shared is text._shared
    assert image2.visual is not image.visual
    assert not any(n.startswith("transformer.") for n, _ in image.named_parameters())
    assert image.identity() == image2.identity()


class _Recorder(nn.Module):
    """A hook that changes nothing and records which blocks it saw."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[int] = []

    def on_embed(self, state):
        self.seen.append(-1)
        return state

    def before_block(self, index, state):
        self.seen.append(index)
        return state


@pytest.mark.parametrize("cfg", [OpenClipImageConfig(model=TINY_CLIP, init_seed=0),
                                 OpenClipTextConfig(model=TINY_CLIP, init_seed=0)])
def test_token_hook_is_called_per_block(cfg):
    tower = build_encoder(cfg)
    raw = _images() if tower.modality == "image" else TEXTS
    prepared = tower.prepare(raw)
    before, identity = tower(prepared).detach(), tower.identity()
    tower.set_token_hook(_Recorder())
    after = tower(prepared).detach()
    assert tower.token_hook.seen == [-1, 0, 1]
    torch.testing.assert_close(after, before, atol=0, rtol=0)
    assert tower.identity() != identity


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_checkpoint_round_trip(tmp_path, suffix):
    source = create_clip(OpenClipImageConfig(model=TINY_CLIP, init_seed=7))
    path = tmp_path / f"tiny{suffix}"
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save({"state_dict": state}, path)
    image = build_encoder(OpenClipImageConfig(model=TINY_CLIP, checkpoint=path))
    text = build_encoder(OpenClipTextConfig(model=TINY_CLIP, checkpoint=path))
    pixels, tokens = image.prepare(_images()), text.prepare(TEXTS)
    with torch.no_grad():
        torch.testing.assert_close(image(pixels), source.encode_image(pixels), atol=1e-6, rtol=0)
        torch.testing.assert_close(text(tokens), source.encode_text(tokens), atol=1e-6, rtol=0)
    seeded = build_encoder(OpenClipImageConfig(model=TINY_CLIP, init_seed=7))
    assert image.identity().split("|state=")[1] == seeded.identity().split("|state=")[1]


class _Evil:
    """Anything that is not a tensor: weights_only loading must refuse it."""


def test_unsafe_or_mismatched_checkpoints_are_refused(tmp_path):
    pickled = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "obj": _Evil()}, pickled)
    with pytest.raises(ValueError, match="weights_only"):
        build_encoder(OpenClipImageConfig(model=TINY_CLIP, checkpoint=pickled))
    wrong = tmp_path / "wrong.safetensors"
    save_file({"w": torch.zeros(2)}, str(wrong))
    with pytest.raises(ValueError, match="does not fit"):
        build_encoder(OpenClipImageConfig(model=TINY_CLIP, checkpoint=wrong))


def test_offline_pretrained_tag_gives_a_clear_error(monkeypatch, tmp_path):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(PretrainedUnavailableError, match="checkpoint"):
        build_encoder(OpenClipImageConfig(model="ViT-B-32", pretrained="openai"))
    with pytest.raises(ValueError, match="unknown pretrained tag"):
        build_encoder(OpenClipImageConfig(model="ViT-B-32", pretrained="no-such-tag"))


def test_configs_validate_through_the_union():
    adapter = TypeAdapter(EncoderConfig)
    cfg = adapter.validate_python({"name": "openclip_text", "model": TINY_CLIP, "init_seed": 0})
    assert isinstance(cfg, OpenClipTextConfig)
    assert set(ENCODERS) == {"openclip_image", "openclip_text", "minilm", "timm_cnn"}
    assert adapter.validate_python({"name": "minilm"}).name == "minilm"
    for bad in [{"name": "openclip_image"}, {"name": "openclip_image", "init_seed": 0, "pretrained": "openai"},
                {"name": "openclip_image", "init_seed": 0, "typo": 1}, {"name": "nope"}]:
        with pytest.raises(ValidationError):
            adapter.validate_python(bad)
