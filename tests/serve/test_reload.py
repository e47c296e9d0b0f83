"""Watcher, swap and replay of the event store onto new bundles, in-process (no gRPC)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from index import bundle
from index.events import open_store
from serve.errors import Unavailable
from serve.limits import Query
from serve.metrics import Metrics
from serve.reload import ModelHolder, Watcher, build_model
from bench.bundle_factory import BundleSpec, corrupt, probe_item, write_test_bundle


@pytest.fixture
def bundles(tmp_path):
    """A bundles directory with v1 published."""
    write_test_bundle(tmp_path, BundleSpec(seed=0))
    return tmp_path


@pytest.fixture
def watched(bundles):
    """(holder, watcher, metrics) with v1 loaded by a first check(), over a SQLite store."""
    metrics = Metrics()
    holder = ModelHolder(open_store(bundles / ".state"), metrics)
    watcher = Watcher(bundles, holder, build_model, metrics, poll_seconds=60, retry_seconds=60)
    assert watcher.check() and holder.model.version == 1
    return holder, watcher, metrics


def reloads(metrics: Metrics, result: str) -> float:
    """recsys_reloads_total for one result."""
    return metrics.registry.get_sample_value("recsys_reloads_total", {"result": result})


def top(holder: ModelHolder, user: int, k: int = 5) -> list[int]:
    """Top-k item ids of a user from the live model."""
    empty = np.empty(0, np.int64)
    return holder.model.recommend(Query(user, k, empty, True, empty)).item_ids.tolist()


def test_new_bundle_swaps_and_old_one_is_kept_on_failure(bundles, watched):
    holder, watcher, metrics = watched
    assert not watcher.check()  # nothing new
    write_test_bundle(bundles, BundleSpec(seed=1))
    assert watcher.check() and holder.model.version == 2 and holder.name == "v2"
    broken = write_test_bundle(bundles, BundleSpec(seed=2), publish=False)
    corrupt(broken)
    bundle.publish(bundles, broken.name, verify=False)
    assert not watcher.check() and holder.model.version == 2
    assert not watcher.check()  # not retried before retry_seconds, not counted twice
    assert (reloads(metrics, "success"), reloads(metrics, "failure")) == (2, 1)
    bundle.publish(bundles, "v1")  # rollback is just another publish
    assert watcher.check() and holder.model.version == 1


def test_garbled_current_and_bad_contents_are_refused(bundles, watched):
    holder, watcher, metrics = watched
    (bundles / bundle.CURRENT).write_text("../../etc\n")
    assert not watcher.check() and holder.model.version == 1
    bad = write_test_bundle(bundles, BundleSpec(seed=3), publish=False)
    np.save(bad / "users.npy", np.zeros((3, 16), np.float32))  # sha256 mismatch
    bundle.publish(bundles, bad.name, verify=False)
    assert not watcher.check() and holder.model.version == 1
    assert reloads(metrics, "failure") == 2


def test_smoke_failure_refuses_bundle(bundles, watched, monkeypatch):
    holder, watcher, metrics = watched
    write_test_bundle(bundles, BundleSpec(seed=1))

    def broken_smoke(self):
        raise RuntimeError("encoder returned NaN")

    monkeypatch.setattr("serve.model.ServingModel.smoke", broken_smoke)
    assert not watcher.check() and holder.model.version == 1


def test_upserts_are_reencoded_and_deletes_reapplied(bundles, watched):
    holder, watcher, metrics = watched
    image, text = probe_item()
    holder.upsert(77, image, text, overwrite=False)
    victim = top(holder, 10)[0]
    holder.delete(victim)
    holder.upsert(1005, b"", "blue mug", overwrite=True)  # a bundle item, overwritten online
    assert holder.store.head() == 3 and holder.model.position == 3
    write_test_bundle(bundles, BundleSpec(seed=1))  # different encoder weights, watermark 0
    assert watcher.check()
    model = holder.model
    assert model.version == 2 and model.n_items == 200 and model.position == 3
    np.testing.assert_allclose(model.index.reconstruct(77), model.encode(image, text), atol=1e-6)
    assert top(holder, 0, 1) == [77]  # v2's user 0 is v2's encoding of the probe item
    assert not model.has_item(victim)
    # the online overwrite is newer than a bundle that covers no event: it wins
    np.testing.assert_allclose(model.index.reconstruct(1005), model.encode(b"", "blue mug"),
                               atol=1e-6)


def test_bundle_watermark_stops_the_replay_but_keeps_items_it_lacks(bundles, watched):
    holder, watcher, metrics = watched
    holder.upsert(77, *probe_item(), overwrite=False)
    victim = top(holder, 10)[0]
    holder.delete(victim)
    holder.upsert(1005, b"", "blue mug", overwrite=True)
    holder.record(10, np.array([1001, 1002]), np.array([5, 6]), "click")
    write_test_bundle(bundles, BundleSpec(seed=1, event_watermark=holder.store.head()))
    assert watcher.check()
    model = holder.model
    assert model.watermark == model.position == 4
    assert model.has_item(victim)  # the bundle is authoritative for what it covers
    assert not np.allclose(model.index.reconstruct(1005), model.encode(b"", "blue mug"))
    assert len(model.online) == 0  # interactions up to the watermark are in the bundle
    assert model.has_item(77)  # ... but an online item the bundle lacks is never lost
    holder.upsert(78, b"", "red mug", overwrite=False)
    assert model.position == 5 and model.has_item(78)


def test_upserts_skipped_when_new_bundle_has_no_encoder(bundles, watched):
    holder, watcher, metrics = watched
    holder.upsert(77, *probe_item(), overwrite=False)
    write_test_bundle(bundles, BundleSpec(seed=1, encoders=False))
    assert watcher.check() and not holder.model.has_item(77)
    assert metrics.registry.get_sample_value("recsys_store_skipped_total",
                                             {"reason": "unencodable"}) == 1
    assert holder.model.position == 1


def test_restart_serves_exactly_what_was_acknowledged(bundles, watched):
    holder, watcher, metrics = watched
    holder.upsert(77, *probe_item(), overwrite=False)
    victim = top(holder, 10)[0]
    holder.delete(victim)
    holder.record(20, np.array([1003, 1004, 1004]), np.array([1, 2, 3]), "")
    expected = {u: top(holder, u, 10) for u in (0, 10, 20, 555)}
    holder.store.close()
    metrics2 = Metrics()
    again = ModelHolder(open_store(bundles / ".state"), metrics2)  # a fresh process
    assert Watcher(bundles, again, build_model, metrics2).check()
    assert {u: top(again, u, 10) for u in expected} == expected
    assert again.model.has_item(77) and not again.model.has_item(victim)
    assert again.model.online.items(20).tolist() == [1003, 1004]


def test_upsert_reencodes_if_swapped_mid_encode(bundles, watched, monkeypatch):
    holder, watcher, metrics = watched
    old = holder.model
    new = build_model(write_test_bundle(bundles, BundleSpec(seed=1)))
    real = type(old).encode

    def encode_then_swap(self, image, text):
        vec = real(self, image, text)
        if self is old:
            holder.model = new  # a reload lands while this upsert encodes
        return vec

    monkeypatch.setattr(type(old), "encode", encode_then_swap)
    done = holder.upsert(77, *probe_item(), overwrite=False)
    assert done.model is new and new.has_item(77) and not old.has_item(77)
    assert holder.store.head() == 1


def test_holder_without_model_is_unavailable():
    holder = ModelHolder(open_store(":memory:"))
    with pytest.raises(Unavailable):
        holder.require()
    with pytest.raises(Unavailable):
        holder.delete(1)


def test_unreadable_store_postpones_the_swap(bundles, watched, monkeypatch):
    from index.events import StoreUnavailable

    holder, watcher, metrics = watched
    holder.upsert(77, *probe_item(), overwrite=False)
    write_test_bundle(bundles, BundleSpec(seed=1))
    real, builds = holder.store.head, []
    build = watcher.build
    watcher.build = lambda path: builds.append(path) or build(path)

    def down():
        raise StoreUnavailable("database down")

    monkeypatch.setattr(holder.store, "head", down)
    assert not watcher.check() and not watcher.check()
    assert holder.model.version == 1 and reloads(metrics, "failure") == 0
    monkeypatch.setattr(holder.store, "head", real)
    assert watcher.check() and holder.model.version == 2 and holder.model.has_item(77)
    assert len(builds) == 1  # loaded once, swapped when the store came back


def _edit(path, edit) -> None:
    """Rewrite a bundle's manifest.json through a function of its parsed JSON."""
    target = path / bundle.MANIFEST
    target.write_text(json.dumps(edit(json.loads(target.read_text()))))


EDITS = {  # one edit per field class of the manifest
    "counts": lambda d: d | {"counts": d["counts"] | {"users": d["counts"]["users"] + 1}},
    "dim": lambda d: d | {"dim": d["dim"] * 2},
    "backbone": lambda d: d | {"backbone": "freedom"},
    "metrics": lambda d: d | {"metrics": {"recall@20": 0.99}},
}


@pytest.mark.parametrize("field", sorted(EDITS))
def test_edited_manifest_is_refused_by_publish_and_server(bundles, watched, field):
    holder, watcher, metrics = watched
    edited = write_test_bundle(bundles, BundleSpec(seed=4), publish=False)
    _edit(edited, EDITS[field])
    with pytest.raises(bundle.BundleError, match="manifest"):
        bundle.publish(bundles, edited.name)
    assert bundle.current_version(bundles) == "v1"  # CURRENT did not move
    bundle.publish(bundles, edited.name, verify=False)
    assert not watcher.check() and holder.model.version == 1 and top(holder, 0)
    # re-sealed by someone who edits both files: the arrays still contradict counts and dim
    if field in ("counts", "dim"):
        bundle.seal_manifest(edited)
        with pytest.raises(bundle.BundleError, match="disagree"):
            bundle.publish(bundles, edited.name)
        fresh = Watcher(bundles, holder, build_model, metrics, poll_seconds=60, retry_seconds=60)
        assert not fresh.check() and holder.model.version == 1
    assert reloads(metrics, "failure") == (2 if field in ("counts", "dim") else 1)
