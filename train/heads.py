"""Content heads and the knowledge-transfer loss (PTMRec, Zhang et al. 2025, without prompts).

`Linear_m` maps each modality's encoder output into the user space. The heads train on
L_KT = Σ_m KL(p_id || p_m) over the in-batch positives, where p_id = softmax(e_u · e_i^T) comes from
a detached snapshot of the backbone's embeddings and p_m = softmax(e_u · Linear_m(f_m)^T). The mean
of the heads' outputs is the cold-start item vector: it scores against the same user vectors as the
warm items, so it can be inserted into the serving index.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from train.losses import knowledge_transfer


class HeadsConfig(BaseModel):
    """Content heads trained with knowledge transfer from the ID-based ranking."""

    model_config = ConfigDict(extra="forbid")
    modalities: list[Literal["image", "text"]] = ["image", "text"]
    kt_weight: float = 1.0
    target: Literal["final", "ego"] = "final"   # which backbone embeddings define p_id


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
        for head in self.heads.values():
            nn.init.xavier_normal_(head.weight)
            nn.init.zeros_(head.bias)

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
