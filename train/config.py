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
    """Full-ranking evaluation and early stopping.

    protocol `patient` (the default): never stop before `min_epochs` epochs; after that, stop once
    more than max(`patient_patience`, `patience_ratio` x best epoch) validations in a row did not
    improve `valid_metric` (strictly, or by more than `min_delta` of the best; 0 by default).
    `mmrec` (MMRec's rule, exact for peer comparisons): stop once more than `patience`
    validations in a row did not strictly improve it, from epoch 0. The default was chosen on 5
    seeds of 5 models (docs/training.md#evaluation-protocol). Neither looks at test: test is only
    evaluated at each new best validation epoch."""

    ks: list[int] = [10, 20, 50]
    valid_metric: str = Field("recall@20", pattern=METRIC_PATTERN)
    protocol: Literal["mmrec", "patient"] = "patient"
    patience: int = Field(20, ge=0, description="mmrec: validations without strict improvement "
                          "before stopping (MMRec's 20)")
    min_epochs: int = Field(50, ge=0, description="patient: never stop before this many epochs")
    patient_patience: int = Field(30, ge=0, description="patient: validations without strict "
                                  "improvement tolerated once min_epochs have passed")
    patience_ratio: float = Field(0.0, ge=0.0, description="patient: tolerate at least this "
                                  "share of the best epoch (0.5 trains far longer; see the docs)")
    min_delta: float = Field(0.0, ge=0.0, description="patient: a new best must beat the old one "
                             "by this share of it (0.01 = 1%); mmrec: always 0")
    batch_size: int = Field(4096, ge=1)

    def patience_at(self, best_epoch: int) -> int:
        """Validations without improvement tolerated when the best epoch so far is `best_epoch`."""
        if self.protocol == "mmrec":
            return self.patience
        return max(self.patient_patience, int(self.patience_ratio * max(best_epoch, 0)))

    def improves(self, score: float, best: float) -> bool:
        """Whether a validation `score` is a new best over `best` under this protocol."""
        if self.protocol == "patient" and self.min_delta and best > 0:
            return score > best * (1.0 + self.min_delta)
        return score > best

    def stops(self, epoch: int, best_epoch: int, bad_evals: int) -> bool:
        """Whether training stops before `epoch` (0-based) under this protocol."""
        if self.protocol == "patient" and epoch < self.min_epochs:
            return False
        return bad_evals > self.patience_at(best_epoch)

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


class KTConfig(Strict):
    """The tuning loss of stage 2 (PTMRec's knowledge transfer, or BPR for the ablation)."""

    loss: Literal["kt", "bpr"] = Field(
        "kt", description="what trains the towers and heads: KL knowledge transfer (PTMRec) or "
                          "BPR on u · head(tower(i)) (ablation: two stages without KT)")
    weight: float = Field(1.0, ge=0.0, description="weight of the tuning loss (KT or BPR)")
    batch_size: int = Field(128, ge=2, description="pairs of each batch the tuning loss sees")
    steps_per_epoch: int | None = Field(None, ge=1, description="cap on tuning steps (CPU runs)")


class Stage2Optim(Strict):
    """Stage 2's Adam and early stopping."""

    epochs: int = Field(50, ge=1)
    patience: int = Field(10, ge=0)
    learning_rate: float = 1e-3
    tuning_learning_rate: float | None = Field(None, gt=0, description="Adam lr of what the tuning "
                                               "loss trains (tuned tower parameters, content "
                                               "heads); None = learning_rate (the backbone's)")
    grad_accumulation: int = Field(1, ge=1)
    resume_optimizer: bool = Field(True, description="start the backbone's Adam from the stage-1 "
                                   "run's moments (checkpoint.pt, its last epoch) instead of "
                                   "zeros: a fresh Adam's first steps, about lr per coordinate, "
                                   "knock a converged backbone off its optimum")


class EncodeConfig(Strict):
    """How the tuned towers encode the items."""

    batch_size: int = Field(64, ge=1)
    refresh_every: int = Field(1, ge=1, description="re-encode all items every k epochs "
                                                     "(validation in between uses the last ones)")
    refresh_at_start: bool = Field(True, description="re-encode before the first epoch; False: "
                                   "the first epoch trains on the stage-1 (frozen) features")
    cpu_bf16: bool = Field(False, description="bf16 autocast on CPU as well (CUDA always uses it); "
                           "about 2x faster encoding on CPUs with AVX512-BF16/AMX")
    tower_dropout: bool = Field(False, description="keep the towers' own dropout active while "
                                "tuning (MiniLM/BERT: p 0.1). Off by default: the PEFT parameters "
                                "still train, but the frozen base runs in eval mode, so the "
                                "tuning loss sees the same features the backbone and the export "
                                "get (on ml100k, MiniLM's dropout alone doubles the KT loss of "
                                "the stage-1 heads, 0.12 -> 0.25); open_clip towers have none")


class StartConfig(Strict):
    """Where stage 2 starts from and what it keeps."""

    from_stage1: bool = True
    keep_start: bool = Field(True, description="keep the loaded stage-1 state (validated before "
                             "the first epoch) as the epoch-(-1) candidate of test-at-best-valid, "
                             "so stage 2 never returns a model worse on validation than it started "
                             "from; only when stage 1 trained content heads (else the kept state "
                             "would have no cold-start encoder). False: only stage-2 epochs compete")
    recalibrate: bool = Field(True, description="when the stage-1 config calibrates its heads "
                              "(heads.calibrate), calibrate them again after stage 2 on the best "
                              "state's tuned features (KT tuning alone serves cold items worse)")
    init_from: Path | None = Field(None, description="PerPEFT: a finished single-set stage-2 run "
                                   "of the same stage-1 run and method (the global tuning); its "
                                   "backbone, heads and tuned towers start every group, as "
                                   "PerPEFT's per-group adapters start from its global one")


class PerPEFTConfig(Strict):
    """PerPEFT: one set of PEFT parameters and content heads per user group."""

    groups: int = Field(1, ge=1, description="user groups (k-means on the stage-1 user "
                        "embeddings), each with its own PEFT parameters and content heads and "
                        "its own item vectors (exported as G concatenated blocks); 1 = PTMRec")
    group_negatives: bool = Field(True, description="a group's negatives come from the items its "
                                  "own users trained on (else from every training item)")


# the flat keys of earlier stage-2 YAMLs (and `--set epochs=2`): key -> (group, field)
_FLAT_KEYS = {
    "tuning_loss": ("kt", "loss"), "kt_weight": ("kt", "weight"),
    "kt_batch_size": ("kt", "batch_size"), "kt_steps_per_epoch": ("kt", "steps_per_epoch"),
    **{k: ("optim", k) for k in ("epochs", "patience", "learning_rate", "tuning_learning_rate",
                                 "grad_accumulation", "resume_optimizer")},
    "encode_batch_size": ("encode", "batch_size"),
    **{k: ("encode", k) for k in ("refresh_every", "refresh_at_start", "cpu_bf16",
                                  "tower_dropout")},
    **{k: ("start", k) for k in ("from_stage1", "keep_start", "recalibrate", "init_from")},
    **{k: ("perpeft", k) for k in ("groups", "group_negatives")},
}


class Stage2Config(Strict):
    """Knowledge-guided encoder tuning on top of a stage-1 run (root of `python -m train.stage2`)."""

    method: PeftMethodConfig = Field(default_factory=PromptConfig)
    modalities: list[Literal["image", "text"]] = ["image", "text"]
    kt: KTConfig = Field(default_factory=KTConfig)
    optim: Stage2Optim = Field(default_factory=Stage2Optim)
    encode: EncodeConfig = Field(default_factory=EncodeConfig)
    start: StartConfig = Field(default_factory=StartConfig)
    perpeft: PerPEFTConfig = Field(default_factory=PerPEFTConfig)

    @model_validator(mode="before")
    @classmethod
    def _group_flat_keys(cls, raw: Any) -> Any:
        """Flat keys (`epochs: 2`, `kt_batch_size: 64`) go into their group; they win over the
        group's own spelling of the same field."""
        if not isinstance(raw, dict) or not _FLAT_KEYS.keys() & raw.keys():
            return raw
        out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()
               if k not in _FLAT_KEYS}
        for key, (group, name) in _FLAT_KEYS.items():
            if key in raw:
                target = out.setdefault(group, {})
                if not isinstance(target, dict):
                    raise ValueError(f"{group} must be a mapping")
                target[name] = raw[key]
        return out

    @model_validator(mode="after")
    def _groups_need_stage1(self) -> "Stage2Config":
        if self.perpeft.groups > 1 and not self.start.from_stage1:
            raise ValueError("perpeft.groups > 1 needs start.from_stage1: true (users are grouped "
                             "by their stage-1 embeddings)")
        if self.start.init_from is not None and not self.start.from_stage1:
            raise ValueError("start.init_from needs start.from_stage1: true")
        return self

    @model_validator(mode="after")
    def _lora_dropout_needs_train_mode(self) -> "Stage2Config":
        if getattr(self.method, "dropout", 0.0) and not self.encode.tower_dropout:
            raise ValueError("method.dropout > 0 needs encode.tower_dropout: true (with the towers "
                             "in eval mode, LoRA's own dropout would be inactive too)")
        return self


def load_stage2(path: Path | None, overrides: list[str] | None = None) -> Stage2Config:
    """Read a stage-2 YAML (optional: the defaults are prompts, n_ctx 2, depth 9), apply `a.b=c`
    overrides and validate it."""
    return Stage2Config.model_validate(load_raw(path, overrides))
