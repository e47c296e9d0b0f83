"""tokenizer.json reproduces the training tokenisation (open_clip BPE rebuilt; MiniLM copied)."""
from __future__ import annotations

import random

import numpy as np
import open_clip
import pytest
from tokenizers import Tokenizer

from export.tokenizer import (CLIP_INPUTS, PARITY_TEXTS, clip_tokenizer, encode_texts,
                              mismatches, tokenizer_for)
from train.encoders import TINY_CLIP, MiniLMConfig, OpenClipTextConfig, build_encoder
from train.synthetic import describe

POOL = ("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 ,.;:'\"!?-_()[]{}&#@"
        "\u00e9\u00fc\u00df\u00e7\u00f1\u4e2d\u6587\U0001f600\t\n\u2019\u201c\ufb01\uff21"
        "\u03a3\u03c3\u03c2\u0391\u03b2")


def random_texts(n: int, seed: int = 0) -> list[str]:
    """Random strings over a pool of tricky characters (quotes, ligatures, width, sigma)."""
    rng = random.Random(seed)
    return ["".join(rng.choice(POOL) for _ in range(rng.randint(0, 60))) for _ in range(n)]


def product_texts(n: int) -> list[str]:
    """Texts like the synthetic catalogue's."""
    rng = np.random.default_rng(0)
    return [describe(rng, "mug", "red", "striped", "rustic") for _ in range(n)]


@pytest.mark.parametrize("context_length", [32, 77])
def test_clip_tokenizer_equals_open_clip(context_length):
    reference = open_clip.get_tokenizer("ViT-B-32", context_length=context_length)
    texts = PARITY_TEXTS + product_texts(50) + random_texts(800, seed=context_length)
    ours = encode_texts(clip_tokenizer(context_length), texts, CLIP_INPUTS)["input_ids"]
    theirs = reference(texts, context_length=context_length).numpy()
    bad = [texts[i] for i in np.flatnonzero((ours != theirs).any(axis=1))]
    assert bad == []
    long = ours[texts.index("word " * 300)]
    assert long[0] == 49406 and long[-1] == 49407  # truncation keeps SOT and EOT


def test_clip_tokenizer_round_trips_through_json():
    tokenizer = clip_tokenizer(32)
    again = Tokenizer.from_str(tokenizer.to_str())
    texts = PARITY_TEXTS + random_texts(50)
    np.testing.assert_array_equal(encode_texts(tokenizer, texts, CLIP_INPUTS)["input_ids"],
                                  encode_texts(again, texts, CLIP_INPUTS)["input_ids"])


def test_known_gap_is_caught_by_the_parity_check():
    tower = build_encoder(OpenClipTextConfig(model=TINY_CLIP, init_seed=0))
    tokenizer, kind, names = tokenizer_for(tower)
    assert kind == "clip" and names == ["input_ids"]
    assert mismatches(tower, tokenizer, names, PARITY_TEXTS + product_texts(20)) == []
    mojibake = "caf\u00c3\u00a9 cr\u00c3\u00a8me"  # ftfy repairs it to "café crème"; we cannot
    assert mismatches(tower, tokenizer, names, [mojibake]) == [mojibake]


def test_minilm_tokenizer_copy_keeps_truncation_and_padding():
    tower = build_encoder(MiniLMConfig())
    tokenizer, kind, names = tokenizer_for(tower)
    assert kind == "bert" and names == ["input_ids", "attention_mask"]
    assert tokenizer.truncation["max_length"] == 256
    texts = PARITY_TEXTS + product_texts(20) + random_texts(100)
    assert mismatches(tower, tokenizer, names, texts, batch=16) == []
    ids = encode_texts(tokenizer, ["a", "a b c d e"], names)["input_ids"]
    assert ids.shape == (2, 7)  # padded to the longest text of the batch
