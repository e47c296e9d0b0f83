"""The MiniLM sentence tower equals the package's own sentence-transformers encoding."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from train.encoders import MiniLMConfig, build_encoder
from train.encoders.minilm import bundled_model_dir, read_sentence_config

SENTENCES = [
    "A red cotton T-shirt with a round neck.",
    "",
    "   leading and trailing spaces   ",
    "Baby stroller, lightweight, foldable; fits in a car boot. " * 40,  # > 256 tokens: truncated
    "Ünïcödé café — 123 ✓",
]


@pytest.fixture(scope="module")
def tower():
    return build_encoder(MiniLMConfig())


def test_pipeline_is_read_from_the_model_directory():
    assert read_sentence_config(bundled_model_dir()) == (256, True)


def test_equals_sentence_transformers(tower, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(str(bundled_model_dir()), device="cpu")
    expected = reference.encode(SENTENCES, convert_to_numpy=True, batch_size=8)
    prepared, n_empty = tower.prepare_counted(SENTENCES)
    assert n_empty == 1 and prepared["input_ids"].shape == (5, 256)
    tokens = reference.preprocess(SENTENCES)
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        assert torch.equal(prepared[key], tokens[key]), key
    with torch.no_grad():
        ours = tower(prepared).numpy()
    assert ours.shape == (5, 384) == (5, tower.out_dim)
    np.testing.assert_allclose(ours, expected, atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


def test_batch_padding_does_not_change_a_sentence(tower):
    with torch.no_grad():
        alone = tower(tower.prepare(SENTENCES[:1]))
        padded = tower(tower.prepare(SENTENCES[:4]))[:1]
    torch.testing.assert_close(alone, padded, atol=1e-5, rtol=0)


def test_overrides_change_output_and_identity(tower):
    raw = build_encoder(MiniLMConfig(normalize=False, max_seq_length=32))
    assert raw.max_seq_length == 32 and "normalize=False" in raw.identity()
    assert "normalize=True" in tower.identity() and raw.identity() != tower.identity()
    with torch.no_grad():
        norms = raw(raw.prepare(SENTENCES[:1])).norm(dim=1)
    assert abs(float(norms[0]) - 1.0) > 1e-3
