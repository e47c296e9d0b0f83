"""LightGCN (He et al., SIGIR 2020) as in MMRec: xavier-uniform ego embeddings, mean of layers
0..L over D^-1/2 A D^-1/2, loss BPR + reg_weight * EmbLoss on the ego embeddings."""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from train.backbones.base import Backbone, BackboneInputs
from train.graph import normalized_adjacency, propagate_mean
from train.losses import bpr_loss, emb_loss
from train.sampling import Batch


class LightGCNConfig(BaseModel):
    """Linear graph convolution over the user-item graph."""

    model_config = ConfigDict(extra="forbid")
    name: Literal["lightgcn"] = "lightgcn"
    embedding_size: int = 64
    n_layers: int = 2
    reg_weight: float = 1e-4


class LightGCN(Backbone):
    """ID-only LightGCN."""

    def __init__(self, cfg: LightGCNConfig, inputs: BackboneInputs):
        super().__init__()
        self.cfg = cfg
        self.n_users = inputs.n_users
        self.user = nn.Parameter(nn.init.xavier_uniform_(torch.empty(inputs.n_users,
                                                                     cfg.embedding_size)))
        self.item = nn.Parameter(nn.init.xavier_uniform_(torch.empty(inputs.n_items,
                                                                     cfg.embedding_size)))
        adj = normalized_adjacency(inputs.train_users, inputs.train_items, inputs.n_users,
                                   inputs.n_items)
        self.register_buffer("adj", adj, persistent=False)

    def embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        out = propagate_mean(self.adj, torch.cat([self.user, self.item]), self.cfg.n_layers)
        return out[:self.n_users], out[self.n_users:]

    def id_embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.user, self.item

    def loss(self, batch: Batch) -> torch.Tensor:
        users, items = self.embeddings()
        u = users.index_select(0, batch.users)                      # (B, d)
        p, n = items.index_select(0, batch.pos), items.index_select(0, batch.neg)  # (B, d)
        mf = bpr_loss((u * p).sum(1), (u * n).sum(1))
        reg = emb_loss(self.user.index_select(0, batch.users), self.item.index_select(0, batch.pos),
                       self.item.index_select(0, batch.neg))
        return mf + self.cfg.reg_weight * reg
