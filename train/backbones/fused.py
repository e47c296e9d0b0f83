"""Content-fused BPR and LightGCN: item = ID + Σ_m Linear_m(f_m) (PTMRec, Zhang et al. 2025).

MMRec's BPR (Rendle et al., UAI 2009) and LightGCN (He et al., SIGIR 2020) never read item
content, so prompts could not change their ranking; PTMRec's "with PTM" rows need the content fused
into the item (reference/ALGORITHMS.md §7 #4). For LightGCN the fused ego item embedding is what
propagates. Also home of the helpers every multimodal backbone uses to take its feature tables.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, field_validator
from torch import nn

from train.backbones.base import Backbone, BackboneInputs
from train.graph import normalized_adjacency, propagate_mean
from train.losses import bpr_loss, emb_loss
from train.sampling import Batch

Modality = Literal["image", "text"]
MODALITIES: tuple[Modality, ...] = ("image", "text")


def require_features(inputs: BackboneInputs, modalities, model: str) -> dict[str, torch.Tensor]:
    """The item feature tables a model needs (float32), or a ValueError naming what is missing."""
    missing = [m for m in modalities if m not in inputs.features]
    if missing:
        raise ValueError(f"backbone {model!r} needs item features for modality "
                         f"{', '.join(repr(m) for m in missing)}, but BackboneInputs.features has "
                         f"{sorted(inputs.features) or 'none'}")
    feats = {m: inputs.features[m].float() for m in modalities}
    for m, f in feats.items():
        if f.ndim != 2 or f.shape[0] != inputs.n_items:
            raise ValueError(f"{m} features have shape {tuple(f.shape)}; expected "
                             f"({inputs.n_items}, d) for {inputs.n_items} items")
    return feats


def feature_tables(features: dict[str, torch.Tensor], trainable: bool) -> nn.ParameterDict:
    """Feature tables as parameters, trainable (MMRec's from_pretrained(freeze=False)) or not."""
    return nn.ParameterDict({m: nn.Parameter(f.clone() if trainable else f,
                                             requires_grad=trainable)
                             for m, f in features.items()})


def init_ids_and_content(model: Backbone, inputs: BackboneInputs, modalities, name: str,
                         d: int) -> dict[str, torch.Tensor]:
    """FREEDOM/MGCN/SMORE set-up: xavier-uniform user and item ID embeddings (d), trainable
    feature tables `features` and their projections `trs` (Linear d_m -> d); returns the features."""
    model.n_users, model.n_items = inputs.n_users, inputs.n_items
    feats = require_features(inputs, modalities, name)
    model.user_embedding = nn.Embedding(inputs.n_users, d)
    model.item_id_embedding = nn.Embedding(inputs.n_items, d)
    nn.init.xavier_uniform_(model.user_embedding.weight)
    nn.init.xavier_uniform_(model.item_id_embedding.weight)
    model.features = feature_tables(feats, trainable=True)                    # where content enters
    model.trs = nn.ModuleDict({m: nn.Linear(f.shape[1], d) for m, f in feats.items()})
    return feats


def xavier_linear(d_in: int, d_out: int) -> nn.Linear:
    """Linear layer with MMRec's xavier-normal weight and zero bias."""
    layer = nn.Linear(d_in, d_out)
    nn.init.xavier_normal_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


class ModalConfig(BaseModel):
    """Config fields shared by backbones that read a chosen set of modalities."""

    model_config = ConfigDict(extra="forbid")
    embedding_size: int = 64
    modalities: list[Modality] = list(MODALITIES)

    @field_validator("modalities")
    @classmethod
    def _non_empty_unique(cls, value: list[str]) -> list[str]:
        if not value or len(set(value)) != len(value):
            raise ValueError("modalities must be a non-empty list without repeats")
        return value


class FusedBPRConfig(ModalConfig):
    """BPR-MF whose item vector adds projected content features."""

    name: Literal["bpr_mm"] = "bpr_mm"
    reg_weight: float = 1e-5


class FusedLightGCNConfig(ModalConfig):
    """LightGCN whose ego item embedding adds projected content features."""

    name: Literal["lightgcn_mm"] = "lightgcn_mm"
    n_layers: int = 2
    reg_weight: float = 1e-4


def content_vectors(features: nn.ParameterDict, trs: nn.ModuleDict,
                    items: torch.Tensor | None = None) -> torch.Tensor:
    """Σ_m trs[m](features[m]) (n, d) for `items`, or for every item when None.

    Each distinct item is projected once (a batch repeats popular items).
    """
    rows, inverse = (None, None) if items is None else torch.unique(items, return_inverse=True)
    out = 0
    for m, table in features.items():
        x = table if rows is None else table.index_select(0, rows)            # (r, d_m)
        out = out + trs[m](x)                                                   # (r, d)
    return out if inverse is None else out.index_select(0, inverse)            # (n, d)


class FusedBPR(Backbone):
    """BPR with item = ID + content."""

    def __init__(self, cfg: FusedBPRConfig, inputs: BackboneInputs):
        super().__init__()
        self.cfg = cfg
        feats = require_features(inputs, cfg.modalities, cfg.name)
        self.user = nn.Embedding(inputs.n_users, cfg.embedding_size)
        self.item = nn.Embedding(inputs.n_items, cfg.embedding_size)
        nn.init.xavier_normal_(self.user.weight)
        nn.init.xavier_normal_(self.item.weight)
        self.features = feature_tables(feats, trainable=False)             # where content enters
        self.trs = nn.ModuleDict({m: xavier_linear(f.shape[1], cfg.embedding_size)
                                  for m, f in feats.items()})

    def loss(self, batch: Batch) -> torch.Tensor:
        u = self.user(batch.users)                                         # (B, d)
        items = torch.cat([batch.pos, batch.neg])
        fused = self.item(items) + content_vectors(self.features, self.trs, items)    # (2B, d)
        p, n = fused.chunk(2)
        mf = bpr_loss((u * p).sum(1), (u * n).sum(1))
        return mf + self.cfg.reg_weight * emb_loss(u, p, n)

    def embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.user.weight, self.item.weight + content_vectors(self.features, self.trs)

    def id_embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.user.weight, self.item.weight


class FusedLightGCN(Backbone):
    """LightGCN propagating item = ID + content."""

    def __init__(self, cfg: FusedLightGCNConfig, inputs: BackboneInputs):
        super().__init__()
        self.cfg = cfg
        feats = require_features(inputs, cfg.modalities, cfg.name)
        self.n_users = inputs.n_users
        d = cfg.embedding_size
        self.user = nn.Parameter(nn.init.xavier_uniform_(torch.empty(inputs.n_users, d)))
        self.item = nn.Parameter(nn.init.xavier_uniform_(torch.empty(inputs.n_items, d)))
        self.features = feature_tables(feats, trainable=False)             # where content enters
        self.trs = nn.ModuleDict({m: xavier_linear(f.shape[1], d) for m, f in feats.items()})
        adj = normalized_adjacency(inputs.train_users, inputs.train_items, inputs.n_users,
                                   inputs.n_items)
        self.register_buffer("adj", adj, persistent=False)

    def _propagate(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(users, items) after propagation, and the fused ego items (I, d)."""
        ego_items = self.item + content_vectors(self.features, self.trs)    # (I, d)
        out = propagate_mean(self.adj, torch.cat([self.user, ego_items]), self.cfg.n_layers)
        return out[:self.n_users], out[self.n_users:], ego_items

    def embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        users, items, _ = self._propagate()
        return users, items

    def id_embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.user, self.item

    def loss(self, batch: Batch) -> torch.Tensor:
        users, items, ego = self._propagate()
        u = users.index_select(0, batch.users)                             # (B, d)
        p, n = items.index_select(0, batch.pos), items.index_select(0, batch.neg)
        mf = bpr_loss((u * p).sum(1), (u * n).sum(1))
        reg = emb_loss(self.user.index_select(0, batch.users), ego.index_select(0, batch.pos),
                       ego.index_select(0, batch.neg))
        return mf + self.cfg.reg_weight * reg
