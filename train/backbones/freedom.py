"""FREEDOM (Zhou & Shen, "A Tale of Two Graphs: Freezing and Denoising Graph Structures for
Multimodal Recommendation", ACM MM 2023) as MMRec's `models/freedom.py` computes it.

- A FROZEN item-item graph: per modality the binary top-k cosine kNN graph of the raw features
  (self included, row-degree sym-norm), mixed as w·image + (1-w)·text; it propagates the item ID
  embeddings (n_mm_layers times), not the features.
- A DENOISED user-item graph: each epoch keeps int(E·(1-dropout)) interactions drawn without
  replacement with probability ∝ 1/sqrt(d_u d_i) (degree-sensitive edge pruning), re-normalised;
  LightGCN (mean of layers 0..n_ui_layers) runs on it in training and on the full graph for ranking.
- Loss: BPR(u, i + h) + reg_weight · Σ_m BPR(u, trs_m(f_m)[pos], trs_m(f_m)[neg]) with trainable
  raw feature tables. Only the batch rows are projected (the same gradients as projecting every
  item and indexing, at a fraction of the cost); with reg_weight 0 the modal terms are skipped,
  which leaves every parameter exactly where MMRec's zero-weighted terms leave it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from train.backbones.base import Backbone, BackboneInputs
from train.backbones.fused import ModalConfig, init_ids_and_content
from train.graph import (bipartite_edge_weights, csr_transpose, normalized_adjacency,
                         propagate_mean, prune_edges, spmm)
from train.knn import knn_graph, weighted_sum
from train.losses import bpr_loss
from train.sampling import Batch


class FREEDOMConfig(ModalConfig):
    """MMRec defaults; dropout 0.8 and reg_weight 0 were the best by validation on ml100k."""

    name: Literal["freedom"] = "freedom"
    n_mm_layers: int = 1
    n_ui_layers: int = 2
    knn_k: int = 10
    mm_image_weight: float = Field(0.1, ge=0.0, le=1.0)
    dropout: float = Field(0.8, ge=0.0, lt=1.0)
    reg_weight: float = 0.0
    graph_cache: Path | None = None


class FREEDOM(Backbone):
    """Frozen kNN item graph + degree-pruned user-item graph."""

    def __init__(self, cfg: FREEDOMConfig, inputs: BackboneInputs):
        super().__init__()
        self.cfg = cfg
        feats = init_ids_and_content(self, inputs, cfg.modalities, cfg.name, cfg.embedding_size)
        mm_adj = self._item_graph(feats)
        self.register_buffer("mm_adj", mm_adj, persistent=False)
        self.register_buffer("mm_adj_t", csr_transpose(mm_adj), persistent=False)
        users, items = inputs.train_users, inputs.train_items
        self.register_buffer("norm_adj", normalized_adjacency(users, items, self.n_users,
                                                              self.n_items), persistent=False)
        self.register_buffer("edge_users", users.clone(), persistent=False)
        self.register_buffer("edge_items", items.clone(), persistent=False)
        self.register_buffer("edge_weights", bipartite_edge_weights(users, items, self.n_users,
                                                                    self.n_items), persistent=False)
        self.register_buffer("masked_adj", None, persistent=False)

    def _item_graph(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        """mm_adj = w·image_adj + (1-w)·text_adj over binary kNN graphs (one modality: itself)."""
        graphs = {m: knn_graph(f, self.cfg.knn_k, "binary", self.cfg.graph_cache)
                  for m, f in feats.items()}
        if len(graphs) == 1:
            return next(iter(graphs.values()))
        w = self.cfg.mm_image_weight
        return weighted_sum([(w, graphs["image"]), (1.0 - w, graphs["text"])])

    def on_epoch_start(self, generator: torch.Generator) -> None:
        """Degree-sensitive edge pruning: a new denoised user-item graph for this epoch."""
        if self.cfg.dropout <= 0:
            self.masked_adj = self.norm_adj
            return
        n_keep = int(len(self.edge_weights) * (1.0 - self.cfg.dropout))
        keep = prune_edges(self.edge_weights, n_keep, generator).to(self.edge_users.device)
        self.masked_adj = normalized_adjacency(self.edge_users[keep], self.edge_items[keep],
                                               self.n_users, self.n_items)

    def _propagate(self, adj: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(users (U, d), items (I, d)): LightGCN on adj, plus h = mm_adj^L item_id for items."""
        h = self.item_id_embedding.weight
        for _ in range(self.cfg.n_mm_layers):
            h = spmm(self.mm_adj, self.mm_adj_t, h)                            # (I, d)
        ego = torch.cat([self.user_embedding.weight, self.item_id_embedding.weight])
        out = propagate_mean(adj, ego, self.cfg.n_ui_layers)                   # (U+I, d)
        return out[:self.n_users], out[self.n_users:] + h

    def loss(self, batch: Batch) -> torch.Tensor:
        adj = self.norm_adj if self.masked_adj is None else self.masked_adj
        users, items = self._propagate(adj)
        u = users.index_select(0, batch.users)                                 # (B, d)
        p, n = items.index_select(0, batch.pos), items.index_select(0, batch.neg)
        loss = bpr_loss((u * p).sum(1), (u * n).sum(1))
        if self.cfg.reg_weight == 0:
            return loss
        both = torch.cat([batch.pos, batch.neg])
        rows, inverse = torch.unique(both, return_inverse=True)
        modal = 0.0
        for m, table in self.features.items():
            proj = self.trs[m](table.index_select(0, rows))                    # (r, d)
            mp, mn = proj.index_select(0, inverse).chunk(2)                    # (B, d) each
            modal = modal + bpr_loss((u * mp).sum(1), (u * mn).sum(1))
        return loss + self.cfg.reg_weight * modal

    def embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._propagate(self.norm_adj)

    def id_embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.user_embedding.weight, self.item_id_embedding.weight
