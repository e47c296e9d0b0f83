"""Content heads and the knowledge-transfer loss (PTMRec, Zhang et al. 2025, without prompts).

`Linear_m` maps each modality's encoder output into the user space. The heads train on
L_KT = Σ_m KL(p_id || p_m) over the in-batch positives, where p_id = softmax(e_u · e_i^T) comes from
a detached snapshot of the backbone's embeddings and p_m = softmax(e_u · Linear_m(f_m)^T). The mean
of the heads' outputs is the cold-start item vector: it scores against the same user vectors as the
warm items, so it can be inserted into the serving index.

L_KT only matches each user's distribution over the batch's positives, which leaves the scale and
offset of cold scores against warm ones free. `rank_weight` adds a content ranking term (BPR of
user · fused cold vector, positive vs the batch's negative item) that trains the fused vector on the
very task it serves; `calibrate` (train/calibrate.py) retrains the heads after stage 1 against the
frozen best-epoch backbone from a fresh start, early-stopped on a second set of held-out items.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from train.evaluate import METRIC_PATTERN
from train.losses import bpr_loss, knowledge_transfer


class CalibrateConfig(BaseModel):
    """Head-only training after stage 1, against the frozen best-epoch backbone.

    The heads restart from a fresh (seeded) initialisation; `valid_fraction` of the items is held
    out of stage-1 training entirely (a second cold split, backbone included) and ranked by
    user · cold vector after every epoch, exactly as the cold-start evaluation ranks its items;
    the heads of the best epoch are kept.
    """

    model_config = ConfigDict(extra="forbid")
    epochs: int = Field(100, ge=1)
    learning_rate: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    valid_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    valid_metric: str = Field("recall@20", pattern=METRIC_PATTERN)
    patience: int = Field(5, ge=0)


class HeadsConfig(BaseModel):
    """Content heads trained with knowledge transfer from the ID-based ranking."""

    model_config = ConfigDict(extra="forbid")
    modalities: list[Literal["image", "text", "attributes"]] = ["image", "text"]
    kt_weight: float = 1.0
    target: Literal["final", "ego"] = "final"   # which backbone embeddings define p_id
    rank_weight: float = Field(0.0, ge=0.0, description="weight of the content ranking loss (BPR "
                               "of user · fused cold vector); 0 keeps PTMRec's L_KT alone")
    calibrate: CalibrateConfig | None = None

    @model_validator(mode="after")
    def _rank_needs_served_users(self) -> "HeadsConfig":
        if self.rank_weight and self.target != "final":
            raise ValueError("heads.rank_weight > 0 needs heads.target: final (the ranking term "
                             "scores against the user vectors that serving uses)")
        if not self.kt_weight and not self.rank_weight:
            raise ValueError("heads: kt_weight and rank_weight are both 0; nothing trains them")
        return self


class ContentHeads(nn.Module):
    """One linear head per modality into the user space, fused by averaging."""

    def __init__(self, cfg: HeadsConfig, feature_dims: dict[str, int], out_dim: int):
        super().__init__()
        missing = [m for m in cfg.modalities if m not in feature_dims]
        if missing:
            raise ValueError(f"content heads need features for {missing}; the run has "
                             f"{sorted(feature_dims) or 'none'} (configure encoders or *_feat.npy)")
        self.cfg = cfg
        self.heads = nn.ModuleDict({m: nn.Linear(feature_dims[m], out_dim) for m in cfg.modalities})
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier-normal weights, zero biases (draws from the global torch RNG). The attribute
        head starts at zero: its inputs are sparse slots, and a label that no training item
        carries (its vocabulary comes from the whole catalogue) must add nothing rather than a
        random offset to the items that do carry it."""
        for name, head in self.heads.items():
            if name == "attributes":
                nn.init.zeros_(head.weight)
            else:
                nn.init.xavier_normal_(head.weight)
            nn.init.zeros_(head.bias)

    def select(self, features: dict[str, torch.Tensor], index: torch.Tensor
               ) -> dict[str, torch.Tensor]:
        """The rows `index` of the features of the heads' modalities."""
        return {m: features[m].index_select(0, index) for m in self.heads}

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """Fused cold-start vectors (N, d) from per-modality features (N, d_m)."""
        return torch.stack([self.heads[m](features[m]) for m in self.heads]).mean(0)

    def kt_loss(self, users: torch.Tensor, items: torch.Tensor,
                features: dict[str, torch.Tensor]) -> torch.Tensor:
        """Σ_m KL(p_id || p_m) for B (user, positive) pairs; users/items are detached targets."""
        users, items = users.detach(), items.detach()
        loss = sum(knowledge_transfer(users, items, users, self.heads[m](features[m]))
                   for m in self.heads)
        return self.cfg.kt_weight * loss

    def rank_loss(self, users: torch.Tensor, pos: dict[str, torch.Tensor],
                  neg: dict[str, torch.Tensor]) -> torch.Tensor:
        """BPR of user · fused vector, positive vs negative items; users are detached."""
        users = users.detach()
        return bpr_loss((users * self(pos)).sum(1), (users * self(neg)).sum(1))

    def loss(self, users: torch.Tensor, items: torch.Tensor, pos: dict[str, torch.Tensor],
             neg: dict[str, torch.Tensor] | None) -> torch.Tensor:
        """kt_weight · L_KT + rank_weight · ranking loss for B (user, positive, negative) triples;
        `items` are the positives' backbone embeddings (the KT target), `neg` is needed only when
        rank_weight > 0."""
        loss = self.kt_loss(users, items, pos) if self.cfg.kt_weight else users.new_zeros(())
        if self.cfg.rank_weight:
            loss = loss + self.cfg.rank_weight * self.rank_loss(users, pos, neg)
        return loss
