"""Attribute features parsed from item text: layout, refusals, training, export and serving parity."""
from __future__ import annotations

import shutil
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch
from pydantic import ValidationError

from export import export_run
from train.run import BEST, load_run
from export.bundle import cold_vectors
from index import ann
from index.attributes import AttributeHead, AttributesConfig, AttributesSpec
from index.bundle import ATTRIBUTES, ATTRIBUTES_HEAD, ITEMS_INDEX, BundleError, load_bundle
from serve.errors import InvalidArgument
from serve.model import load_encoder
from train import checkpoint
from train.coldstart import hold_out_items
from train.config import TrainConfig
from train.data import load_dataset
from train.features import EncodersConfig
from train.stage1 import run_stage1
from train.config import Stage2Config
from train.stage2 import run_stage2
from train.synthetic import generate

FIELDS = [{"name": "material", "pattern": r"Made of (\w+)", "kind": "category"},
          {"name": "days", "pattern": r"Ships in (\d+) days", "kind": "number", "bins": [2, 5]}]


def spec_of(fields: list[dict], texts: list[str]) -> AttributesSpec:
    return AttributesSpec.fit(AttributesConfig(fields=fields), texts)


def test_layout_vocabulary_other_slot_and_missing_values():
    texts = ["A (1995). Genres: Comedy Drama. Plot.", "B (1980). Genres: Drama.",
             "C (1999). Genres: Drama Western.", "no structure here"]
    spec = spec_of([
        {"name": "year", "pattern": r"\((\d{4})\)", "kind": "number", "bins": [1990, 1996]},
        {"name": "genres", "pattern": r"Genres: ([^.]*)\.", "kind": "tags", "min_count": 2}],
        texts)
    # year: 3 buckets; genres: only Drama is in >= 2 items, Comedy and Western share "other"
    assert spec.fields[1].vocab == ["Drama"] and spec.dim == 3 + 2
    got = spec.encode(texts + ["Z (1996). Genres: Horror."])
    np.testing.assert_array_equal(got, [[0, 1, 0, 1, 1],   # 1995 in [1990, 1996); Drama + other
                                        [1, 0, 0, 1, 0],   # 1980 below the first edge
                                        [0, 0, 1, 1, 1],   # 1999 at or above 1996
                                        [0, 0, 0, 0, 0],   # nothing matches: all zero
                                        [0, 0, 1, 0, 1]])  # edge value 1996 goes up; unseen tag
    assert spec.coverage(spec.encode(texts)) == {"year": 0.75, "genres": 0.75}
    assert AttributesSpec.model_validate_json(spec.model_dump_json()) == spec


def test_tags_separator_and_unparsable_numbers():
    spec = spec_of([{"name": "tags", "pattern": r"Tags: ([^.]*)\.", "kind": "tags",
                     "separator": ","},
                    {"name": "price", "pattern": r"Price: (\S+)", "kind": "number",
                     "bins": [10.0]}],
                   ["Tags: red wine, dry. Price: 12.5", "Tags: dry. Price: n/a"])
    assert spec.fields[0].vocab == ["dry", "red wine"]
    np.testing.assert_array_equal(spec.encode(["Tags: red wine, dry. Price: 12.5",
                                               "Tags: dry. Price: n/a"]),
                                  [[1, 1, 0, 0, 1], [1, 0, 0, 0, 0]])


@pytest.mark.parametrize("field, message", [
    ({"name": "x", "pattern": "Made of \\w+", "kind": "category"}, "capture group"),
    ({"name": "x", "pattern": "Made of (\\w+", "kind": "category"}, "invalid regular expression"),
    ({"name": "x", "pattern": "(\\d+)", "kind": "number"}, "needs bins"),
    ({"name": "x", "pattern": "(\\d+)", "kind": "number", "bins": [3, 1]}, "strictly increasing"),
    ({"name": "x", "pattern": "(\\w+)", "kind": "category", "bins": [1]}, "kind number only"),
    ({"name": "x", "pattern": "(\\w+)", "kind": "category", "separator": ","}, "kind tags only"),
])
def test_bad_fields_are_refused(field, message):
    with pytest.raises(ValidationError, match=message):
        AttributesConfig(fields=[field])


def test_duplicate_names_and_bad_head_are_refused():
    with pytest.raises(ValidationError, match="unique"):
        AttributesConfig(fields=[FIELDS[0], FIELDS[0]])
    spec = spec_of(FIELDS, ["Made of oak. Ships in 3 days."])
    with pytest.raises(ValueError, match="shape"):
        AttributeHead(spec, np.zeros((spec.dim, 4), np.float32))
    with pytest.raises(ValueError, match="non-finite"):
        AttributeHead(spec, np.full((spec.dim + 1, 4), np.nan, np.float32))


def config(data: Path, cache: Path, modalities: list[str]) -> TrainConfig:
    encoders = {"attributes": {"fields": FIELDS}, "cache_dir": str(cache)}
    if "text" in modalities:
        encoders["text"] = {"name": "minilm"}
    return TrainConfig.model_validate({
        "seed": 0, "data": {"path": str(data)}, "encoders": encoders,
        "backbone": {"name": "lightgcn", "embedding_size": 16, "n_layers": 1},
        "heads": {"modalities": modalities, "kt_weight": 0.0, "rank_weight": 1.0,
                  "calibrate": {"epochs": 3}},
        "cold_start": {"holdout_fraction": 0.1, "ks": [10, 20]},
        "optim": {"batch_size": 512, "epochs": 3}, "eval": {"ks": [10, 20], "patience": 5}})


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("data")
    generate(d, n_users=100, n_items=60, seed=4)
    return d


@pytest.mark.parametrize("modalities", [["text", "attributes"], ["attributes"]])
def test_attribute_heads_train_export_and_serve_identically(modalities, data_dir, tmp_path):
    run = tmp_path / "run"
    metrics = run_stage1(config(data_dir, tmp_path / "cache", modalities), run,
                         torch.device("cpu"))
    assert np.isfinite(metrics["cold_start"]["heads"]["recall@20"])
    bundle_dir = export_run(run, tmp_path / "bundles")
    bundle = load_bundle(bundle_dir)
    enc = bundle.manifest.encoder
    assert (enc.attributes_file, enc.attributes_head) == (ATTRIBUTES, ATTRIBUTES_HEAD)
    assert (enc.text_encoder is not None) == ("text" in modalities)
    assert bundle.manifest.metrics["parity.attributes.max_abs"] <= 1e-5

    # The server's numpy path reproduces the cold vectors the index holds for held-out items.
    full = load_dataset(data_dir)
    cold = hold_out_items(full, 0.1, seed=0)[1].items
    encoder = load_encoder(bundle)
    served = np.stack([encoder.encode(b"", full.items.texts[i]) for i in cold])
    index = ann.load(bundle_dir / ITEMS_INDEX)
    row = {int(i): r for r, i in enumerate(ann.live_ids(index))}
    stored = np.stack([faiss.downcast_index(index.index).reconstruct(row[int(i)]) for i in cold])
    np.testing.assert_allclose(served, stored, atol=1e-4)
    np.testing.assert_allclose(stored, cold_vectors(load_run(run), cold), atol=1e-6)
    if modalities == ["attributes"]:
        with pytest.raises(InvalidArgument, match="text is required"):
            encoder.encode(b"\x89PNG", "")


def test_tampered_attribute_spec_is_refused(data_dir, tmp_path):
    run = tmp_path / "run"
    run_stage1(config(data_dir, tmp_path / "cache", ["attributes"]), run, torch.device("cpu"))
    bundle_dir = export_run(run, tmp_path / "bundles")
    path = bundle_dir / ATTRIBUTES
    path.write_text(path.read_text().replace("\"category\"", "\"tags\"", 1))
    with pytest.raises(BundleError, match="attributes.json"):
        load_bundle(bundle_dir)


@pytest.mark.parametrize("groups", [1, 2])
def test_stage2_run_with_an_attribute_head_exports(data_dir, tmp_path, groups):
    """Prompts tune the text tower; the attribute head rides along on its frozen features (with
    PerPEFT groups: one attribute head per group, shipped as one (slots + 1, G·d) matrix)."""
    cfg = config(data_dir, tmp_path / "cache", ["text", "attributes"]).model_copy(update={
        "encoders": EncodersConfig.model_validate({
            "text": {"name": "openclip_text", "model": "ptmrec-tiny", "init_seed": 0},
            "attributes": {"fields": FIELDS}, "cache_dir": str(tmp_path / "cache")})})
    run_stage1(cfg, tmp_path / "run", torch.device("cpu"))
    s2 = Stage2Config.model_validate({"method": {"name": "prompt", "n_ctx": 2, "depth": 2},
                                      "modalities": ["text"], "kt_batch_size": 16,
                                      "kt_steps_per_epoch": 2, "epochs": 1, "keep_start": False,
                                      "groups": groups})
    run_stage2(tmp_path / "run", s2, tmp_path / "s2", torch.device("cpu"))
    bundle = load_bundle(export_run(tmp_path / "s2", tmp_path / "bundles"))
    m = bundle.manifest
    assert m.encoder.encoder_tuning == "prompt" and m.encoder.attributes_file == ATTRIBUTES
    assert m.metrics["parity.fused.max_abs"] <= 1e-4
    assert m.metrics["parity.attributes.max_abs"] <= 1e-5 and m.user_groups == groups
    assert load_encoder(bundle).encode(b"", "Made of oak. Ships in 3 days.").shape == (16 * groups,)


def test_attribute_slots_no_training_item_carries_stay_at_zero(data_dir, tmp_path):
    """A label seen only on held-out items keeps a zero weight row: it adds nothing to them."""
    items = load_dataset(data_dir).items
    cold = hold_out_items(load_dataset(data_dir), 0.1, seed=0)[1].items
    # give one held-out item a material no other item has
    lines = (data_dir / "items.tsv").read_text().splitlines()
    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    row = 1 + int(cold[0])
    itemid, text, image = lines[row].split("\t")
    assert text == items.texts[cold[0]]
    lines[row] = "\t".join([itemid, "Made of unobtainium. " + text.replace("Made of", "Built"),
                            image])
    (data / "items.tsv").write_text("\n".join(lines) + "\n")
    cfg = config(data, tmp_path / "cache", ["attributes"])
    cfg.heads.calibrate = None  # heads saved with the backbone's best epoch: trained, not reset
    run_stage1(cfg, tmp_path / "run", torch.device("cpu"))
    spec = AttributesSpec.fit(AttributesConfig(fields=FIELDS), load_dataset(data).items.texts)
    slot = spec.fields[0].vocab.index("unobtainium")
    weight = checkpoint.load(tmp_path / "run" / BEST)["heads.heads.attributes.weight"]
    assert torch.count_nonzero(weight[:, slot]) == 0
    assert torch.count_nonzero(weight) > 0
