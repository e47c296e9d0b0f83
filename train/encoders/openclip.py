"""open_clip image and text towers (open_clip_torch 3.3.0, Cherti et al. 2023; Radford et al. 2021).

Features are `encode_image` / `encode_text` outputs: projected, not L2-normalised (PTMRec stage 1,
reference/ALGORITHMS.md §7 #11). Weights come from exactly one of: a `pretrained` tag (downloads,
so it needs internet), a local `checkpoint` (safetensors, or a plain state_dict read with
`torch.load(weights_only=True)`; never arbitrary pickle), or `init_seed` (deterministic random init,
for tests and the synthetic demo with the tiny architecture `TINY_CLIP` registered below).
Tags that were trained with QuickGELU (OpenAI's) get it automatically; for a checkpoint of OpenAI
weights name the `-quickgelu` architecture (e.g. `ViT-B-32-quickgelu`).
An image and a text tower built from the same weights share one loaded model, each owning its half.
"""
from __future__ import annotations

import copy
import json
import logging
import weakref
from pathlib import Path
from typing import Literal

import open_clip
import torch
from open_clip.transformer import QuickGELU, VisionTransformer
from pydantic import Field, model_validator
from torch import Tensor, nn

from train.encoders.base import Strict, TokenState, Tower
from train.encoders.preprocess import PreprocessSpec, preprocess_images
from train.sampling import seeded_torch

log = logging.getLogger(__name__)

TINY_CLIP = "ptmrec-tiny"
TINY_CLIP_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def register_tiny_clip() -> None:
    """Register the tiny test architecture in open_clip's config registry (idempotent)."""
    open_clip.factory._MODEL_CONFIGS.setdefault(TINY_CLIP, copy.deepcopy(TINY_CLIP_CONFIG))


register_tiny_clip()


class PretrainedUnavailableError(RuntimeError):
    """Pretrained weights for a tag could not be fetched (usually: no network)."""


class OpenClipWeights(Strict):
    """Which open_clip architecture and where its weights come from (exactly one source)."""

    model: str = "ViT-B-32"
    pretrained: str | None = Field(None, description="open_clip tag, e.g. 'openai'; needs internet")
    checkpoint: Path | None = Field(None, description="local .safetensors / state_dict file")
    init_seed: int | None = Field(None, description="random init with this seed (tests, demo)")

    @model_validator(mode="after")
    def _one_source(self) -> OpenClipWeights:
        given = [k for k in ("pretrained", "checkpoint", "init_seed") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"set exactly one of pretrained / checkpoint / init_seed, got {given or 'none'}")
        return self

    def source(self) -> str:
        """The weight source as a short string (the file name only for checkpoints)."""
        if self.pretrained is not None:
            return f"pretrained={self.pretrained}"
        if self.checkpoint is not None:
            return f"checkpoint={self.checkpoint.name}"
        return f"random-init={self.init_seed}"


class OpenClipImageConfig(OpenClipWeights):
    """open_clip ViT image tower; mean/std override the model's preprocess config when set."""

    name: Literal["openclip_image"] = "openclip_image"
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None


class OpenClipTextConfig(OpenClipWeights):
    """open_clip text tower; context_length (<= the model's) sets the tokenised length."""

    name: Literal["openclip_text"] = "openclip_text"
    context_length: int | None = Field(None, ge=2)


def load_state_dict_safely(path: Path) -> dict[str, Tensor]:
    """Read a tensor state_dict from .safetensors or a weights-only torch file; refuse pickled objects."""
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path), device="cpu")
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise ValueError(
                f"{path} is not a plain tensor state_dict (weights_only load refused it: {err}); "
                "convert it to .safetensors"
            ) from err
        state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a name -> tensor state_dict")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _from_pretrained_tag(model: str, tag: str) -> nn.Module:
    """Create a model with the weights of an open_clip pretrained tag, with a clear offline error."""
    tag_cfg = open_clip.get_pretrained_cfg(model, tag)
    if not tag_cfg:
        known = open_clip.list_pretrained_tags_by_model(model)
        raise ValueError(f"unknown pretrained tag {tag!r} for {model!r}; known tags: {known}")
    quick_gelu = bool(tag_cfg.get("quick_gelu", False))  # OpenAI weights: follow the tag, not the name
    try:
        return open_clip.create_model(model, pretrained=tag, force_quick_gelu=quick_gelu)
    except Exception as err:
        raise PretrainedUnavailableError(
            f"could not fetch open_clip weights {model}/{tag}: {err}. This machine is probably offline "
            "(no network, or HF_HUB_OFFLINE=1). Download the weights once on a machine with internet, "
            "save the state_dict as .safetensors, and configure `checkpoint: /path/to/file.safetensors` "
            "instead of `pretrained`."
        ) from err


def create_clip(cfg: OpenClipWeights) -> open_clip.CLIP:
    """Build the open_clip model of a config on CPU, in eval mode, with its weights loaded."""
    if cfg.pretrained is not None:
        model = _from_pretrained_tag(cfg.model, cfg.pretrained)
    else:
        with seeded_torch(cfg.init_seed or 0):
            model = open_clip.create_model(cfg.model, pretrained=None)
        if cfg.checkpoint is not None:
            state = load_state_dict_safely(cfg.checkpoint)
            try:
                model.load_state_dict(state, strict=True)
            except RuntimeError as err:
                raise ValueError(f"checkpoint {cfg.checkpoint} does not fit {cfg.model}: {err}") from err
            log.info("loaded %s weights from %s", cfg.model, cfg.checkpoint)
    if type(model) is not open_clip.CLIP:
        raise NotImplementedError(f"{cfg.model}: only open_clip.CLIP models are supported")
    return model.eval()


def describe_clip(model: open_clip.CLIP, cfg: OpenClipWeights) -> str:
    """Model name, activation (QuickGELU or GELU) and weight source."""
    act = "quickgelu" if any(isinstance(m, QuickGELU) for m in model.modules()) else "gelu"
    return f"{cfg.model}|act={act}|{cfg.source()}"


class _Shared:
    """One loaded CLIP whose halves go to at most one image tower and one text tower."""

    def __init__(self, model: open_clip.CLIP) -> None:
        self.model: open_clip.CLIP | None = model
        self.taken: set[str] = set()

    def __deepcopy__(self, memo: dict) -> _Shared:
        return self


_LOADED: weakref.WeakValueDictionary[str, _Shared] = weakref.WeakValueDictionary()


def _load_key(cfg: OpenClipWeights) -> str:
    """Cache key of a loaded model: architecture + weight source (+ checkpoint file stat)."""
    key = f"{cfg.model}|{cfg.pretrained}|{cfg.init_seed}"
    if cfg.checkpoint is not None:
        stat = cfg.checkpoint.stat()
        key += f"|{cfg.checkpoint.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    return key


def acquire_clip(cfg: OpenClipWeights, half: Literal["image", "text"]) -> tuple[open_clip.CLIP, _Shared]:
    """A loaded CLIP for one half, shared with a tower of the other half when one is alive."""
    key = _load_key(cfg)
    shared = _LOADED.get(key)
    if shared is None or shared.model is None or half in shared.taken:
        shared = _Shared(create_clip(cfg))
        _LOADED[key] = shared
    model = shared.model
    shared.taken.add(half)
    if shared.taken == {"image", "text"}:
        shared.model = None
    return model, shared


class OpenClipImageTower(Tower):
    """open_clip ViT image tower; equals `CLIP.encode_image` (no L2 normalisation)."""

    modality = "image"

    def __init__(self, visual: VisionTransformer, spec: PreprocessSpec, source: str) -> None:
        super().__init__()
        if not isinstance(visual, VisionTransformer) or visual.attn_pool is not None:
            raise NotImplementedError("only ViT image towers without attentional pooling are supported")
        if visual.pool_type not in ("tok", "avg") or not visual.transformer.batch_first:
            raise NotImplementedError(f"unsupported vision pooling {visual.pool_type!r}")
        self.visual = visual
        self.spec = spec
        self.source = source
        self.width = visual.conv1.out_channels
        self.out_dim = visual.output_dim if visual.proj is not None else self.width

    @classmethod
    def from_config(cls, cfg: OpenClipImageConfig) -> OpenClipImageTower:
        """Load (or share) the model of a config and keep its vision half."""
        model, shared = acquire_clip(cfg, "image")
        pp = dict(model.visual.preprocess_cfg)
        pp.update({k: v for k, v in (("mean", cfg.mean), ("std", cfg.std)) if v is not None})
        tower = cls(model.visual, PreprocessSpec.from_open_clip(pp), describe_clip(model, cfg))
        tower._shared = shared
        return tower.eval()

    def describe(self) -> str:
        """Model, weights source and preprocessing parameters."""
        return f"openclip-image|{self.source}|preprocess={json.dumps(self.preprocess_spec(), sort_keys=True)}"

    def preprocess_spec(self) -> dict:
        """Preprocessing parameters as a JSON-ready dict (preprocess.json for torch-free serving)."""
        return self.spec.model_dump(mode="json")

    def prepare_counted(self, raw: list) -> tuple[Tensor, int]:
        """Images (PIL, paths or bytes) -> ((B, 3, H, W) float tensor, number of blanks)."""
        arr, n_blank = preprocess_images(list(raw), self.spec)
        return torch.from_numpy(arr), n_blank

    def embed(self, prepared: Tensor) -> TokenState:
        """Patchify, prepend CLS, add positions (prompts are appended after this, before ln_pre)."""
        v = self.visual
        x = v.conv1(prepared)  # (B, W, g, g)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)  # (B, g*g, W)
        cls_token = v.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
        x = torch.cat([cls_token, x], dim=1) + v.positional_embedding.to(x.dtype)  # (B, 1+g*g, W)
        return TokenState(v.patch_dropout(x))

    def enter(self, state: TokenState) -> TokenState:
        """ln_pre, applied to prompt tokens too (IVLP)."""
        return state.with_x(self.visual.ln_pre(state.x))

    @property
    def blocks(self) -> nn.ModuleList:
        """The ViT residual attention blocks."""
        return self.visual.transformer.resblocks

    def run_block(self, block: nn.Module, state: TokenState) -> Tensor:
        """One ViT block, no attention mask."""
        return block(state.x)  # (B, L, W)

    def _take(self, x: Tensor) -> Tensor:
        """CLS token or mean of the patch tokens."""
        return x[:, 0] if self.visual.pool_type == "tok" else x[:, 1:].mean(dim=1)

    def pool(self, state: TokenState) -> Tensor:
        """ln_post and CLS (or mean) pooling, in open_clip's order."""
        v = self.visual
        if v.final_ln_after_pool:
            return v.ln_post(self._take(state.x))  # (B, W)
        return self._take(v.ln_post(state.x))  # (B, W)

    def project(self, pooled: Tensor) -> Tensor:
        """Image projection (B, W) -> (B, out_dim)."""
        return pooled if self.visual.proj is None else pooled @ self.visual.proj


class OpenClipTextTower(Tower):
    """open_clip text tower; equals `CLIP.encode_text` (no L2 normalisation)."""

    modality = "text"

    def __init__(self, clip: open_clip.CLIP, tokenizer: object, source: str, context_length: int) -> None:
        super().__init__()
        if clip.text_pool_type not in ("argmax", "eos", "first", "last") or not clip.transformer.batch_first:
            raise NotImplementedError(f"unsupported text pooling {clip.text_pool_type!r}")
        model_length = clip.positional_embedding.shape[0]
        if context_length > model_length:
            raise ValueError(f"context_length {context_length} > the model's {model_length}")
        self.token_embedding = clip.token_embedding
        self.positional_embedding = clip.positional_embedding
        self.transformer = clip.transformer
        self.ln_final = clip.ln_final
        self.text_projection = clip.text_projection
        self.register_buffer("attn_mask", clip.attn_mask, persistent=False)
        self.pool_type = clip.text_pool_type
        self.eos_id = clip.text_eos_id
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.source = source
        self.width = clip.transformer.width
        proj = clip.text_projection
        self.out_dim = proj.out_features if isinstance(proj, nn.Linear) else (
            self.width if proj is None else proj.shape[1])

    @classmethod
    def from_config(cls, cfg: OpenClipTextConfig) -> OpenClipTextTower:
        """Load (or share) the model of a config and keep its text half."""
        model, shared = acquire_clip(cfg, "text")
        length = cfg.context_length or model.context_length
        tokenizer = open_clip.get_tokenizer(cfg.model, context_length=length)
        tower = cls(model, tokenizer, describe_clip(model, cfg), length)
        tower._shared = shared
        return tower.eval()

    def describe(self) -> str:
        """Model, weights source, tokenizer and context length."""
        return (f"openclip-text|{self.source}|tokenizer={type(self.tokenizer).__name__}"
                f"|context_length={self.context_length}|pool={self.pool_type}")

    def prepare_counted(self, raw: list) -> tuple[Tensor, int]:
        """Strings (None = empty) -> ((B, context_length) token ids, number of empty texts)."""
        texts = ["" if t is None else str(t) for t in raw]
        n_empty = sum(1 for t in texts if not t.strip())
        return self.tokenizer(texts, context_length=self.context_length), n_empty

    def embed(self, prepared: Tensor) -> TokenState:
        """Token embeddings without positions (prompts are spliced after SOS before positions)."""
        x = self.token_embedding(prepared)  # (B, L, W)
        b, length = prepared.shape
        if self.pool_type == "argmax":
            index = prepared.argmax(dim=-1)
        elif self.pool_type == "eos":
            index = (prepared == self.eos_id).int().argmax(dim=-1)
        else:
            index = torch.full((b,), 0 if self.pool_type == "first" else length - 1, device=prepared.device)
        return TokenState(x, pool_index=index)  # pool_index (B,)

    def enter(self, state: TokenState) -> TokenState:
        """Add positional embeddings for the current length."""
        length = state.x.shape[1]
        return state.with_x(state.x + self.positional_embedding[:length].to(state.x.dtype))

    @property
    def blocks(self) -> nn.ModuleList:
        """The text transformer's residual attention blocks."""
        return self.transformer.resblocks

    def run_block(self, block: nn.Module, state: TokenState) -> Tensor:
        """One causal block; the mask follows the current length."""
        length = state.x.shape[1]
        mask = None if self.attn_mask is None else self.attn_mask[:length, :length]
        return block(state.x, attn_mask=mask)  # (B, L, W)

    def pool(self, state: TokenState) -> Tensor:
        """ln_final, then the token at `pool_index` (EOT for argmax pooling)."""
        x = self.ln_final(state.x)  # (B, L, W)
        return x[torch.arange(x.shape[0], device=x.device), state.pool_index]  # (B, W)

    def project(self, pooled: Tensor) -> Tensor:
        """Text projection (B, W) -> (B, out_dim)."""
        if self.text_projection is None:
            return pooled
        if isinstance(self.text_projection, nn.Linear):
            return self.text_projection(pooled)
        return pooled @ self.text_projection
