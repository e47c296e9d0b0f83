"""Deep prompts, independent per layer: IVLP (Khattak et al., MaPLe, CVPR 2023) as used by PTMRec stage 2.

One set of `n_ctx` learnable tokens per block for the first `depth` blocks of a tower, attached from
outside as the tower's token hook (base.py), no coupling between towers (reference/ALGORITHMS.md §2):

- depth J means prompts at the input of blocks 0..J-1: layer-0 prompts are inserted where the tower
  calls `on_embed`; in blocks 1..J-1 the prompt slots are overwritten with that block's own prompts;
  after block J-1 the tokens stay in the sequence and are carried by the frozen blocks. J is capped at
  the tower's number of blocks.
- open_clip vision: appended after the patch tokens, after the positional embedding (prompts get no
  position) and before `ln_pre`; deep prompts replace the last n_ctx tokens; CLS (index 0) is pooled.
- open_clip text: spliced after SOS at positions 1..n_ctx before the positional embedding (so they get
  positions 1..n_ctx, as MaPLe's placeholder words); the EOT pool index moves by n_ctx. The sequence
  must stay within the model's positions and its causal mask, so texts are tokenised to
  `model_ctx - n_ctx` tokens: build the text tower from `prompted_text_config`.
- BERT (MiniLM): after [CLS] at 1..n_ctx, after the embedding LayerNorm; the attention mask is
  extended so every token attends to them. They are excluded from the mean pooling (`pool_mask`):
  as in CLIP (CLS/EOT pooled) and prefix/P-tuning v2, prompts act on the output only through
  attention, and the pooled mean does not get a prompt share that grows as texts get shorter.

With n_ctx = 0 or depth = 0 the hook is the identity. The hook uses only shapes and Python ints from
the config, no `.item()` and no branching on tensor values, so a prompted tower traces and exports.
"""
from __future__ import annotations

import logging
from dataclasses import replace
from typing import Literal

import open_clip
import torch
from pydantic import Field
from torch import Tensor, nn

from train.encoders.base import Strict, TokenState, Tower
from train.encoders.openclip import OpenClipTextConfig, OpenClipTextTower

log = logging.getLogger(__name__)

Placement = Literal["append", "after_first"]


class PromptConfig(Strict):
    """IVLP deep prompts: n_ctx tokens at the input of each of the first `depth` blocks."""

    name: Literal["prompt"] = "prompt"
    n_ctx: int = Field(2, ge=0, description="prompt tokens per block")
    depth: int = Field(9, ge=0, description="blocks 0..depth-1 get prompts (capped at the tower's)")
    init_std: float = Field(0.02, ge=0, description="prompts start as N(0, init_std)")


def count_trainable(module: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts of a module, shared parameters counted once."""
    trainable = total = 0
    for p in module.parameters():
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


def _insert(seq: Tensor, new: Tensor, placement: Placement) -> Tensor:
    """Put `new` (B, n, ...) at the end of `seq` (B, L, ...) or right after its first token."""
    if placement == "append":
        return torch.cat([seq, new], dim=1)  # (B, L+n, ...)
    return torch.cat([seq[:, :1], new, seq[:, 1:]], dim=1)  # (B, L+n, ...)


class DeepPrompts(nn.Module):
    """Token hook holding independent per-block prompts (depth, n_ctx, width)."""

    def __init__(self, depth: int, n_ctx: int, width: int, placement: Placement,
                 init_std: float = 0.02) -> None:
        super().__init__()
        self.placement: Placement = placement
        self.n_ctx = n_ctx if depth > 0 else 0
        self.depth = depth if n_ctx > 0 else 0
        self.prompts = nn.Parameter(torch.empty(self.depth, self.n_ctx, width))  # (J, n, W)
        nn.init.normal_(self.prompts, std=init_std)

    def extra_repr(self) -> str:
        """Shape and placement, for printing."""
        width = self.prompts.shape[-1]
        return f"depth={self.depth}, n_ctx={self.n_ctx}, width={width}, placement={self.placement}"

    def _expand(self, layer: int, x: Tensor) -> Tensor:
        """Prompts of one block, batched and cast like the tokens: (B, n, W)."""
        return self.prompts[layer].to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)

    def on_embed(self, state: TokenState) -> TokenState:
        """Insert the layer-0 prompts; extend the padding mask and shift the pool index to match."""
        if self.n_ctx == 0:
            return state
        x, n = state.x, self.n_ctx
        new_x = _insert(x, self._expand(0, x), self.placement)  # (B, L+n, W)
        pad_mask, pool_mask, pool_index = state.pad_mask, state.pool_mask, state.pool_index
        if pad_mask is not None:
            base = pad_mask if pool_mask is None else pool_mask
            ones = torch.ones(x.shape[0], n, dtype=pad_mask.dtype, device=pad_mask.device)  # (B, n)
            pad_mask = _insert(pad_mask, ones, self.placement)  # (B, L+n) prompts are attended
            pool_mask = _insert(base, torch.zeros_like(ones, dtype=base.dtype), self.placement)  # not pooled
        if pool_index is not None and self.placement == "after_first":
            pool_index = torch.where(pool_index >= 1, pool_index + n, pool_index)  # (B,)
        return replace(state, x=new_x, pad_mask=pad_mask, pool_index=pool_index, pool_mask=pool_mask)

    def before_block(self, index: int, state: TokenState) -> TokenState:
        """Blocks 1..depth-1: overwrite the prompt slots with that block's prompts."""
        if not 1 <= index < self.depth:
            return state
        x, n = state.x, self.n_ctx
        p = self._expand(index, x)  # (B, n, W)
        if self.placement == "append":
            return state.with_x(torch.cat([x[:, :-n], p], dim=1))  # (B, L, W)
        return state.with_x(torch.cat([x[:, :1], p, x[:, 1 + n:]], dim=1))  # (B, L, W)


def prompted_text_config(cfg: OpenClipTextConfig, n_ctx: int) -> OpenClipTextConfig:
    """The text config tokenising to `model_ctx - n_ctx`, so spliced prompts keep the model's length."""
    model_cfg = open_clip.get_model_config(cfg.model)
    if model_cfg is None:
        raise ValueError(f"unknown open_clip model {cfg.model!r}")
    room = int(model_cfg["text_cfg"].get("context_length", 77)) - n_ctx
    length = room if cfg.context_length is None else min(cfg.context_length, room)
    return OpenClipTextConfig.model_validate({**cfg.model_dump(), "context_length": length})


def _check_tower(tower: Tower, n_ctx: int) -> None:
    """Refuse towers where prompts would not fit or would be pooled by position."""
    visual = getattr(tower, "visual", None)
    if visual is not None and visual.pool_type != "tok":
        raise NotImplementedError(f"prompts need CLS pooling; the vision tower pools {visual.pool_type!r}")
    if isinstance(tower, OpenClipTextTower):
        limit = tower.positional_embedding.shape[0]
        if tower.context_length + n_ctx > limit:
            raise ValueError(
                f"text context_length {tower.context_length} + n_ctx {n_ctx} > the model's {limit} "
                "positions; build the text tower from prompted_text_config(cfg, n_ctx)"
            )


def attach_prompts(tower: Tower, cfg: PromptConfig) -> DeepPrompts:
    """Freeze the tower, attach trainable deep prompts as its token hook and return them."""
    if not tower.takes_prompts:
        raise ValueError(f"deep prompts are ViT/transformer-only: {type(tower).__name__} has no "
                         "token sequence to put them in; tune it with method lora or ia3")
    depth = min(cfg.depth, len(tower.blocks))
    if depth < cfg.depth:
        log.warning("prompt depth %d capped at the tower's %d blocks", cfg.depth, depth)
    _check_tower(tower, cfg.n_ctx if depth > 0 else 0)
    for p in tower.parameters():
        p.requires_grad_(False)
    ref = next(tower.parameters())
    placement: Placement = "append" if tower.modality == "image" else "after_first"
    hook = DeepPrompts(depth, cfg.n_ctx, tower.width, placement, cfg.init_std)
    hook = hook.to(device=ref.device, dtype=ref.dtype if ref.is_floating_point() else None)
    tower.set_token_hook(hook)
    return hook
