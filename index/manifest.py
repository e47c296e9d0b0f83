"""The bundle manifest: the one typed contract between the offline exporter and the server.

`manifest.json` in every bundle directory is a `Manifest` serialised as JSON (DESIGN.md §7). Every
model forbids unknown keys, so a typo or a field from a newer schema is an error, never silently
ignored; a breaking change bumps `SCHEMA_VERSION`. `version` and `files` are filled in by
`index.bundle.write_bundle`; the exporter fills everything else.
"""
from __future__ import annotations

import re
from datetime import datetime, timezone
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
MANIFEST_SHA256_NAME = "manifest.sha256"
_FILE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")


class _Strict(BaseModel):
    """Base for every manifest group: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


class FileEntry(_Strict):
    """Checksum and size of one bundle file."""

    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    bytes: int = Field(ge=0)


class Counts(_Strict):
    """How many users and items the bundle holds, and whether it can embed new items."""

    users: int = Field(ge=0)
    items: int = Field(ge=0)
    cold_start: bool = False


class EncoderSpec(_Strict):
    """Input contract of the exported cold-start encoders (preprocessing must match training)."""

    image_size: int = Field(ge=1)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: Literal["bicubic", "bilinear", "nearest"] = "bicubic"
    resize_mode: Literal["shortest", "longest", "squash"] = "shortest"
    context_length: int = Field(ge=1)
    tokenizer: Literal["clip", "bert"]
    n_ctx: int = Field(0, ge=0, description="learned prompt tokens per prompted layer")
    prompt_depth: int = Field(0, ge=0, description="number of prompted layers per tower")
    encoder_tuning: Literal["none", "prompt", "lora", "ia3"] = Field(
        "none", description="stage-2 method baked into the ONNX towers: none (frozen towers), deep "
        "prompts inside the graph, or LoRA / (IA)^3 adapters merged into the weights")
    tuned_modalities: list[Literal["image", "text"]] = Field(
        default_factory=list, description="towers that carry the stage-2 tuning")
    image_encoder: str | None = Field(None, description="ONNX file of the image tower, if any")
    text_encoder: str | None = Field(None, description="ONNX file of the text tower, if any")
    tokenizer_file: str | None = Field(None, description="tokenizers JSON for the text tower")
    preprocess_file: str | None = Field(None, description="preprocess.json of the image tower")
    attributes_file: str | None = Field(None, description="attributes.json (index.attributes."
                                        "AttributesSpec): attribute fields parsed from the text")
    attributes_head: str | None = Field(None, description="(slots + 1, d) float32 .npy: the "
                                        "attribute head's weight^T with its bias as last row")
    text_inputs: list[str] = Field(default_factory=lambda: ["input_ids", "attention_mask"],
                                   description="ONNX input names of the text encoder, int64 (B, L)")
    fusion: Literal["mean"] = Field("mean", description="how per-modality vectors combine")
    blank_image: Literal["mean"] = Field(
        "mean", description="a missing image is the dataset-mean colour: all zeros once normalised")
    text_padding: Literal["longest", "fixed"] = Field(
        "longest", description="tokenizer.json pads to the longest text of a batch (dynamic "
        "sequence axis, at most context_length) or always to context_length (fixed axis)")
    image_quantization: Literal["none", "int8-dynamic", "int8-weight-only"] = Field(
        "none", description="image_encoder.onnx weights: fp32, int8 MatMulInteger with dynamic "
        "activation quantisation, or int8 weight-only MatMulNBits (com.microsoft)")
    text_quantization: Literal["none", "int8-dynamic", "int8-weight-only"] = Field(
        "none", description="text_encoder.onnx weights, as image_quantization")

    @field_validator("std")
    @classmethod
    def _positive_std(cls, std: tuple[float, float, float]) -> tuple[float, float, float]:
        if min(std) <= 0:
            raise ValueError("std must be positive")
        return std

    @model_validator(mode="after")
    def _tuning_consistent(self) -> EncoderSpec:
        if (self.encoder_tuning == "none") != (not self.tuned_modalities):
            raise ValueError(f"encoder_tuning {self.encoder_tuning!r} with tuned_modalities "
                             f"{self.tuned_modalities}: both must be set, or neither")
        if (self.attributes_file is None) != (self.attributes_head is None):
            raise ValueError("attributes_file and attributes_head: both must be set, or neither")
        return self

    def referenced_files(self) -> list[str]:
        """Bundle files this spec points at."""
        names = (self.image_encoder, self.text_encoder, self.tokenizer_file, self.preprocess_file,
                 self.attributes_file, self.attributes_head)
        return [name for name in names if name is not None]


class Manifest(_Strict):
    """Everything a server needs to know about one bundle version."""

    schema_version: Literal[1] = SCHEMA_VERSION
    version: int = Field(0, ge=0, description="bundle number N of vN; 0 until written")
    created: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))
    source_run: str
    config_hash: str
    backbone: str
    dim: int = Field(ge=1)
    metric: Literal["ip"] = "ip"
    normalized: bool
    faiss_factory: str = Field(min_length=1)
    user_groups: int = Field(1, ge=1, description="PerPEFT user groups: item vectors are that "
                             "many concatenated blocks of dim/user_groups, one per group, and a "
                             "user's vector is zero outside its group's block (still plain ip)")
    counts: Counts
    encoder: EncoderSpec | None = None
    metrics: dict[str, float] = Field(default_factory=dict)
    event_watermark: int = Field(0, ge=0, description="last event-store id the training data "
                                 "included; the server applies only later events (0: none)")
    files: dict[str, FileEntry] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _groups_divide_dim(self) -> Manifest:
        if self.dim % self.user_groups:
            raise ValueError(f"dim {self.dim} is not a multiple of user_groups {self.user_groups}")
        return self

    @field_validator("files")
    @classmethod
    def _flat_names(cls, files: dict[str, FileEntry]) -> dict[str, FileEntry]:
        for name in files:
            if not _FILE_NAME.match(name) or name in (MANIFEST_NAME, MANIFEST_SHA256_NAME):
                raise ValueError(f"invalid bundle file name {name!r}")
        return files

    @model_validator(mode="after")
    def _encoder_files_listed(self) -> Manifest:
        if self.encoder is not None and self.files:
            missing = [n for n in self.encoder.referenced_files() if n not in self.files]
            if missing:
                raise ValueError(f"encoder refers to files not in the bundle: {missing}")
        return self

    def to_json(self) -> str:
        """Canonical JSON text of this manifest."""
        return self.model_dump_json(indent=2) + "\n"
