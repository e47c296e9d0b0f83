"""Shared fixtures: a tiny random dataset in the MMRec format, written without the generator."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest


def write_inter(path: Path, rows: list[tuple[int, int, int]], header: str = "userID\titemID\tx_label"):
    """Write an .inter TSV from (user, item, x_label) rows."""
    path.write_text(header + "\n" + "".join(f"{u}\t{i}\t{x}\n" for u, i, x in rows))


def random_rows(n_users: int, n_items: int, seed: int, per_user: int = 12) -> list[tuple]:
    """A clustered random interaction set split per user 8:1:1 like MMRec."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_users):
        group = u % 4
        pool = np.arange(n_items)[np.arange(n_items) % 4 == group]
        items = rng.choice(pool, size=min(per_user, len(pool)), replace=False)
        n = len(items)
        vt = int(n * 0.2)
        labels = [0] * (n - vt) + [1] * (vt // 2) + [2] * (vt - vt // 2)
        rows += [(u, int(i), x) for i, x in zip(items, labels)]
    return rows


@pytest.fixture(scope="session")
def tiny_dataset_dir(tmp_path_factory) -> Path:
    """A 60-user, 80-item dataset directory with clustered preferences."""
    d = tmp_path_factory.mktemp("tiny")
    write_inter(d / "tiny.inter", random_rows(60, 80, seed=0))
    return d


@pytest.fixture(scope="session")
def pg_cluster():
    """A throwaway PostgreSQL cluster for the session; skipped when PostgreSQL is missing,
    except in CI (CI=1), where a missing PostgreSQL is a failure."""
    from bench.pgcluster import cluster_or_reason

    cluster, why = cluster_or_reason()
    if cluster is None:
        if os.environ.get("CI") == "1":
            pytest.fail(f"CI=1 requires PostgreSQL for the event-store tests: {why}")
        pytest.skip(why)
    yield cluster
    cluster.remove()


@pytest.fixture(scope="session")
def chromium() -> str:
    """The chromium binary for the browser tests; skipped when it is missing, except in CI (CI=1,
    where .ci/run installs it), where a missing chromium is a failure."""
    from bench.browser import find_chromium

    found = find_chromium()
    if found is None:
        if os.environ.get("CI") == "1":
            pytest.fail("CI=1 requires chromium for the browser tests (apt-get install chromium)")
        pytest.skip("chromium is not installed")
    return found


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path) -> str:
    """An empty event store: a SQLite state folder, or a fresh schema in the PG cluster."""
    if request.param == "sqlite":
        return str(tmp_path / "state")
    return request.getfixturevalue("pg_cluster").new_store_url()


def pytest_sessionstart(session):
    """Generate the gRPC stubs into serve/_gen when missing or stale (python -m protos.build)."""
    try:
        from protos import build
        build.build()
    except Exception as err:  # noqa: BLE001 - e.g. no grpcio-tools: serving tests then fail to import
        import warnings
        warnings.warn(f"could not generate gRPC stubs: {err}")
