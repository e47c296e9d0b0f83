"""BPR-MF (Rendle et al., UAI 2009) as in MMRec: xavier-normal embeddings, score u·i,
loss BPR + reg_weight * EmbLoss(u, p, n)."""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from train.backbones.base import Backbone, BackboneInputs
from train.losses import bpr_loss, emb_loss
from train.sampling import Batch


class BPRConfig(BaseModel):
    """Matrix factorisation trained with BPR."""

    model_config = ConfigDict(extra="forbid")
    name: Literal["bpr"] = "bpr"
    embedding_size: int = 64
    reg_weight: float = 1e-5


class BPR(Backbone):
    """ID-only matrix factorisation."""

    def __init__(self, cfg: BPRConfig, inputs: BackboneInputs):
        super().__init__()
        self.cfg = cfg
        self.user = nn.Embedding(inputs.n_users, cfg.embedding_size)
        self.item = nn.Embedding(inputs.n_items, cfg.embedding_size)
        nn.init.xavier_normal_(self.user.weight)
        nn.init.xavier_normal_(self.item.weight)

    def loss(self, batch: Batch) -> torch.Tensor:
        u = self.user(batch.users)                                  # (B, d)
        p, n = self.item(batch.pos), self.item(batch.neg)            # (B, d)
        mf = bpr_loss((u * p).sum(1), (u * n).sum(1))
        return mf + self.cfg.reg_weight * emb_loss(u, p, n)

    def embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.user.weight, self.item.weight
