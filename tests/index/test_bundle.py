"""index.bundle and index.manifest: atomic versioned writes, publishing, verification."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from index import ann, bundle
from index.bundle import BundleError
from index.manifest import Counts, EncoderSpec, Manifest


def make_manifest(**overrides) -> Manifest:
    """A valid manifest for a tiny bundle."""
    fields = dict(source_run="runs/demo", config_hash="abc123", backbone="lightgcn", dim=8,
                  normalized=True, faiss_factory="Flat", counts=Counts(users=3, items=5),
                  metrics={"recall@20": 0.25})
    return Manifest(**(fields | overrides))


def write_tiny(target: Path) -> None:
    """Bundle writer callback: users, item index, ids and a JSON file."""
    rng = np.random.default_rng(0)
    users = rng.standard_normal((3, 8))
    np.save(target / bundle.USERS, (users / np.linalg.norm(users, axis=1, keepdims=True)).astype(
        np.float32))
    np.save(target / bundle.USER_IDS, np.arange(3, dtype=np.int64))
    items = rng.standard_normal((5, 8)).astype(np.float32)
    ann.save(ann.build(items, np.arange(5) + 100, "Flat"), target / bundle.ITEMS_INDEX)
    np.save(target / bundle.ITEM_IDS, np.arange(5, dtype=np.int64) + 100)
    (target / bundle.PREPROCESS).write_text(json.dumps({"image_size": 224}), encoding="utf-8")


@pytest.fixture
def bundles(tmp_path: Path) -> Path:
    """An empty bundles directory."""
    return tmp_path / "bundles"


def test_round_trip(bundles):
    path = bundle.write_bundle(bundles, write_tiny, make_manifest())
    assert path == bundles / "v1"
    loaded = bundle.load_bundle(path)
    assert loaded.version == 1 and loaded.manifest.backbone == "lightgcn"
    assert sorted(loaded.manifest.files) == sorted(
        [bundle.USERS, bundle.USER_IDS, bundle.ITEMS_INDEX, bundle.ITEM_IDS, bundle.PREPROCESS])
    entry = loaded.manifest.files[bundle.USERS]
    assert entry.sha256 == bundle.sha256_file(path / bundle.USERS)
    assert entry.bytes == (path / bundle.USERS).stat().st_size
    assert loaded.load_npy(bundle.USERS).shape == (3, 8)
    assert loaded.read_json(bundle.PREPROCESS) == {"image_size": 224}
    index = ann.load(loaded.file(bundle.ITEMS_INDEX))
    assert sorted(ann.live_ids(index)) == list(range(100, 105))
    assert not loaded.has(bundle.TEXT_ENCODER)
    with pytest.raises(BundleError, match="text_encoder.onnx"):
        loaded.file(bundle.TEXT_ENCODER)
    assert [p.name for p in bundles.iterdir()] == ["v1"]


def test_versions_increment(bundles):
    for expected in (1, 2, 3):
        assert bundle.write_bundle(bundles, write_tiny, make_manifest()).name == f"v{expected}"
    assert bundle.list_versions(bundles) == [1, 2, 3]
    assert bundle.load_bundle(bundles / "v3").manifest.version == 3


def test_rename_race_takes_next_number(bundles, monkeypatch):
    bundle.write_bundle(bundles, write_tiny, make_manifest())
    real = bundle.list_versions
    calls = []

    def stale(path):
        calls.append(path)
        return [] if len(calls) == 1 else real(path)

    monkeypatch.setattr(bundle, "list_versions", stale)
    path = bundle.write_bundle(bundles, write_tiny, make_manifest())
    assert path.name == "v2" and bundle.load_bundle(path).version == 2
    assert bundle.load_bundle(bundles / "v1").version == 1


def test_failed_writer_leaves_nothing(bundles):
    def broken(target: Path) -> None:
        (target / "half.npy").write_bytes(b"x")
        raise RuntimeError("export failed")

    with pytest.raises(RuntimeError):
        bundle.write_bundle(bundles, broken, make_manifest())
    assert list(bundles.iterdir()) == []

    def nested(target: Path) -> None:
        (target / "sub").mkdir()

    with pytest.raises(BundleError, match="sub"):
        bundle.write_bundle(bundles, nested, make_manifest())
    assert list(bundles.iterdir()) == []


def test_flipped_byte_is_refused(bundles):
    path = bundle.write_bundle(bundles, write_tiny, make_manifest())
    target = path / bundle.ITEMS_INDEX
    raw = bytearray(target.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    target.write_bytes(bytes(raw))
    with pytest.raises(BundleError, match=r"items\.faiss.*sha256"):
        bundle.load_bundle(path)


def test_size_change_and_missing_file_are_refused(bundles):
    path = bundle.write_bundle(bundles, write_tiny, make_manifest())
    with open(path / bundle.USERS, "ab") as f:
        f.write(b"\0")
    with pytest.raises(BundleError, match=r"users\.npy.*size"):
        bundle.load_bundle(path)
    (path / bundle.USERS).unlink()
    with pytest.raises(BundleError, match=r"users\.npy.*missing"):
        bundle.load_bundle(path)


def test_unexpected_file_is_refused(bundles):
    path = bundle.write_bundle(bundles, write_tiny, make_manifest())
    (path / "extra.pkl").write_bytes(b"not allowed")
    with pytest.raises(BundleError, match=r"extra\.pkl"):
        bundle.load_bundle(path)


def _edit_manifest(path: Path, edit) -> None:
    """Rewrite manifest.json through a function of its parsed JSON."""
    target = path / bundle.MANIFEST
    data = json.loads(target.read_text())
    target.write_text(json.dumps(edit(data)))


@pytest.mark.parametrize("edit,match", [
    (lambda d: d | {"surprise": 1}, "surprise"),
    (lambda d: d | {"metric": "l2"}, "metric"),
    (lambda d: d | {"version": 7}, "version 7"),
    (lambda d: {k: v for k, v in d.items() if k != "dim"}, "dim"),
    (lambda d: d | {"files": d["files"] | {bundle.USERS: {"sha256": "0" * 64, "bytes":
                                                          d["files"][bundle.USERS]["bytes"]}}},
     r"users\.npy.*sha256"),
    (lambda d: d | {"files": {k: v for k, v in d["files"].items() if k != bundle.ITEM_IDS}},
     r"item_ids\.npy"),
])
def test_tampered_manifest_is_refused(bundles, edit, match):
    path = bundle.write_bundle(bundles, write_tiny, make_manifest())
    _edit_manifest(path, edit)
    with pytest.raises(BundleError, match=match):
        bundle.load_bundle(path)


def test_invalid_or_missing_manifest(bundles):
    path = bundle.write_bundle(bundles, write_tiny, make_manifest())
    (path / bundle.MANIFEST).write_text("{not json")
    with pytest.raises(BundleError, match="invalid manifest"):
        bundle.load_bundle(path)
    (path / bundle.MANIFEST).unlink()
    with pytest.raises(BundleError, match="missing"):
        bundle.load_bundle(path)
    with pytest.raises(BundleError, match="not found"):
        bundle.load_bundle(bundles / "v9")


def test_publish_and_current(bundles):
    assert bundle.current_version(bundles) is None
    assert bundle.load_current(bundles) is None
    bundle.write_bundle(bundles, write_tiny, make_manifest())
    bundle.write_bundle(bundles, write_tiny, make_manifest())
    bundle.publish(bundles, 1)
    assert (bundles / bundle.CURRENT).read_text() == "v1\n"
    assert bundle.current_version(bundles) == "v1"
    bundle.publish(bundles, "v2")
    assert bundle.current_version(bundles) == "v2"
    assert bundle.load_current(bundles).version == 2
    assert sorted(p.name for p in bundles.iterdir()) == ["CURRENT", "v1", "v2"]
    with pytest.raises(BundleError):
        bundle.publish(bundles, 5)
    with pytest.raises(BundleError):
        bundle.publish(bundles, "latest")
    (bundles / "v1" / "junk").write_text("x")
    with pytest.raises(BundleError, match="junk"):
        bundle.publish(bundles, 1)
    assert bundle.current_version(bundles) == "v2"
    (bundles / bundle.CURRENT).write_text("../etc\n")
    with pytest.raises(BundleError, match="CURRENT"):
        bundle.current_version(bundles)


def test_npy_files_never_unpickle(bundles):
    def with_objects(target: Path) -> None:
        np.save(target / bundle.USERS, np.array([{"a": 1}], dtype=object), allow_pickle=True)

    loaded = bundle.load_bundle(bundle.write_bundle(bundles, with_objects, make_manifest()))
    with pytest.raises(ValueError):
        loaded.load_npy(bundle.USERS)


def test_manifest_schema():
    spec = dict(image_size=224, mean=(0.48, 0.46, 0.41), std=(0.27, 0.26, 0.28), context_length=77,
                tokenizer="clip", n_ctx=4, prompt_depth=9, image_encoder=bundle.IMAGE_ENCODER)
    m = make_manifest(encoder=EncoderSpec(**spec))
    assert Manifest.model_validate_json(m.to_json()) == m
    with pytest.raises(ValueError):
        EncoderSpec(**(spec | {"tokenizer": "sentencepiece"}))
    with pytest.raises(ValueError):
        EncoderSpec(**(spec | {"std": (0.0, 1.0, 1.0)}))
    with pytest.raises(ValueError):
        make_manifest(files={"../escape": {"sha256": "0" * 64, "bytes": 1}})
    with pytest.raises(ValueError, match="image_encoder.onnx"):
        make_manifest(encoder=EncoderSpec(**spec),
                      files={bundle.USERS: {"sha256": "0" * 64, "bytes": 1}})
