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
from train.encoders.peft_methods import PeftMethodConfig
from train.encoders.prompts import PromptConfig
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


class Stage2Config(Strict):
    """Knowledge-guided encoder tuning on top of a stage-1 run."""

    method: PeftMethodConfig = Field(default_factory=PromptConfig)
    modalities: list[Literal["image", "text"]] = ["image", "text"]
    kt_batch_size: int = Field(128, ge=2)
    kt_steps_per_epoch: int | None = Field(None, ge=1, description="cap on KT steps (CPU runs)")
    grad_accumulation: int = Field(1, ge=1)
    epochs: int = Field(50, ge=1)
    patience: int = Field(10, ge=0)
    learning_rate: float = 1e-3
    from_stage1: bool = True
    tuning_loss: Literal["kt", "bpr"] = Field(
        "kt", description="what trains the towers and heads: KL knowledge transfer (PTMRec) or "
                          "BPR on u · head(tower(i)) (ablation: two stages without KT)")
    kt_weight: float = Field(1.0, ge=0.0, description="weight of the tuning loss (KT or BPR)")
    refresh_every: int = Field(1, ge=1, description="re-encode all items every k epochs "
                                                     "(validation in between uses the last ones)")
    refresh_at_start: bool = Field(True, description="re-encode before the first epoch; False: "
                                   "the first epoch trains on the stage-1 (frozen) features")
    tuning_learning_rate: float | None = Field(None, gt=0, description="Adam lr of what the tuning "
                                               "loss trains (tuned tower parameters, content "
                                               "heads); None = learning_rate (the backbone's)")
    cpu_bf16: bool = Field(False, description="bf16 autocast on CPU as well (CUDA always uses it); "
                           "about 2x faster encoding on CPUs with AVX512-BF16/AMX")
    encode_batch_size: int = Field(64, ge=1)
    tower_dropout: bool = Field(False, description="keep the towers' own dropout active while "
                                "tuning (MiniLM/BERT: p 0.1). Off by default: the PEFT parameters "
                                "still train, but the frozen base runs in eval mode, so the "
                                "tuning loss sees the same features the backbone and the export "
                                "get (on ml100k, MiniLM's dropout alone doubles the KT loss of "
                                "the stage-1 heads, 0.12 -> 0.25); open_clip towers have none")
    resume_optimizer: bool = Field(True, description="start the backbone's Adam from the stage-1 "
                                   "run's moments (checkpoint.pt, its last epoch) instead of "
                                   "zeros: a fresh Adam's first steps, about lr per coordinate, "
                                   "knock a converged backbone off its optimum")
    keep_start: bool = Field(True, description="keep the loaded stage-1 state (validated before "
                             "the first epoch) as the epoch-(-1) candidate of test-at-best-valid, "
                             "so stage 2 never returns a model worse on validation than it started "
                             "from; only when stage 1 trained content heads (else the kept state "
                             "would have no cold-start encoder). False: only stage-2 epochs compete")

    recalibrate: bool = Field(True, description="when the stage-1 config calibrates its heads "
                              "(heads.calibrate), calibrate them again after stage 2 on the best "
                              "state's tuned features (KT tuning alone serves cold items worse)")
    groups: int = Field(1, ge=1, description="PerPEFT: user groups (k-means on the stage-1 user "
                        "embeddings), each with its own PEFT parameters and content heads and "
                        "its own item vectors (exported as G concatenated blocks); 1 = PTMRec")
    group_negatives: bool = Field(True, description="PerPEFT: a group's negatives come from the "
                                  "items its own users trained on (else from every training item)")
    init_from: Path | None = Field(None, description="PerPEFT: a finished single-set stage-2 run "
                                   "of the same stage-1 run and method (the global tuning); its "
                                   "backbone, heads and tuned towers start every group, as "
                                   "PerPEFT's per-group adapters start from its global one")

    @model_validator(mode="after")
    def _groups_need_stage1(self) -> "Stage2Config":
        if self.groups > 1 and not self.from_stage1:
            raise ValueError("groups > 1 needs from_stage1: true (users are grouped by their "
                             "stage-1 embeddings)")
        if self.init_from is not None and not self.from_stage1:
            raise ValueError("init_from needs from_stage1: true")
        return self

    @model_validator(mode="after")
    def _lora_dropout_needs_train_mode(self) -> "Stage2Config":
        if getattr(self.method, "dropout", 0.0) and not self.tower_dropout:
            raise ValueError("method.dropout > 0 needs tower_dropout: true (with the towers in "
                             "eval mode, LoRA's own dropout would be inactive too)")
        return self


def load_stage2(path: Path | None, overrides: list[str] | None = None) -> Stage2Config:
    """Read a stage-2 YAML (optional: the defaults are prompts, n_ctx 2, depth 9), apply `a.b=c`
    overrides and validate it."""
    return Stage2Config.model_validate(load_raw(path, overrides))
