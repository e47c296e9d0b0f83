"""The run directory: what training writes and the exporter, the retraining job and the
benchmarks read, the way `index.bundle` owns the bundle.

    RUN_DIR/
      config.yaml         the resolved TrainConfig (stage-1 and distillation runs)
      stage2.yaml         the Stage2Config (stage-2 runs, python -m train.stage2)
      stage1_config.yaml  a stage-2 run's copy of its stage-1 run's config
      distill.yaml        the DistillConfig (distillation runs, python -m train.distill)
      metrics.json        RunMetrics: figures at the best validation epoch
      best.pt             module state at the best validation epoch (what export loads)
      checkpoint.pt       resumable state of the last finished epoch (stage 1)
      plots/              curves.png (stage 1), tsne_kde.png (python -m train.plots)
      report.html         one page of all of it (python -m train.report)

`load_run` rebuilds any finished run at its best weights with the functions training used
(train.modules), so the exporter never re-implements training's construction.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict

from index.atomic import write_text
from train import checkpoint, perpeft
from train.backbones import Backbone, build_backbone
from train.config import Stage2Config, TrainConfig, load_config, load_stage2
from train.data import Dataset
from train.encoders.base import Tower
from train.heads import ContentHeads
from train.modules import (backbone_inputs, build_heads, build_towers, prepare_data,
                           tuned_features)

CONFIG = "config.yaml"
STAGE2 = "stage2.yaml"
STAGE1_CONFIG = "stage1_config.yaml"
DISTILL = "distill.yaml"
METRICS = "metrics.json"
BEST = "best.pt"
CHECKPOINT = "checkpoint.pt"
PLOTS = "plots"
CURVES = "curves.png"
TSNE = "tsne_kde.png"
REPORT = "report.html"


class RunMetrics(BaseModel):
    """metrics.json: validation and test figures at the best validation epoch, and what each kind
    of run adds (cold_start, heads_calibration, distill, stage 2's curves and parameter counts)."""

    model_config = ConfigDict(extra="allow")
    valid: dict[str, float]
    test: dict[str, float]
    best_epoch: int
    epochs_run: int


def write_metrics(run_dir: Path, metrics: dict) -> None:
    """Check metrics against RunMetrics and write them atomically as metrics.json."""
    RunMetrics.model_validate(metrics)
    write_text(run_dir / METRICS, json.dumps(metrics, indent=2))


def read_metrics(run_dir: Path) -> RunMetrics:
    """A finished run's metrics.json; FileNotFoundError naming the run when it has none."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics; is {run_dir} a finished run?")
    return RunMetrics.model_validate_json(path.read_text(encoding="utf-8"))


def is_stage2_run(run_dir: Path) -> bool:
    """A directory written by train.stage2 (it has stage2.yaml and no stage-1 config.yaml)."""
    return (run_dir / STAGE2).is_file() and not (run_dir / CONFIG).is_file()


def read_stage2(run_dir: Path, stage1_config: Path | None = None) -> tuple[TrainConfig,
                                                                          Stage2Config]:
    """(stage-1 config, stage-2 config) of a stage-2 run; `stage1_config` overrides the copy."""
    s2 = load_stage2(run_dir / STAGE2)
    path = stage1_config or run_dir / STAGE1_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{path}: a stage-2 run needs its stage-1 config (train.stage2 "
                                f"writes {STAGE1_CONFIG}); for an older run pass its stage-1 run "
                                "with --stage1-run STAGE1_RUN")
    cfg = load_config(path)
    if cfg.encoders is None:
        raise ValueError(f"{path}: a stage-2 run needs a stage-1 config with encoders")
    return cfg, s2


def read_configs(run_dir: Path, stage1_config: Path | None = None
                 ) -> tuple[TrainConfig, Stage2Config | None]:
    """(TrainConfig, Stage2Config or None) of any finished run."""
    if is_stage2_run(run_dir):
        return read_stage2(run_dir, stage1_config)
    return load_config(run_dir / CONFIG), None


def config_hash(cfg: TrainConfig, s2: Stage2Config | None) -> str:
    """The run's config hash: stage 1's own, or sha256 over both configs for a stage-2 run."""
    if s2 is None:
        return cfg.config_hash()
    blob = {"stage1": cfg.model_dump(mode="json"), "stage2": s2.model_dump(mode="json")}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


def pick_device(name: str) -> torch.device:
    """Resolve a configured device; 'auto' takes CUDA when present."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("config asks for device cuda but no CUDA device is available")
    return torch.device(name)


def run_device(run_dir: Path) -> torch.device:
    """The device a finished run's config asks for (`device:`; 'auto' when it has no config)."""
    for name in (CONFIG, STAGE1_CONFIG):
        if (run_dir / name).is_file():
            return pick_device(load_config(run_dir / name).device)
    return pick_device("auto")


@dataclass(frozen=True)
class Tuning:
    """The stage-2 method baked into a run's towers ("none" for a stage-1 run)."""

    method: str = "none"
    modalities: tuple[str, ...] = ()
    n_ctx: int = 0
    depth: int = 0

    def manifest_fields(self, exported) -> dict:
        """The EncoderSpec fields recording this tuning of the `exported` towers ({} if none)."""
        present = set(exported)
        modalities = [m for m in self.modalities if m in present]
        if self.method == "none" or not modalities:
            return {}
        return {"encoder_tuning": self.method, "tuned_modalities": modalities,
                "n_ctx": self.n_ctx, "prompt_depth": self.depth}


def tuning_of(s2: Stage2Config, towers: dict[str, Tower]) -> Tuning:
    """What a stage-2 config put into its towers (prompt depth as capped per tower)."""
    depth = n_ctx = 0
    if s2.method.name == "prompt":
        depth = max((t.token_hook.depth for t in towers.values() if t.token_hook is not None),
                    default=0)
        n_ctx = s2.method.n_ctx if depth else 0
    return Tuning(s2.method.name, tuple(sorted(towers)), n_ctx, depth)


@dataclass
class Run:
    """A finished run rebuilt at its best-validation weights."""

    path: Path
    cfg: TrainConfig
    full: Dataset            # every interaction and all item content
    train: Dataset           # the training view (cold items held out)
    model: Backbone
    heads: ContentHeads | None
    features: dict[str, torch.Tensor]  # tuned features for the modalities stage 2 tuned
    metrics: dict
    towers: dict[str, Tower] = field(default_factory=dict)  # stage-2 tuned towers, as trained
    tuning: Tuning = field(default_factory=Tuning)
    config_hash: str = ""
    groups: int = 1          # PerPEFT user groups: vectors are `groups` concatenated blocks


def load_run(run_dir: Path, device: torch.device = torch.device("cpu"),
             stage1_config: Path | None = None) -> Run:
    """Rebuild data, features, backbone and heads (and a stage-2 run's tuned towers) exactly as
    training did, then load best.pt; `stage1_config` stands in for a stage-2 run's copy."""
    cfg, s2 = read_configs(run_dir, stage1_config)
    data = prepare_data(cfg, device)
    inputs = backbone_inputs(data.train, device)
    model = build_backbone(cfg.backbone, inputs).to(device)
    heads = build_heads(cfg, s2, inputs.features, model, device)
    modules = torch.nn.ModuleDict({"backbone": model} | ({"heads": heads} if heads else {}))
    towers = build_towers(cfg.encoders, s2) if s2 is not None else {}
    if towers:  # registered as stage 2 saved them, so that best.pt loads into them
        modules["towers"] = torch.nn.ModuleDict({m: t.to(device) for m, t in towers.items()})
    groups = s2.perpeft.groups if s2 is not None else 1
    features = inputs.features
    if groups > 1:  # PerPEFT: the grouped modules as stage 2 saved them (assignment from best.pt)
        placeholder = torch.zeros(inputs.n_users, dtype=torch.long, device=device)
        model, heads, towers = perpeft.personalise(model, heads, towers, groups, placeholder)
        modules = torch.nn.ModuleDict({"backbone": model, "heads": heads,
                                       "towers": torch.nn.ModuleDict(towers)})
        features = perpeft.tile_features(features, groups)
    modules.load_state_dict(checkpoint.load(run_dir / BEST))
    modules.eval()
    if towers:
        raw = {"image": data.train.items.images, "text": data.train.items.texts}
        features = features | tuned_features(towers, raw, s2.encode.batch_size, device)
    metrics = (json.loads((run_dir / METRICS).read_text(encoding="utf-8"))
               if (run_dir / METRICS).is_file() else {})
    return Run(run_dir, cfg, data.full, data.train, model, heads, features, metrics, towers,
               tuning_of(s2, towers) if s2 else Tuning(), config_hash(cfg, s2), groups)
