"""python -m serve.store show | compact."""
from __future__ import annotations

import json

from index import bundle
from index import events as ev
from index.events import open_store
from index.events.dataset import write_training_dataset
from serve.store import main
from tests.conftest import write_inter
from bench.bundle_factory import BundleSpec, write_test_bundle


def test_show_and_compact(tmp_path, capsys):
    bundles = tmp_path / "bundles"
    store = open_store(bundles / ".state")
    store.append(ev.upsert(1005, b"", "a bundle item, online"))
    store.append(ev.upsert(77, b"", "not in the bundle"))
    store.append(ev.interactions(10, [1001], [1]))
    store.append(ev.interactions(10, [1002], [2]))
    write_test_bundle(bundles, BundleSpec(event_watermark=3))
    assert main(["show", "--bundles", str(bundles)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["head"] == 4 and shown["live_bundle"]["events_after_watermark"] == 1
    assert main(["compact", "--bundles", str(bundles)]) == 1  # no dataset covers events 1..3
    assert store.head() == 4 and len(store.read(0)) == 4
    assert main(["compact", "--bundles", str(bundles), "--force"]) == 0
    assert [e.id for e in store.read(0).events] == [2, 4]  # 77 is kept: the bundle lacks it
    assert store.meta("compacted_through") == "3"


def test_compact_records_the_dataset_that_covers_it(tmp_path):
    bundles, run = tmp_path / "bundles", tmp_path / "runs" / "r1"
    base = tmp_path / "base"
    base.mkdir()
    write_inter(base / "base.inter", [(0, 0, 0), (0, 1, 0)])
    store = open_store(bundles / ".state")
    store.append(ev.interactions(0, [1], [1]))
    write_training_dataset(store, base, run / "data")
    path = write_test_bundle(bundles, BundleSpec(event_watermark=1), publish=False)
    manifest = path / "manifest.json"
    doc = json.loads(manifest.read_text())
    doc["source_run"] = str(run / "stage2")
    manifest.write_text(json.dumps(doc))
    bundle.seal_manifest(path)  # a deliberate edit: re-seal, or publish refuses it
    bundle.publish(bundles, path.name)
    assert main(["compact", "--bundles", str(bundles)]) == 0
    assert store.meta("base_dataset") == str((run / "data").resolve())
