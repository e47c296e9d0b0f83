"""Graph maths shared by every backbone: the normalised user-item graph and its propagation.

LightGCN (He et al., SIGIR 2020) normalisation as in MMRec: Â = D^-1/2 A D^-1/2 over the binary
symmetric bipartite adjacency (no self-loops, degree + 1e-7). Matrices are sparse CSR; no dense n×n.
"""
from __future__ import annotations

import warnings

import torch

warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support is in beta.*")


class _SymmetricSpMM(torch.autograd.Function):
    """y = A x for a constant symmetric sparse A; the backward is A g (no transpose needed)."""

    @staticmethod
    def forward(ctx, adj: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        ctx.adj = adj
        return adj @ x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return None, ctx.adj @ grad


def sym_spmm(adj: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Multiply by a symmetric sparse matrix with a cheap backward."""
    return _SymmetricSpMM.apply(adj, x)


def sparse_csr(rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor,
               size: tuple[int, int]) -> torch.Tensor:
    """Build a coalesced CSR matrix from COO triplets (duplicates are summed)."""
    coo = torch.sparse_coo_tensor(torch.stack([rows, cols]), values, size,
                                  check_invariants=False).coalesce()
    return coo.to_sparse_csr()


def bipartite_edges(users: torch.Tensor, items: torch.Tensor, n_users: int) -> tuple[torch.Tensor,
                                                                                   torch.Tensor]:
    """Symmetric edge list of the user-item graph on nodes [users | items]."""
    item_nodes = items + n_users
    return torch.cat([users, item_nodes]), torch.cat([item_nodes, users])


def sym_norm_values(rows: torch.Tensor, cols: torch.Tensor, n_nodes: int) -> torch.Tensor:
    """Edge weights 1/sqrt(d_r d_c) with degrees counted on rows (+1e-7, as MMRec)."""
    deg = torch.bincount(rows, minlength=n_nodes).float() + 1e-7
    return deg[rows].rsqrt() * deg[cols].rsqrt()


def normalized_adjacency(users: torch.Tensor, items: torch.Tensor, n_users: int,
                         n_items: int) -> torch.Tensor:
    """D^-1/2 A D^-1/2 of the bipartite graph as an (U+I, U+I) CSR matrix."""
    n = n_users + n_items
    rows, cols = bipartite_edges(users, items, n_users)
    return sparse_csr(rows, cols, sym_norm_values(rows, cols, n), (n, n))


def propagate_mean(adj: torch.Tensor, ego: torch.Tensor, n_layers: int) -> torch.Tensor:
    """LightGCN propagation: mean of the layer-0..L embeddings."""
    layers = [ego]
    x = ego
    for _ in range(n_layers):
        x = sym_spmm(adj, x)                    # (N, d)
        layers.append(x)
    return torch.stack(layers).mean(0)


class _SpMM(torch.autograd.Function):
    """y = A x for a constant sparse A whose transpose is precomputed for the backward."""

    @staticmethod
    def forward(ctx, adj: torch.Tensor, adj_t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        ctx.adj_t = adj_t
        return adj @ x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return None, None, ctx.adj_t @ grad


def spmm(adj: torch.Tensor, adj_t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Multiply by a non-symmetric sparse matrix (kNN graphs, the user-item block R)."""
    return _SpMM.apply(adj, adj_t, x)


def csr_transpose(adj: torch.Tensor) -> torch.Tensor:
    """Transpose of a CSR matrix, again as CSR."""
    coo = adj.to_sparse_coo().coalesce()
    rows, cols = coo.indices()
    return sparse_csr(cols, rows, coo.values(), (adj.shape[1], adj.shape[0]))


def bipartite_edge_weights(users: torch.Tensor, items: torch.Tensor, n_users: int,
                           n_items: int) -> torch.Tensor:
    """1/sqrt(d_u d_i) of every interaction (degrees + 1e-7, as MMRec's FREEDOM)."""
    d_u = torch.bincount(users, minlength=n_users).float() + 1e-7
    d_i = torch.bincount(items, minlength=n_items).float() + 1e-7
    return d_u[users].rsqrt() * d_i[items].rsqrt()


def user_item_block(users: torch.Tensor, items: torch.Tensor, n_users: int,
                    n_items: int) -> torch.Tensor:
    """R: the user-to-item block of D^-1/2 A D^-1/2 as a (U, I) CSR matrix (MGCN, SMORE)."""
    values = bipartite_edge_weights(users, items, n_users, n_items)
    return sparse_csr(users, items, values, (n_users, n_items))


def prune_edges(weights: torch.Tensor, n_keep: int, generator: torch.Generator) -> torch.Tensor:
    """Indices of n_keep edges drawn without replacement, proportional to weights (FREEDOM)."""
    return torch.multinomial(weights.cpu(), n_keep, replacement=False, generator=generator)
