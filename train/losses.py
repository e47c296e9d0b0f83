"""Losses in one place (MMRec src/common/loss.py semantics, PTMRec's knowledge transfer)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def bpr_loss(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """Bayesian personalised ranking: -log sigmoid(pos - neg), averaged."""
    return F.softplus(neg - pos).mean()


def emb_loss(*embeddings: torch.Tensor) -> torch.Tensor:
    """MMRec EmbLoss: sum of (unsquared) Frobenius norms divided by the batch size."""
    batch = embeddings[0].shape[0]
    return sum(torch.linalg.vector_norm(e) for e in embeddings) / batch


def squared_l2(*embeddings: torch.Tensor) -> torch.Tensor:
    """MGCN/SMORE regulariser: 0.5 * sum of squared norms divided by the batch size."""
    batch = embeddings[0].shape[0]
    return 0.5 * sum(e.pow(2).sum() for e in embeddings) / batch


def info_nce(a: torch.Tensor, b: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    """In-batch InfoNCE over cosine similarities; row i of a and b are positives."""
    a, b = F.normalize(a, dim=1), F.normalize(b, dim=1)
    logits = a @ b.T / temperature                                  # (B, B)
    return F.cross_entropy(logits, torch.arange(len(a), device=a.device))


def knowledge_transfer(user: torch.Tensor, item_id: torch.Tensor, user_m: torch.Tensor,
                       item_m: torch.Tensor) -> torch.Tensor:
    """KL(p_id || p_m) over in-batch positives (PTMRec): p_id is a detached target."""
    p_id = torch.softmax(user @ item_id.T, dim=-1).detach()        # (B, B)
    logp_m = torch.log_softmax(user_m @ item_m.T, dim=-1)          # (B, B)
    return F.kl_div(logp_m, p_id, reduction="batchmean")
