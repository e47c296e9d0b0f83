"""Fixtures shared by the index tests."""
from __future__ import annotations

import faiss
import pytest


@pytest.fixture(scope="module")
def one_omp_thread():
    """One OpenMP thread: single-query searches pay OpenMP start-up per call (the serving setting),
    and one thread is kind to a shared machine."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)
