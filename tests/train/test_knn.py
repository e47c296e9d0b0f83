"""kNN item graphs: exact, memory-bounded chunking, MMRec's normalisations, content-keyed cache."""
from __future__ import annotations

import pytest
import torch

from train import knn


def _dense_reference(x: torch.Tensor, k: int, norm: str) -> torch.Tensor:
    """MMRec's construction on the full similarity matrix."""
    xn = x / x.norm(dim=1, keepdim=True)
    values, idx = torch.topk(xn @ xn.T, k, dim=1)
    adj = torch.zeros(len(x), len(x)).scatter_(1, idx, 1.0 if norm == "binary" else values)
    deg = adj.sum(1) + (1e-7 if norm == "binary" else 0.0)
    inv = deg.pow(-0.5)
    mask = (adj != 0).float() if norm == "binary" else adj
    return inv[:, None] * mask * inv[None, :]


@pytest.mark.parametrize("norm", ["binary", "weighted"])
def test_chunked_equals_unchunked_and_reference(norm):
    x = torch.randn(300, 16, generator=torch.Generator().manual_seed(0))
    small = knn.knn_graph(x, 10, norm, chunk=7).to_dense()
    whole = knn.knn_graph(x, 10, norm, chunk=10_000).to_dense()
    assert torch.allclose(small, whole, atol=1e-6)
    assert torch.allclose(whole, _dense_reference(x, 10, norm), atol=1e-6)


def test_binary_graph_is_a_mean_over_k_neighbours_with_self():
    x = torch.randn(120, 8, generator=torch.Generator().manual_seed(1))
    adj = knn.knn_graph(x, 5, "binary").to_dense()
    assert torch.all(adj.diagonal() > 0)
    assert torch.all((adj != 0).sum(1) == 5)
    assert torch.allclose(adj[adj != 0], torch.full(((adj != 0).sum(),), 0.2))


def test_similarity_blocks_stay_within_the_memory_bound(monkeypatch):
    n, budget = 20_000, 2 ** 22
    assert knn.chunk_rows(n, 2048, budget) * n <= budget
    seen = []
    real_topk = torch.topk

    def spy(sim, k, dim):
        seen.append(sim.numel())
        return real_topk(sim, k, dim=dim)

    monkeypatch.setattr(torch, "topk", spy)
    x = torch.randn(n, 64, generator=torch.Generator().manual_seed(2))
    values, idx = knn.knn_topk(x, 10, max_elements=budget)
    assert idx.shape == (n, 10) and max(seen) <= budget and len(seen) > 1
    assert torch.equal(idx[:, 0], torch.arange(n))      # every item is its own nearest neighbour


def test_cache_is_keyed_by_feature_content(tmp_path, monkeypatch):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(50, 8, generator=gen)
    first = knn.knn_graph(x, 5, "weighted", tmp_path).to_dense()
    assert len(list(tmp_path.glob("*.pt"))) == 1

    def no_build(*args, **kwargs):
        raise AssertionError("should have been loaded from the cache")

    monkeypatch.setattr(knn, "_build", no_build)
    assert torch.equal(knn.knn_graph(x.clone(), 5, "weighted", tmp_path).to_dense(), first)
    monkeypatch.undo()
    changed = x.clone()
    changed[0] = torch.randn(8, generator=gen)
    other = knn.knn_graph(changed, 5, "weighted", tmp_path).to_dense()
    assert len(list(tmp_path.glob("*.pt"))) == 2 and not torch.equal(other, first)
    knn.knn_graph(x, 6, "weighted", tmp_path)
    knn.knn_graph(x, 5, "binary", tmp_path)
    assert len(list(tmp_path.glob("*.pt"))) == 4


def test_unreadable_cache_is_rebuilt(tmp_path):
    x = torch.randn(40, 4, generator=torch.Generator().manual_seed(4))
    expected = knn.knn_graph(x, 3, "binary", tmp_path).to_dense()
    (path,) = tmp_path.glob("*.pt")
    path.write_bytes(b"not a torch file")
    assert torch.equal(knn.knn_graph(x, 3, "binary", tmp_path).to_dense(), expected)


def test_weighted_sum_and_max_fuse_match_dense():
    gen = torch.Generator().manual_seed(5)
    a = knn.knn_graph(torch.randn(60, 6, generator=gen), 4, "weighted")
    b = knn.knn_graph(torch.randn(60, 6, generator=gen), 7, "weighted")
    da, db = a.to_dense(), b.to_dense()
    assert torch.allclose(knn.weighted_sum([(0.1, a), (0.9, b)]).to_dense(), 0.1 * da + 0.9 * db)
    inf = torch.tensor(-torch.inf)
    expected = torch.maximum(torch.where(da != 0, da, inf), torch.where(db != 0, db, inf))
    expected = torch.where(torch.isinf(expected), torch.zeros(()), expected)
    assert torch.allclose(knn.max_fuse(a, b).to_dense(), expected)
