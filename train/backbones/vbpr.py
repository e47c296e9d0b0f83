"""VBPR (He & McAuley, AAAI 2016) as MMRec builds it.

A 2d-wide user vector scores the item vector cat(γ_i, E·cat(f_t, f_v)) — text first, one Linear over
the concatenated frozen features — which equals γ_u·γ_i + θ_u·E f_i. Loss: BPR + reg_weight *
EmbLoss(u, p, n) on the 2d-wide batch vectors. Items are projected only for the batch rows in
training (identical gradients: nothing else depends on the other rows).
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from train.backbones.base import Backbone, BackboneInputs
from train.backbones.fused import ModalConfig, feature_tables, require_features, xavier_linear
from train.losses import bpr_loss, emb_loss
from train.sampling import Batch


class VBPRConfig(ModalConfig):
    """Visual BPR over frozen content features."""

    name: Literal["vbpr"] = "vbpr"
    reg_weight: float = 1e-4


class VBPR(Backbone):
    """MF plus a content term; features enter through `features` and `item_linear`."""

    def __init__(self, cfg: VBPRConfig, inputs: BackboneInputs):
        super().__init__()
        self.cfg = cfg
        d = cfg.embedding_size
        order = [m for m in ("text", "image") if m in cfg.modalities]      # MMRec: text first
        self.features = feature_tables(require_features(inputs, order, cfg.name), trainable=False)
        self.u_embedding = nn.Parameter(nn.init.xavier_uniform_(torch.empty(inputs.n_users, 2 * d)))
        self.i_embedding = nn.Parameter(nn.init.xavier_uniform_(torch.empty(inputs.n_items, d)))
        self.item_linear = xavier_linear(sum(f.shape[1] for f in self.features.values()), d)

    @property
    def dim(self) -> int:
        """cat(γ, content): twice the embedding size."""
        return 2 * self.cfg.embedding_size

    def _items(self, items: torch.Tensor | None = None) -> torch.Tensor:
        """Item vectors cat(γ_i, E f_i) (n, 2d) of `items`, or of every item when None."""
        if items is None:
            raw = torch.cat(list(self.features.values()), dim=1)              # (I, Σd_m)
            return torch.cat([self.i_embedding, self.item_linear(raw)], dim=1)
        rows, inverse = torch.unique(items, return_inverse=True)            # project each once
        raw = torch.cat([f.index_select(0, rows) for f in self.features.values()], dim=1)
        content = self.item_linear(raw).index_select(0, inverse)              # (n, d)
        return torch.cat([self.i_embedding.index_select(0, items), content], dim=1)

    def loss(self, batch: Batch) -> torch.Tensor:
        u = self.u_embedding.index_select(0, batch.users)                   # (B, 2d)
        p, n = self._items(torch.cat([batch.pos, batch.neg])).chunk(2)      # (B, 2d) each
        mf = bpr_loss((u * p).sum(1), (u * n).sum(1))
        return mf + self.cfg.reg_weight * emb_loss(u, p, n)

    def embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.u_embedding, self._items()

    def id_embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        """γ_u (the first d columns of the user vector) and γ_i (ALGORITHMS.md §7 #2)."""
        return self.u_embedding[:, :self.cfg.embedding_size], self.i_embedding
