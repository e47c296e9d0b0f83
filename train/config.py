"""Typed run configuration: small pydantic groups, YAML files plus `--set a.b=c` overrides.

Building a config never reads argv or the environment and never picks a device (STYLE.md §3).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from train.backbones import BackboneConfig
from train.coldstart import ColdStartConfig
from train.evaluate import METRIC_PATTERN
from train.features import EncodersConfig
from train.heads import HeadsConfig


class Strict(BaseModel):
    """Base for every config group: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid")


class DataConfig(Strict):
    """Where the dataset directory lives."""

    path: Path


class OptimConfig(Strict):
    """Adam with MMRec's exponential LR schedule lr * s0 ** (epoch / s1)."""

    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = Field(2048, ge=1)
    epochs: int = Field(1000, ge=1)
    lr_scheduler: tuple[float, float] = (1.0, 50.0)


class EvalConfig(Strict):
    """Full-ranking evaluation and early stopping (MMRec: Recall@20, patience 20, strict)."""

    ks: list[int] = [10, 20, 50]
    valid_metric: str = Field("recall@20", pattern=METRIC_PATTERN)
    patience: int = Field(20, ge=0)
    batch_size: int = Field(4096, ge=1)

    @field_validator("ks")
    @classmethod
    def _positive_sorted(cls, ks: list[int]) -> list[int]:
        if not ks or min(ks) < 1:
            raise ValueError("ks must be a non-empty list of positive integers")
        return sorted(set(ks))

    @model_validator(mode="after")
    def _valid_metric_is_evaluated(self) -> "EvalConfig":
        k = int(self.valid_metric.split("@")[1])
        if k not in self.ks:
            raise ValueError(f"valid_metric {self.valid_metric} needs {k} in ks {self.ks}")
        return self


class TrainConfig(Strict):
    """Root config of `python -m train`."""

    seed: int = 999
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int | None = Field(None, ge=1, description="torch CPU threads; None keeps default")
    data: DataConfig
    backbone: BackboneConfig
    optim: OptimConfig = Field(default_factory=OptimConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    encoders: EncodersConfig | None = None
    heads: HeadsConfig | None = None
    cold_start: ColdStartConfig | None = None

    def config_hash(self) -> str:
        """sha256 of the canonical JSON of this config."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """Apply one `a.b=c` override in place; the value is parsed as YAML (numbers, lists, ...)."""
    if "=" not in assignment:
        raise ValueError(f"override {assignment!r} must look like a.b=value")
    key, value = assignment.split("=", 1)
    node = raw
    parts = key.strip().split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ValueError(f"override {assignment!r}: {part!r} is not a group")
        node = child
    node[parts[-1]] = yaml.safe_load(value)


def load_raw(path: Path | None, overrides: list[str] | None = None) -> dict[str, Any]:
    """A YAML mapping (empty without a path) with `a.b=c` overrides applied, not yet validated."""
    raw = (yaml.safe_load(Path(path).read_text(encoding="utf-8")) if path else None) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: top level must be a mapping")
    for assignment in overrides or []:
        apply_override(raw, assignment)
    return raw


def load_config(path: Path, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML config, apply overrides and validate it."""
    return TrainConfig.model_validate(load_raw(path, overrides))


def dump_config(cfg: TrainConfig, path: Path) -> None:
    """Write the resolved config as YAML."""
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False),
                    encoding="utf-8")
