"""MGCN (Yu, Li, Cao, Zhang, "Multi-View Graph Convolutional Network for Multimedia
Recommendation", ACM MM 2023) as MMRec's `models/mgcn.py` computes it, plus the skeleton it shares
with SMORE (`ModalGraphBackbone`).

- Behaviour-guided purifier: x̃_m = item_id ⊙ σ(W_m trs_m(f_m) + b) over trainable raw tables
  (`features[m]`, projected by `trs[m]`: MMRec's image_trs / text_trs).
- User-item view: LightGCN (mean of layers 0..n_ui_layers) on D^-1/2 A D^-1/2 ("content").
- Item-item view per modality: x_m = S_m^{n_layers} x̃_m on the weighted top-k cosine graph
  (sym-normalised), users get R x_m with R the user-to-item block of the normalised graph.
- Behaviour-aware fuser: α = softmax([q(e_v), q(e_t)]), common = α_v e_v + α_t e_t,
  sep_m = σ(W_m content) ⊙ (e_m - common), side = (sep_v + sep_t + common) / 3;
  final = content + side.
- Loss: BPR + reg_weight · squared_l2(u, p, n) + cl_loss · [InfoNCE(side, content) on the batch's
  positive items + on its users], τ = 0.2. MMRec divides the regulariser by the configured batch
  size; we divide by the actual one (they differ only on an epoch's last, smaller batch).
The fuser is row-wise, so training fuses only the batch rows. MMRec trains MGCN with the LR schedule
[0.96, 50]: set `optim.lr_scheduler` accordingly.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from train.backbones.base import Backbone, BackboneInputs
from train.backbones.fused import MODALITIES, init_ids_and_content
from train.graph import csr_transpose, normalized_adjacency, propagate_mean, spmm, user_item_block
from train.knn import knn_graph
from train.losses import bpr_loss, info_nce, squared_l2
from train.sampling import Batch


class MGCNConfig(BaseModel):
    """MMRec defaults; cl_loss picked from its grid [0.001, 0.01, 0.1]."""

    model_config = ConfigDict(extra="forbid")
    name: Literal["mgcn"] = "mgcn"
    embedding_size: int = 64
    n_ui_layers: int = 2
    n_layers: int = 1
    knn_k: int = 10
    reg_weight: float = 1e-4
    cl_loss: float = 0.01
    graph_cache: Path | None = None


def gate(d: int) -> nn.Sequential:
    """σ(W x + b)."""
    return nn.Sequential(nn.Linear(d, d), nn.Sigmoid())


class ModalGraphBackbone(Backbone):
    """IDs + trainable feature tables + user-item graph + item-item views; subclasses fuse."""

    def __init__(self, cfg, inputs: BackboneInputs):
        super().__init__()
        self.cfg = cfg
        init_ids_and_content(self, inputs, MODALITIES, cfg.name, cfg.embedding_size)
        users, items = inputs.train_users, inputs.train_items
        self.register_buffer("norm_adj", normalized_adjacency(users, items, self.n_users,
                                                              self.n_items), persistent=False)
        r = user_item_block(users, items, self.n_users, self.n_items)
        self.register_buffer("R", r, persistent=False)
        self.register_buffer("R_t", csr_transpose(r), persistent=False)

    def add_item_graph(self, view: str, adj: torch.Tensor) -> None:
        """Register a frozen item-item graph (and its transpose) for a view."""
        self.register_buffer(f"{view}_adj", adj, persistent=False)
        self.register_buffer(f"{view}_adj_t", csr_transpose(adj), persistent=False)

    def modal_knn(self, modality: str, k: int) -> torch.Tensor:
        """The weighted, sym-normalised kNN graph of a modality's raw features."""
        return knn_graph(self.features[modality].detach(), k, "weighted", self.cfg.graph_cache)

    def projected(self) -> dict[str, torch.Tensor]:
        """trs_m(f_m) for every item: {"image": (I, d), "text": (I, d)}."""
        return {m: self.trs[m](table) for m, table in self.features.items()}

    def item_view_inputs(self) -> dict[str, torch.Tensor]:
        """Purified item embeddings (I, d) per view, before the item-item graphs."""
        raise NotImplementedError

    def fuse(self, content: torch.Tensor, views: dict[str, torch.Tensor]) -> torch.Tensor:
        """Side embeddings (n, d) of rows given their content and view embeddings (row-wise)."""
        raise NotImplementedError

    def _parts(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Content (U+I, d) and each view's user+item embeddings (U+I, d)."""
        ego = torch.cat([self.user_embedding.weight, self.item_id_embedding.weight])
        content = propagate_mean(self.norm_adj, ego, self.cfg.n_ui_layers)
        views = {}
        for view, x in self.item_view_inputs().items():
            adj, adj_t = getattr(self, f"{view}_adj"), getattr(self, f"{view}_adj_t")
            for _ in range(self.cfg.n_layers):
                x = spmm(adj, adj_t, x)                                        # (I, d)
            views[view] = torch.cat([spmm(self.R, self.R_t, x), x])            # (U+I, d)
        return content, views

    def loss(self, batch: Batch) -> torch.Tensor:
        content, views = self._parts()
        b = len(batch.users)
        rows = torch.cat([batch.users, batch.pos + self.n_users, batch.neg + self.n_users])
        c = content.index_select(0, rows)                                      # (3B, d)
        side = self.fuse(c, {v: e.index_select(0, rows) for v, e in views.items()})
        u, p, n = (c + side).split(b)                                          # (B, d) each
        loss = bpr_loss((u * p).sum(1), (u * n).sum(1))
        loss = loss + self.cfg.reg_weight * squared_l2(u, p, n)
        cl = info_nce(side[b:2 * b], c[b:2 * b]) + info_nce(side[:b], c[:b])
        return loss + self.cfg.cl_loss * cl

    def embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        content, views = self._parts()
        final = content + self.fuse(content, views)                            # (U+I, d)
        return final[:self.n_users], final[self.n_users:]

    def id_embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.user_embedding.weight, self.item_id_embedding.weight


class MGCN(ModalGraphBackbone):
    """Purifier gates, image/text item-item views, behaviour-aware fuser."""

    def __init__(self, cfg: MGCNConfig, inputs: BackboneInputs):
        super().__init__(cfg, inputs)
        d = cfg.embedding_size
        for m in MODALITIES:
            self.add_item_graph(m, self.modal_knn(m, cfg.knn_k))
        self.query_common = nn.Sequential(nn.Linear(d, d), nn.Tanh(), nn.Linear(d, 1, bias=False))
        self.gate_v, self.gate_t = gate(d), gate(d)
        self.gate_image_prefer, self.gate_text_prefer = gate(d), gate(d)

    def item_view_inputs(self) -> dict[str, torch.Tensor]:
        proj = self.projected()
        item = self.item_id_embedding.weight
        return {"image": item * self.gate_v(proj["image"]),
                "text": item * self.gate_t(proj["text"])}

    def fuse(self, content: torch.Tensor, views: dict[str, torch.Tensor]) -> torch.Tensor:
        e_v, e_t = views["image"], views["text"]                               # (n, d)
        att = torch.cat([self.query_common(e_v), self.query_common(e_t)], dim=-1).softmax(-1)
        common = att[:, :1] * e_v + att[:, 1:] * e_t                           # (n, d)
        sep_v = self.gate_image_prefer(content) * (e_v - common)
        sep_t = self.gate_text_prefer(content) * (e_t - common)
        return (sep_v + sep_t + common) / 3
