"""The tower interface shared by every encoder: prepare raw inputs, then embed -> blocks -> pool -> project.

Forward is split into visible steps so that stage 2 (PTMRec's knowledge-guided prompts, IVLP
semantics, reference/ALGORITHMS.md §2) can attach from outside through `token_hook`, an `nn.Module`
with two methods:

- `on_embed(state) -> state`: called where layer-0 prompts go (vision: after the positional
  embedding, before `ln_pre`; open_clip text: after the token embedding, before the positional
  embedding; BERT: after the embedding module, before block 0);
- `before_block(index, state) -> state`: called before every block (deep prompts replace tokens here).

The hook may change the sequence length, `pad_mask`, `pool_index` and `pool_mask` (tokens a
mean-pooling tower averages, when they differ from the attended ones); attention masks are derived
from the state inside each tower, so they follow. Without a hook a tower equals its source model.
"""
from __future__ import annotations

import hashlib
import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor, nn

log = logging.getLogger(__name__)

Modality = Literal["image", "text"]


class Strict(BaseModel):
    """Base for encoder configs: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


@dataclass
class TokenState:
    """The residual stream between steps: tokens, padding and the position a text tower pools."""

    x: Tensor  # (B, L, W)
    pad_mask: Tensor | None = None  # (B, L) 1 = real token; None = no padding
    pool_index: Tensor | None = None  # (B,) position pooled by argmax/EOT text towers
    pool_mask: Tensor | None = None  # (B, L) 1 = averaged by mean-pooling towers; None = pad_mask

    def with_x(self, x: Tensor) -> TokenState:
        """Same state with new tokens."""
        return replace(self, x=x)


def state_digest(module: nn.Module) -> str:
    """sha256 over a module's state_dict (names, dtypes, shapes and raw bytes), in name order."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class Tower(nn.Module, ABC):
    """An encoder tower: raw items -> prepared tensors -> (B, out_dim) features."""

    modality: Modality
    out_dim: int
    width: int  # token width inside the blocks (size of a prompt vector)
    takes_prompts: bool = True  # False: no token sequence (CNNs); deep prompts are refused

    def __init__(self) -> None:
        super().__init__()
        self.register_module("token_hook", None)

    @classmethod
    @abstractmethod
    def from_config(cls, cfg: Any) -> Tower:
        """Load the weights a config names and build the tower (CPU, eval mode)."""

    # ---- identity and inputs -------------------------------------------------------------
    @abstractmethod
    def describe(self) -> str:
        """Architecture, weight source and preprocessing, as a short human-readable string."""

    def identity(self) -> str:
        """Unique name of architecture + current weights (+ hook) + preprocessing; a cache key."""
        hook = "" if self.token_hook is None else f"|hook={type(self.token_hook).__qualname__}"
        return f"{self.describe()}{hook}|state={state_digest(self)}"

    @abstractmethod
    def prepare_counted(self, raw: list) -> tuple[Tensor | dict[str, Tensor], int]:
        """Raw items -> (model input on CPU, number of missing items replaced by blanks)."""

    def prepare(self, raw: list) -> Tensor | dict[str, Tensor]:
        """Raw items (images or strings) -> model input on CPU; logs how many were missing."""
        prepared, n_missing = self.prepare_counted(raw)
        if n_missing:
            what = "images missing or unreadable (blank used)" if self.modality == "image" else "texts empty"
            log.warning("%d of %d %s", n_missing, len(raw), what)
        return prepared

    # ---- forward, in visible steps -------------------------------------------------------------
    @abstractmethod
    def embed(self, prepared: Any) -> TokenState:
        """Model input -> tokens at the layer-0 prompt insertion point."""

    def enter(self, state: TokenState) -> TokenState:
        """Steps between the insertion point and block 0 (default: none)."""
        return state

    @property
    @abstractmethod
    def blocks(self) -> nn.ModuleList:
        """The transformer blocks, in order (open_clip `resblocks`, BERT `encoder.layer`)."""

    @abstractmethod
    def run_block(self, block: nn.Module, state: TokenState) -> Tensor:
        """One block on the current state -> new tokens (B, L, W)."""

    def run_blocks(self, state: TokenState) -> TokenState:
        """All blocks, calling the hook's `before_block` before each one."""
        for index, block in enumerate(self.blocks):
            if self.token_hook is not None:
                state = self.token_hook.before_block(index, state)
            state = state.with_x(self.run_block(block, state))
        return state

    @abstractmethod
    def pool(self, state: TokenState) -> Tensor:
        """Final tokens -> one vector per item (B, W)."""

    @abstractmethod
    def project(self, pooled: Tensor) -> Tensor:
        """Pooled vector -> output feature (B, out_dim)."""

    def forward(self, prepared: Any) -> Tensor:
        """embed -> (hook) -> enter -> blocks -> pool -> project; returns (B, out_dim)."""
        state = self.embed(prepared)
        if self.token_hook is not None:
            state = self.token_hook.on_embed(state)
        state = self.enter(state)
        state = self.run_blocks(state)
        return self.project(self.pool(state))  # (B, out_dim)

    def set_token_hook(self, hook: nn.Module | None) -> None:
        """Attach (or remove with None) a module with `on_embed` and `before_block`."""
        self.token_hook = hook
