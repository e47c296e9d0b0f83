"""The common backbone interface (DESIGN.md §5) and the tensors a backbone is built from."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from train.sampling import Batch


@dataclass
class BackboneInputs:
    """Everything a backbone constructor may take: sizes and tensors, never a dataset or path."""

    n_users: int
    n_items: int
    train_users: torch.Tensor   # (E,) training interactions
    train_items: torch.Tensor   # (E,)
    features: dict[str, torch.Tensor] = field(default_factory=dict)  # modality -> (I, d_m)


class Backbone(nn.Module):
    """Scores are dot products of user and item embeddings, so every backbone exports to an index."""

    @property
    def dim(self) -> int:
        """Width d of the user and item vectors that `embeddings()` returns."""
        return self.cfg.embedding_size

    def loss(self, batch: Batch) -> torch.Tensor:
        """Training loss of one batch."""
        raise NotImplementedError

    def embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(users (U, d), items (I, d)) for ranking; graph models propagate once here."""
        raise NotImplementedError

    def user_embeddings(self) -> torch.Tensor:
        """User vectors (U, d)."""
        return self.embeddings()[0]

    def item_embeddings(self) -> torch.Tensor:
        """Item vectors (I, d)."""
        return self.embeddings()[1]

    def id_embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Ego (layer-0) ID embeddings: the "personalised matching patterns" of PTMRec."""
        return self.embeddings()

    def set_features(self, modality: str, features: torch.Tensor) -> None:
        """Overwrite the item-feature table of a modality (stage 2's re-encoded items)."""
        self.features[modality].data.copy_(features)

    def on_epoch_start(self, generator: torch.Generator) -> None:
        """Hook run before each training epoch (FREEDOM re-samples its pruned graph here)."""
