"""Synthetic bundles for serving tests and benchmarks, with tiny real ONNX encoders.

The encoders follow the exporter's contract exactly (index.manifest.EncoderSpec): an image tower
"image" float32 (B, 3, S, S) -> "image_vec" (B, d) (average pool to a 4x4 grid, then a linear
map) and a text tower "input_ids"/"attention_mask" int64 (B, L) -> "text_vec" (B, d) (embedding
lookup, masked mean, linear map), built with the `onnx` helper API; a WordLevel tokenizer.json
made with `tokenizers`; a preprocess.json with train.encoders.preprocess.PreprocessSpec's fields.
User 0 (first row) is the encoding of `probe_item()`, so an upsert of the probe item must become
that user's top recommendation.
"""
from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from PIL import Image
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

from index import ann, bundle
from index.manifest import Counts, EncoderSpec, Manifest
from serve.encoder import ItemEncoder
from index.preprocess import ImageSpec

IMAGE_SIZE, CONTEXT, GRID = 32, 16, 4
MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
WORDS = ("red green blue black white yellow round square striped dotted shoe shirt lamp mug "
         "chair bag watch hat sofa desk leather cotton steel wooden soft bright dark small large "
         "classic modern vintage").split()


@dataclass
class BundleSpec:
    """Shape and content of a synthetic bundle."""

    n_users: int = 50
    n_items: int = 200
    dim: int = 16
    factory: str = "Flat"
    encoders: bool = True
    seed: int = 0
    user_id_step: int = 10          # user ids 0, 10, 20, ...: not row numbers
    item_id_offset: int = 1000      # item ids 1000, 1001, ...
    seen_per_user: int = 5
    items: np.ndarray | None = field(default=None, repr=False)  # (n_items, dim) override
    users: np.ndarray | None = field(default=None, repr=False)  # (n_users, dim) override
    search_params: dict = field(default_factory=dict)           # ef_search= / nprobe=
    event_watermark: int = 0                                    # last store event it covers


def _save(model: onnx.ModelProto, path: Path) -> None:
    """Check and write an ONNX model."""
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def image_tower(path: Path, dim: int, rng: np.random.Generator) -> None:
    """"image" (B, 3, S, S) -> avg-pool to GRIDxGRID -> flatten -> linear -> "image_vec" (B, d)."""
    cell = IMAGE_SIZE // GRID
    w = numpy_helper.from_array(rng.standard_normal((3 * GRID * GRID, dim)).astype(np.float32), "W")
    nodes = [helper.make_node("AveragePool", ["image"], ["pooled"], kernel_shape=[cell, cell],
                              strides=[cell, cell]),
             helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
             helper.make_node("MatMul", ["flat", "W"], ["image_vec"])]
    graph = helper.make_graph(
        nodes, "image_tower",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, IMAGE_SIZE, IMAGE_SIZE])],
        [helper.make_tensor_value_info("image_vec", TensorProto.FLOAT, ["batch", dim])], [w])
    _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def text_tower(path: Path, dim: int, vocab: int, rng: np.random.Generator, hidden: int = 12,
               length: int | str = "length") -> None:
    """Token ids + mask (B, L) -> embedding -> masked mean -> linear -> "text_vec" (B, d)."""
    inits = [numpy_helper.from_array(rng.standard_normal((vocab, hidden)).astype(np.float32), "E"),
             numpy_helper.from_array(rng.standard_normal((hidden, dim)).astype(np.float32), "W"),
             numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1"),
             numpy_helper.from_array(np.array([2], dtype=np.int64), "axis2"),
             numpy_helper.from_array(np.array(1e-6, dtype=np.float32), "eps")]
    nodes = [helper.make_node("Gather", ["E", "input_ids"], ["emb"]),                 # (B, L, h)
             helper.make_node("Cast", ["attention_mask"], ["maskf"], to=TensorProto.FLOAT),
             helper.make_node("Unsqueeze", ["maskf", "axis2"], ["mask3"]),            # (B, L, 1)
             helper.make_node("Mul", ["emb", "mask3"], ["masked"]),
             helper.make_node("ReduceSum", ["masked", "axis1"], ["total"], keepdims=0),  # (B, h)
             helper.make_node("ReduceSum", ["mask3", "axis1"], ["count"], keepdims=0),   # (B, 1)
             helper.make_node("Max", ["count", "eps"], ["safe"]),
             helper.make_node("Div", ["total", "safe"], ["mean"]),
             helper.make_node("MatMul", ["mean", "W"], ["text_vec"])]
    ids = [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", length])
           for n in ("input_ids", "attention_mask")]
    graph = helper.make_graph(nodes, "text_tower", ids, [
        helper.make_tensor_value_info("text_vec", TensorProto.FLOAT, ["batch", dim])], inits)
    _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def tokenizer_json(path: Path) -> int:
    """A lower-casing whitespace WordLevel tokenizer over WORDS; returns the vocabulary size."""
    vocab = {"[PAD]": 0, "[UNK]": 1} | {w: i + 2 for i, w in enumerate(WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))
    return len(vocab)


def preprocess_json(path: Path) -> ImageSpec:
    """preprocess.json in PreprocessSpec's format."""
    spec = ImageSpec(size=(IMAGE_SIZE, IMAGE_SIZE), mean=MEAN, std=STD)
    path.write_text(spec.model_dump_json(), encoding="utf-8")
    return spec


def write_encoders(target: Path, dim: int, seed: int) -> ItemEncoder:
    """Write the encoder files into a bundle directory; returns an encoder over them."""
    rng = np.random.default_rng(seed + 1000)
    image_tower(target / bundle.IMAGE_ENCODER, dim, rng)
    vocab = tokenizer_json(target / bundle.TOKENIZER)
    text_tower(target / bundle.TEXT_ENCODER, dim, vocab, rng)
    spec = preprocess_json(target / bundle.PREPROCESS)
    return ItemEncoder.from_files(dim, True, target / bundle.IMAGE_ENCODER, spec,
                                  target / bundle.TEXT_ENCODER, target / bundle.TOKENIZER, CONTEXT)


def png(color: tuple[int, int, int], size: tuple[int, int] = (40, 30), seed: int = 0) -> bytes:
    """PNG bytes of a noisy image around a colour."""
    rng = np.random.default_rng(seed)
    base = np.array(color, dtype=np.int16)[None, None, :]
    pixels = np.clip(base + rng.integers(-30, 30, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, format="PNG")
    return buf.getvalue()


def probe_item() -> tuple[bytes, str]:
    """The item whose encoding is user 0's vector."""
    return png((200, 40, 40), seed=7), "red leather shoe classic"


def _unit(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length."""
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def encoder_spec() -> EncoderSpec:
    """The manifest's encoder section for write_encoders' files."""
    return EncoderSpec(image_size=IMAGE_SIZE, mean=MEAN, std=STD, context_length=CONTEXT,
                       tokenizer="bert", image_encoder=bundle.IMAGE_ENCODER,
                       text_encoder=bundle.TEXT_ENCODER, tokenizer_file=bundle.TOKENIZER,
                       preprocess_file=bundle.PREPROCESS)


def write_test_bundle(bundles_dir: Path, spec: BundleSpec | None = None,
                      publish: bool = True) -> Path:
    """Write (and by default publish) a synthetic bundle; returns its directory."""
    spec = spec or BundleSpec()
    rng = np.random.default_rng(spec.seed)
    user_ids = np.arange(spec.n_users, dtype=np.int64) * spec.user_id_step
    item_ids = np.arange(spec.n_items, dtype=np.int64) + spec.item_id_offset
    items = spec.items if spec.items is not None else _unit(
        rng.standard_normal((spec.n_items, spec.dim)))
    users = (spec.users.copy() if spec.users is not None
             else _unit(rng.standard_normal((spec.n_users, spec.dim))))
    seen = item_ids[np.stack([rng.choice(spec.n_items, spec.seen_per_user, replace=False)
                              for _ in range(spec.n_users)])] if spec.n_users else np.zeros(0)

    def write(target: Path) -> None:
        if spec.encoders:
            encoder = write_encoders(target, spec.dim, spec.seed)
            users[0] = encoder.encode(*probe_item())
        np.save(target / bundle.USERS, users)
        np.save(target / bundle.USER_IDS, user_ids)
        index = ann.build(items, item_ids, spec.factory)
        ann.set_search_params(index, **spec.search_params)
        ann.save(index, target / bundle.ITEMS_INDEX)
        np.save(target / bundle.ITEM_IDS, item_ids)
        np.save(target / bundle.POPULARITY, rng.integers(0, 1000, spec.n_items).astype(np.int64))
        np.save(target / bundle.SEEN_INDPTR,
                np.arange(spec.n_users + 1, dtype=np.int64) * spec.seen_per_user)
        np.save(target / bundle.SEEN_ITEMS, seen.reshape(-1).astype(np.int64))

    manifest = Manifest(source_run="tests/synthetic", config_hash=f"seed{spec.seed}",
                        backbone="lightgcn", dim=spec.dim, normalized=True,
                        faiss_factory=spec.factory,
                        counts=Counts(users=spec.n_users, items=spec.n_items,
                                      cold_start=spec.encoders),
                        encoder=encoder_spec() if spec.encoders else None,
                        metrics={"recall@20": 0.1}, event_watermark=spec.event_watermark)
    path = bundle.write_bundle(bundles_dir, write, manifest)
    if publish:
        bundle.publish(bundles_dir, path.name)
    return path


def corrupt(path: Path, name: str = bundle.USERS) -> None:
    """Flip bytes at the end of a bundle file (size unchanged, sha256 changed)."""
    target = path / name
    data = bytearray(target.read_bytes())
    data[-8:] = bytes(255 - b for b in data[-8:])
    target.write_bytes(bytes(data))


def preprocess_dict() -> dict:
    """preprocess.json contents as a dict."""
    return json.loads(ImageSpec(size=(IMAGE_SIZE, IMAGE_SIZE), mean=MEAN, std=STD).model_dump_json())


def clustered(n: int, dim: int, seed: int, centres: int = 2000, noise: float = 0.35) -> np.ndarray:
    """Unit vectors around fixed Gaussian centres (SERVING.md §2.4's regime)."""
    c = np.random.default_rng(12345).standard_normal((centres, dim)).astype(np.float32)
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 200_000):
        m = min(200_000, n - start)
        block = c[rng.integers(0, centres, m)] + noise * rng.standard_normal((m, dim), np.float32)
        out[start:start + m] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def republish(root: Path, source: Path) -> int:
    """Publish a new version whose files are hard links to `source`'s; returns its number."""
    manifest = Manifest.model_validate_json((source / bundle.MANIFEST).read_text())

    def link(tmp: Path) -> None:
        for name in manifest.files:
            os.link(source / name, tmp / name)

    path = bundle.write_bundle(root, link, manifest.model_copy(update={"files": {}}))
    bundle.publish(root, path.name, verify=False)
    return int(path.name[1:])
