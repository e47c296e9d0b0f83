"""Serving fixtures: synthetic bundles, a loaded model holder, an in-process servicer."""
from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest

from index.events import SQLStore, open_store
from serve.limits import Limits
from serve.metrics import Metrics
from serve.reload import ModelHolder, build_model
from serve.servicer import RecommenderServicer
from bench.bundle_factory import BundleSpec, write_test_bundle

SMALL_LIMITS = Limits(max_image_bytes=200_000, max_image_pixels=2_000_000, max_text_chars=500,
                      max_exclude=300, max_recent=50, max_batch=8)


class Aborted(Exception):
    """Raised by FakeContext.abort, like grpc's own context."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self.code, self.details = code, details


class FakeContext:
    """The part of grpc.ServicerContext the servicer uses."""

    def abort(self, code: grpc.StatusCode, details: str):
        raise Aborted(code, details)


@pytest.fixture(scope="session")
def bundle_v1(tmp_path_factory) -> Path:
    """A published bundle with encoders over a Flat index (treat as read-only)."""
    return write_test_bundle(tmp_path_factory.mktemp("bundles"), BundleSpec())


@pytest.fixture(scope="session")
def bundle_no_encoder(tmp_path_factory) -> Path:
    """A published bundle without encoders (treat as read-only)."""
    return write_test_bundle(tmp_path_factory.mktemp("bundles"), BundleSpec(encoders=False))


@pytest.fixture
def metrics() -> Metrics:
    """Fresh metrics on their own registry."""
    return Metrics()


def make_holder(path: Path, metrics: Metrics, limits: Limits = SMALL_LIMITS,
                store: SQLStore | None = None) -> ModelHolder:
    """A holder serving the bundle at `path` (over an in-memory SQLite store by default)."""
    holder = ModelHolder(store or open_store(":memory:"), metrics)
    holder.swap(build_model(path, max_pixels=limits.max_image_pixels), path.name)
    return holder


@pytest.fixture
def holder(bundle_v1, metrics) -> ModelHolder:
    """A holder with a fresh copy of bundle v1 loaded (mutations stay in this test)."""
    return make_holder(bundle_v1, metrics)


@pytest.fixture
def servicer(holder, metrics) -> RecommenderServicer:
    """The servicer over `holder`, with small limits."""
    return RecommenderServicer(holder, metrics, SMALL_LIMITS)


@pytest.fixture
def ctx() -> FakeContext:
    """A servicer context whose abort raises Aborted."""
    return FakeContext()


def brute_force(model, query: np.ndarray, k: int, excluded) -> list[int]:
    """Exact top-k item ids of a query over the live index, minus `excluded`."""
    from index import ann

    ids = ann.live_ids(model.index)
    vectors = np.stack([model.index.reconstruct(int(i)) for i in ids])
    scores = vectors @ query
    order = [int(ids[j]) for j in np.argsort(-scores, kind="stable")]
    banned = {int(x) for x in excluded}
    return [i for i in order if i not in banned][:k]
