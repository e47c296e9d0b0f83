"""Exporter end to end on a tiny run: bundle contents, ONNX parity, int8, refusals, publishing."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import faiss
import numpy as np
import onnxruntime as ort
import pytest
import torch
from tokenizers import Tokenizer

from export import ExportError, export_run, onnx_export
from train.run import CONFIG, load_run
from export.__main__ import main as export_main
from export.bundle import cold_vectors
from export.tokenizer import PARITY_TEXTS
from index import ann
from index.bundle import (CURRENT, IMAGE_ENCODER, ITEM_IDS, ITEMS_INDEX, MANIFEST, POPULARITY,
                          PREPROCESS, SEEN_INDPTR, SEEN_ITEMS, TEXT_ENCODER, TOKENIZER, USER_IDS,
                          USERS, BundleError, current_version, list_versions, load_bundle)
from train.coldstart import hold_out_items
from train.config import TrainConfig, load_config
from train.data import load_dataset
from train.encoders import build_encoder
from train.encoders.preprocess import PreprocessSpec, preprocess_images
from train.stage1 import run_stage1
from train.synthetic import generate

NPY = (USERS, USER_IDS, ITEM_IDS, POPULARITY, SEEN_INDPTR, SEEN_ITEMS)


def tiny_config(data: Path, cache: Path, multimodal: bool) -> TrainConfig:
    """configs/demo.yaml in miniature (or its ID-only variant)."""
    raw = {"seed": 0, "data": {"path": str(data)}, "optim": {"batch_size": 512, "epochs": 3},
           "eval": {"ks": [10, 20], "patience": 5},
           "backbone": {"name": "lightgcn", "embedding_size": 32, "n_layers": 2}}
    if multimodal:
        raw |= {"encoders": {"image": {"name": "openclip_image", "model": "ptmrec-tiny",
                                       "init_seed": 0},
                             "text": {"name": "minilm"}, "cache_dir": str(cache)},
                "heads": {"modalities": ["image", "text"]},
                "cold_start": {"holdout_fraction": 0.1, "ks": [10, 20]}}
    else:
        raw |= {"backbone": {"name": "bpr", "embedding_size": 16}}
    return TrainConfig.model_validate(raw)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("data")
    generate(d, n_users=120, n_items=80, seed=0)
    return d


@pytest.fixture(scope="module")
def mm_run(tmp_path_factory, data_dir) -> Path:
    run = tmp_path_factory.mktemp("mm_run")
    cfg = tiny_config(data_dir, tmp_path_factory.mktemp("cache"), multimodal=True)
    run_stage1(cfg, run, torch.device("cpu"))
    return run


@pytest.fixture(scope="module")
def id_run(tmp_path_factory, data_dir) -> Path:
    run = tmp_path_factory.mktemp("id_run")
    run_stage1(tiny_config(data_dir, run / "cache", multimodal=False), run, torch.device("cpu"))
    return run


@pytest.fixture(scope="module")
def fp32_bundle(mm_run, tmp_path_factory) -> Path:
    return export_run(mm_run, tmp_path_factory.mktemp("bundles"), exporter="dynamo")


@pytest.fixture(scope="module")
def int8_bundle(mm_run, tmp_path_factory) -> Path:
    return export_run(mm_run, tmp_path_factory.mktemp("bundles8"), quantize="int8",
                      exporter="legacy", parity_items=16)


@pytest.fixture(scope="module")
def rebuilt(mm_run):
    return load_run(mm_run)


@pytest.fixture(scope="module")
def towers(mm_run):
    cfg = load_config(mm_run / CONFIG)
    return {"image": build_encoder(cfg.encoders.image), "text": build_encoder(cfg.encoders.text)}


def test_bundle_manifest_follows_the_contract(fp32_bundle, mm_run):
    bundle = load_bundle(fp32_bundle)
    m = bundle.manifest
    for name in (*NPY, ITEMS_INDEX, IMAGE_ENCODER, TEXT_ENCODER, TOKENIZER, PREPROCESS):
        assert bundle.has(name), name
    assert m.version == 1 and m.metric == "ip" and not m.normalized and m.dim == 32
    assert m.counts.cold_start and m.counts.items == 80 and m.source_run == str(mm_run.resolve())
    assert m.config_hash == load_config(mm_run / CONFIG).config_hash()
    enc = m.encoder
    assert (enc.image_size, enc.tokenizer, enc.text_padding) == (64, "bert", "longest")
    assert enc.text_inputs == ["input_ids", "attention_mask"] and enc.context_length == 256
    assert enc.fusion == "mean" and enc.blank_image == "mean"
    assert enc.image_quantization == enc.text_quantization == "none"
    for key in ("test.recall@20", "valid.recall@20", "cold_start.heads.recall@20",
                "parity.text.cos_min", "parity.fused.cos_min"):
        assert key in m.metrics, key
    assert m.metrics["parity.image.max_abs"] <= 1e-4 and m.metrics["parity.text.max_abs"] <= 1e-4
    assert not [p.name for p in fp32_bundle.parent.iterdir() if p.name.startswith(".")]
    assert not list(fp32_bundle.glob("*.data"))  # single-file ONNX


def test_arrays_agree_with_the_dataset(fp32_bundle, data_dir):
    arrays = {n: np.load(fp32_bundle / n, allow_pickle=False) for n in NPY}  # no pickle anywhere
    train = hold_out_items(load_dataset(data_dir), 0.1, seed=0)[0].train
    user_ids, item_ids = arrays[USER_IDS], arrays[ITEM_IDS]
    assert user_ids.dtype == item_ids.dtype == np.int64 and arrays[USERS].dtype == np.float32
    np.testing.assert_array_equal(user_ids, np.unique(train[:, 0]))
    np.testing.assert_array_equal(item_ids, np.arange(80))
    np.testing.assert_array_equal(arrays[POPULARITY], np.bincount(train[:, 1], minlength=80))
    indptr, seen = arrays[SEEN_INDPTR], arrays[SEEN_ITEMS]
    for row in (0, 7, len(user_ids) - 1):
        expected = np.sort(train[train[:, 0] == user_ids[row], 1])
        np.testing.assert_array_equal(np.sort(seen[indptr[row]:indptr[row + 1]]), expected)


def test_flat_search_equals_brute_force(fp32_bundle):
    index = ann.load(fp32_bundle / ITEMS_INDEX)
    vectors = faiss.downcast_index(index.index).reconstruct_n(0, index.ntotal)  # (I, d)
    ids = ann.live_ids(index)
    users = np.load(fp32_bundle / USERS)[:5]
    _, found = ann.search(index, users, 10)
    expected = ids[np.argsort(-(users @ vectors.T), axis=1, kind="stable")[:, :10]]
    np.testing.assert_array_equal(found, expected)


def test_cold_items_carry_head_vectors(fp32_bundle, rebuilt, data_dir):
    cold = hold_out_items(load_dataset(data_dir), 0.1, seed=0)[1].items
    index = ann.load(fp32_bundle / ITEMS_INDEX)
    inner = faiss.downcast_index(index.index)
    row = {int(i): r for r, i in enumerate(ann.live_ids(index))}
    stored = np.stack([inner.reconstruct(row[int(i)]) for i in cold])
    np.testing.assert_allclose(stored, cold_vectors(rebuilt, cold), atol=1e-6)
    popularity = np.load(fp32_bundle / POPULARITY)
    assert (popularity[cold] == 0).all() and len(cold) == 8
    warm = np.setdiff1d(np.arange(80), cold)[:5]
    with torch.no_grad():
        items = rebuilt.model.item_embeddings().numpy()
    np.testing.assert_allclose(np.stack([inner.reconstruct(row[int(i)]) for i in warm]),
                               items[warm], atol=1e-6)


def _serving_vectors(bundle: Path, modality: str, raw: list) -> np.ndarray:
    """Encode items the way the torch-free server does, from the bundle's files only."""
    manifest = load_bundle(bundle).manifest
    if modality == "image":
        spec = PreprocessSpec.model_validate_json((bundle / PREPROCESS).read_text())
        feeds = {"image": preprocess_images(raw, spec)[0]}
    else:
        enc = Tokenizer.from_file(str(bundle / TOKENIZER)).encode_batch(raw)
        fields = {"input_ids": [e.ids for e in enc],
                  "attention_mask": [e.attention_mask for e in enc]}
        feeds = {n: np.asarray(fields[n], dtype=np.int64) for n in manifest.encoder.text_inputs}
    name = IMAGE_ENCODER if modality == "image" else TEXT_ENCODER
    session = ort.InferenceSession(str(bundle / name), providers=["CPUExecutionProvider"])
    return session.run([f"{modality}_vec"], feeds)[0]


def _items(rebuilt, modality: str, n: int) -> list:
    """n items' raw content, with a missing one first."""
    table = rebuilt.full.items
    values = table.images if modality == "image" else table.texts
    missing = [v for v in values if not v][:1]
    return missing + [v for v in values if v][:n - 1]


def _torch_vectors(towers, rebuilt, modality: str, raw: list) -> np.ndarray:
    tower, head = towers[modality], rebuilt.heads.heads[modality]
    with torch.no_grad():
        return head(tower(tower.prepare(raw))).numpy()


@pytest.mark.parametrize("modality", ["image", "text"])
@pytest.mark.parametrize("n", [1, 5])
def test_onnx_fp32_equals_torch(fp32_bundle, rebuilt, towers, modality, n):
    raw = _items(rebuilt, modality, n)
    expected = _torch_vectors(towers, rebuilt, modality, raw)
    got = _serving_vectors(fp32_bundle, modality, raw)
    assert got.shape == expected.shape == (n, 32)
    assert np.abs(got - expected).max() <= 1e-4


@pytest.mark.parametrize("modality", ["image", "text"])
def test_onnx_int8_close_to_torch(int8_bundle, rebuilt, towers, modality):
    raw = _items(rebuilt, modality, 12)
    cos = onnx_export.cosines(_serving_vectors(int8_bundle, modality, raw),
                              _torch_vectors(towers, rebuilt, modality, raw))
    assert cos.min() >= 0.99
    manifest = load_bundle(int8_bundle).manifest
    assert getattr(manifest.encoder, f"{modality}_quantization").startswith("int8")
    assert manifest.metrics[f"parity.{modality}.int8_cos_min"] >= 0.99
    assert manifest.metrics[f"parity.{modality}.dynamo"] == 0.0  # legacy exporter asked first


def test_tokenizer_json_equals_training_tokenisation(fp32_bundle, rebuilt, towers):
    texts = PARITY_TEXTS + [t for t in rebuilt.full.items.texts]
    tokenizer = Tokenizer.from_file(str(fp32_bundle / TOKENIZER))
    enc = tokenizer.encode_batch(texts)
    prepared, _ = towers["text"].prepare_counted(texts)
    np.testing.assert_array_equal(np.array([e.ids for e in enc]), prepared["input_ids"].numpy())
    np.testing.assert_array_equal(np.array([e.attention_mask for e in enc]),
                                  prepared["attention_mask"].numpy())


def _copy(bundle: Path, tmp_path: Path) -> Path:
    target = tmp_path / bundle.name
    shutil.copytree(bundle, target)
    return target


def test_corrupted_bundles_are_refused(fp32_bundle, tmp_path):
    onnx_copy = _copy(fp32_bundle, tmp_path / "a")
    data = bytearray((onnx_copy / IMAGE_ENCODER).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (onnx_copy / IMAGE_ENCODER).write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256 mismatch"):
        load_bundle(onnx_copy)
    truncated = _copy(fp32_bundle, tmp_path / "b")
    text = (truncated / MANIFEST).read_text()
    (truncated / MANIFEST).write_text(text[: len(text) // 2])
    with pytest.raises(BundleError, match="invalid manifest"):
        load_bundle(truncated)
    edited = _copy(fp32_bundle, tmp_path / "c")
    manifest = json.loads((edited / MANIFEST).read_text())
    del manifest["files"][TOKENIZER]
    (edited / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BundleError):
        load_bundle(edited)


def test_id_only_run_exports_without_encoders(id_run, data_dir, tmp_path):
    bundle = load_bundle(export_run(id_run, tmp_path / "bundles"))
    m = bundle.manifest
    assert m.encoder is None and not m.counts.cold_start and m.backbone == "bpr"
    assert not any(bundle.has(n) for n in (IMAGE_ENCODER, TEXT_ENCODER, TOKENIZER, PREPROCESS))
    train = load_dataset(data_dir).train
    np.testing.assert_array_equal(bundle.load_npy(ITEM_IDS), np.unique(train[:, 1]))
    assert not [k for k in m.metrics if k.startswith("parity.")]


def test_cli_publish_flips_current(id_run, tmp_path):
    bundles = tmp_path / "bundles"
    assert export_main(["--run", str(id_run), "--bundles", str(bundles), "--publish"]) == 0
    assert current_version(bundles) == "v1"
    assert export_main(["--run", str(id_run), "--bundles", str(bundles)]) == 0
    assert current_version(bundles) == "v1" and list_versions(bundles) == [1, 2]
    assert export_main(["--run", str(id_run), "--bundles", str(bundles), "--publish",
                        "--factory", "HNSW32"]) == 0
    assert current_version(bundles) == "v3"
    assert load_bundle(bundles / "v3").manifest.faiss_factory == "HNSW32"
    assert export_main(["--run", str(tmp_path / "nope"), "--bundles", str(bundles)]) == 2


def test_failing_parity_aborts_without_a_new_version(mm_run, id_run, tmp_path, monkeypatch):
    bundles = tmp_path / "bundles"
    export_run(id_run, bundles, publish_bundle=True)
    real = onnx_export.run_session
    monkeypatch.setattr(onnx_export, "run_session", lambda s, feeds: real(s, feeds) + 1e-2)
    with pytest.raises(ExportError, match="differs from torch"):
        export_run(mm_run, bundles, publish_bundle=True, exporter="legacy")
    assert export_main(["--run", str(mm_run), "--bundles", str(bundles), "--publish",
                        "--exporter", "legacy"]) == 1
    assert list_versions(bundles) == [1] and current_version(bundles) == "v1"
    assert sorted(p.name for p in bundles.iterdir()) == [CURRENT, "v1"]  # no leftovers


def test_heads_on_precomputed_features_give_cold_vectors_but_no_encoders(tmp_path):
    data = tmp_path / "data"
    generate(data, n_users=60, n_items=40, seed=2)
    rng = np.random.default_rng(0)
    np.save(data / "image_feat.npy", rng.normal(size=(40, 6)).astype(np.float32))
    np.save(data / "text_feat.npy", rng.normal(size=(40, 5)).astype(np.float32))
    cfg = TrainConfig.model_validate({
        "seed": 0, "data": {"path": str(data)}, "backbone": {"name": "bpr", "embedding_size": 8},
        "heads": {}, "cold_start": {"holdout_fraction": 0.2}, "eval": {"ks": [10, 20]},
        "optim": {"batch_size": 256, "epochs": 2}})
    run_stage1(cfg, tmp_path / "run", torch.device("cpu"))
    bundle = load_bundle(export_run(tmp_path / "run", tmp_path / "bundles"))
    assert bundle.manifest.encoder is None and not bundle.manifest.counts.cold_start
    cold = hold_out_items(load_dataset(data), 0.2, seed=0)[1].items
    assert set(cold.tolist()) <= set(bundle.load_npy(ITEM_IDS).tolist())
    assert bundle.manifest.metrics["export.cold_items"] >= len(cold)
