"""Retraining with --store: online items and feedback become warm items, and replay stops."""
from __future__ import annotations

import numpy as np
import yaml

from export.retrain import main
from index import bundle as files
from index import events as ev
from index.bundle import load_bundle
from index.events import open_store
from serve.metrics import Metrics
from serve.reload import ModelHolder, Watcher, build_model
from train.synthetic import generate

NEW_ITEMS = np.arange(400, 450)


def _online_writes(store, data) -> None:
    """50 items created online (content of catalogue items) and 500 interactions with them."""
    rng = np.random.default_rng(0)
    lines = (data / "items.tsv").read_text().splitlines()[1:]
    for item in NEW_ITEMS:
        _, text, image = lines[int(item) - 400].split("\t")
        store.append(ev.upsert(int(item), (data / image).read_bytes() if image else b"", text))
    for user in rng.choice(800, size=100, replace=False):
        items = rng.choice(NEW_ITEMS, size=5, replace=False)
        store.append(ev.interactions(int(user), items, np.full(5, 1_700_000_000)))


def test_retrain_turns_the_store_into_warm_items_and_replay_stops(tmp_path):
    data = generate(tmp_path / "data", n_users=800, n_items=400, seed=2, image_size=16)
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({
        "seed": 0, "data": {"path": str(data)}, "backbone": {"name": "bpr", "embedding_size": 8},
        "optim": {"batch_size": 2048, "epochs": 1}, "eval": {"ks": [10, 20]}}))
    bundles, state = tmp_path / "bundles", tmp_path / "bundles" / ".state"
    store = open_store(state)
    _online_writes(store, data)
    head = store.head()
    assert main(["--config", str(config), "--bundles", str(bundles), "--runs-dir",
                 str(tmp_path / "runs"), "--store", str(state)]) == 0
    bundle = load_bundle(bundles / "v1")
    assert bundle.manifest.event_watermark == head == 150
    item_ids = bundle.load_npy(files.ITEM_IDS)
    assert set(NEW_ITEMS) <= set(item_ids.tolist())
    assert bundle.manifest.metrics["export.cold_items"] == 0  # all in by training rows: warm
    (run,) = (tmp_path / "runs").iterdir()
    assert (run / "data" / "online_images").is_dir()

    metrics = Metrics()
    holder = ModelHolder(store, metrics)
    assert Watcher(bundles, holder, build_model, metrics).check()
    model = holder.model
    assert model.position == head and len(model.online) == 0
    assert metrics.registry.get_sample_value("recsys_online_events_total",
                                             {"kind": "upsert"}) is None  # nothing replayed
    holder.record(3, NEW_ITEMS[:2], np.array([1, 2]), "click")
    assert model.position == head + 1 and model.online.items(3).tolist() == [400, 401]
