"""Watcher, swap and journal carry-over, in-process (no gRPC)."""
from __future__ import annotations

import numpy as np
import pytest

from index import bundle
from serve.errors import Unavailable
from serve.limits import Query
from serve.metrics import Metrics
from serve.reload import DELETE, UPSERT, Journal, ModelHolder, Watcher, build_model
from tests.serve.bundle_factory import BundleSpec, corrupt, probe_item, write_test_bundle


@pytest.fixture
def bundles(tmp_path):
    """A bundles directory with v1 published."""
    write_test_bundle(tmp_path, BundleSpec(seed=0))
    return tmp_path


@pytest.fixture
def watched(bundles):
    """(holder, watcher, metrics) with v1 loaded by a first check()."""
    metrics = Metrics()
    holder = ModelHolder(Journal(100, 10**7, metrics), metrics)
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
    assert len(holder.journal) == 3
    write_test_bundle(bundles, BundleSpec(seed=1))  # different encoder weights
    assert watcher.check()
    model = holder.model
    assert model.version == 2 and model.n_items == 200  # +77, -victim, 1005 from the bundle
    np.testing.assert_allclose(model.index.reconstruct(77), model.encode(image, text), atol=1e-6)
    assert top(holder, 0, 1) == [77]  # v2's user 0 is v2's encoding of the probe item
    assert not model.has_item(victim)
    assert not np.allclose(model.index.reconstruct(1005), model.encode(b"", "blue mug"))
    assert sorted(i for i, _ in holder.journal.entries()) == sorted([77, victim])


def test_upserts_dropped_when_new_bundle_has_no_encoder(bundles, watched):
    holder, watcher, metrics = watched
    holder.upsert(77, *probe_item(), overwrite=False)
    write_test_bundle(bundles, BundleSpec(seed=1, encoders=False))
    assert watcher.check() and not holder.model.has_item(77)
    assert metrics.registry.get_sample_value("recsys_journal_dropped_total") == 1
    assert len(holder.journal) == 0


def test_journal_bounds_and_latest_operation_wins():
    journal = Journal(max_items=2, max_bytes=100)
    journal.record(1, UPSERT, b"x" * 10, "a")
    journal.record(2, UPSERT, b"y" * 10, "b")
    journal.record(1, DELETE)
    assert [(i, e.op) for i, e in journal.entries()] == [(2, UPSERT), (1, DELETE)]
    journal.record(3, UPSERT, b"z" * 10)
    assert [i for i, _ in journal.entries()] == [1, 3]
    journal.record(4, UPSERT, b"w" * 95)
    assert [i for i, _ in journal.entries()] == [4]
    seq = journal.last_seq()
    journal.record(5, DELETE)
    assert [i for i, _ in journal.entries(after=seq)] == [5]


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
    replaced, model = holder.upsert(77, *probe_item(), overwrite=False)
    assert model is new and new.has_item(77) and not old.has_item(77)


def test_holder_without_model_is_unavailable():
    holder = ModelHolder(Journal(10, 10))
    with pytest.raises(Unavailable):
        holder.require()
    with pytest.raises(Unavailable):
        holder.delete(1)
