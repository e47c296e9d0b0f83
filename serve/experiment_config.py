"""An online experiment's configuration, its arm assignment, its file and its memory estimate.

An experiment names two to `MAX_ARMS` arms, each a published bundle version with a share of the
users; the first arm is the control. A user's arm is a pure function of (salt, user id):
sha256("SALT:USER") read as a 64-bit number in [0, 1) and placed on the arms' cumulative shares,
so every process, restart and reload puts a user in the same arm, with no state to share. A user
in `overrides` gets the arm named there instead (debugging, QA accounts). Unknown users (not in
any bundle) are assigned the same way. A new salt reshuffles everyone; keep it for the
experiment's lifetime.

The live experiment is the file BUNDLES/EXPERIMENT (JSON of `ExperimentConfig`, replaced
atomically), written by `python -m serve.experiment start` and removed by `stop` / `promote`;
every server polling BUNDLES picks it up within `--poll-seconds`. Stopped experiments are kept
under BUNDLES/.experiments/NAME.json so their readout can still be read.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from index.atomic import write_text
from index.manifest import Manifest

MAX_ARMS = 4
EXPERIMENT_FILE = "EXPERIMENT"
HISTORY_DIR = ".experiments"
NO_ARM = "none"                       # metric label of calls outside an experiment
MIXED_ARM = "mixed"                   # metric label of a RecommendBatch over several arms
NAME_RE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
SALT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{3,63}$")
VERSION_RE = re.compile(r"^v[1-9][0-9]*$")
ONNX_FACTOR = 2.0                      # onnxruntime holds about twice the model file in memory
BASE_BYTES = 64 * 2 ** 20              # per-bundle overhead: sessions, id maps, Python objects


class ExperimentError(ValueError):
    """An experiment that cannot run; the message names the field or the bundle."""


class Arm(BaseModel):
    """One arm: a name, the bundle version it serves and its share of the users."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="lowercase letters, digits, _ and -; not 'none' or 'mixed'")
    bundle: str = Field(description="a version directory of BUNDLES, e.g. v7")
    share: float = Field(gt=0, le=1)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not NAME_RE.match(value) or value in (NO_ARM, MIXED_ARM):
            raise ValueError(f"arm name {value!r} must match {NAME_RE.pattern} and not be "
                             f"{NO_ARM!r} or {MIXED_ARM!r}")
        return value

    @field_validator("bundle")
    @classmethod
    def _bundle(cls, value: str) -> str:
        if not VERSION_RE.match(value):
            raise ValueError(f"bundle {value!r} must be a version directory name such as v3")
        return value


class Impressions(BaseModel):
    """Which impressions are written to the event store, and how they are batched."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sample_rate: float = Field(1.0, ge=0, le=1, description="share of users whose impressions "
                               "are logged (by hash, so a user is logged always or never)")
    flush_seconds: float = Field(1.0, gt=0, le=60, description="longest wait before a batch "
                                 "is written (also what a crash can lose)")
    batch: int = Field(500, ge=1, le=10_000, description="rows per write")
    queue: int = Field(100_000, ge=1, description="impressions held in memory at most; more "
                       "are dropped and counted, never block a request")


class Attribution(BaseModel):
    """Which interactions count as clicks of an impression."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    window_seconds: float = Field(1800.0, gt=0, description="an interaction within this long "
                                  "after an impression that showed the item is its click")
    actions: tuple[str, ...] = Field((), description="interaction kinds that count; empty: all")
    ks: tuple[int, ...] = Field((1, 5, 10), description="hit@K of the shown lists")

    @field_validator("ks")
    @classmethod
    def _ks(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if not value or any(k < 1 or k > 1000 for k in value):
            raise ValueError("ks must be 1..1000")
        return tuple(sorted(set(value)))


class ExperimentConfig(BaseModel):
    """An experiment: arms (the first is the control), salt, overrides, logging, attribution."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    salt: str = Field(description="4-64 characters of A-Z a-z 0-9 . _ -; fixes the split")
    arms: tuple[Arm, ...]
    overrides: dict[int, str] = Field(default_factory=dict, description="user id -> arm name")
    impressions: Impressions = Field(default_factory=Impressions)
    attribution: Attribution = Field(default_factory=Attribution)
    memory_limit_mib: float | None = Field(None, gt=0, description="memory the bundles may use; "
                                           "None: what the machine (or cgroup) has available")

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not NAME_RE.match(value):
            raise ValueError(f"experiment name {value!r} must match {NAME_RE.pattern}")
        return value

    @field_validator("salt")
    @classmethod
    def _salt(cls, value: str) -> str:
        if not SALT_RE.match(value):
            raise ValueError(f"salt {value!r} must match {SALT_RE.pattern}")
        return value

    @model_validator(mode="after")
    def _arms(self) -> ExperimentConfig:
        names = [a.name for a in self.arms]
        if not 2 <= len(names) <= MAX_ARMS:
            raise ValueError(f"arms: {len(names)} given, an experiment has 2..{MAX_ARMS}")
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"arms: duplicate arm names {dup}")
        total = sum(a.share for a in self.arms)
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"arms: shares sum to {total:.6g}, not 1")
        bad = {u: a for u, a in self.overrides.items() if a not in names or u < 0}
        if bad:
            raise ValueError(f"overrides: unknown arms or negative user ids {bad}; arms are "
                             f"{names}")
        return self

    @property
    def control(self) -> Arm:
        """The first arm."""
        return self.arms[0]

    def arm(self, name: str) -> Arm:
        """The arm of that name (ExperimentError when there is none)."""
        for arm in self.arms:
            if arm.name == name:
                return arm
        raise ExperimentError(f"experiment {self.name} has no arm {name!r} (arms: "
                              f"{[a.name for a in self.arms]})")


def unit_hash(salt: str, user_id: int, purpose: str = "") -> float:
    """A user's deterministic position in [0, 1) for this salt (and purpose)."""
    digest = hashlib.sha256(f"{salt}:{purpose}{int(user_id)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64


def assign(cfg: ExperimentConfig, user_id: int) -> Arm:
    """The arm a user is in: the override, else the hash placed on the cumulative shares."""
    name = cfg.overrides.get(int(user_id))
    if name is not None:
        return cfg.arm(name)
    u, edge = unit_hash(cfg.salt, user_id), 0.0
    for arm in cfg.arms:
        edge += arm.share
        if u < edge:
            return arm
    return cfg.arms[-1]


def sampled(cfg: ExperimentConfig, user_id: int) -> bool:
    """Whether a user's impressions are logged (a second, independent hash)."""
    rate = cfg.impressions.sample_rate
    return rate >= 1.0 or unit_hash(cfg.salt, user_id, "impressions:") < rate


def _errors(err: ValidationError) -> str:
    """Pydantic's errors as 'field: message' lines."""
    parts = []
    for e in err.errors():
        where, msg = ".".join(str(p) for p in e["loc"]), e["msg"].removeprefix("Value error, ")
        parts.append(f"{where}: {msg}" if where else msg)
    return "; ".join(parts)


def parse_config(data: dict, source: str = "config") -> ExperimentConfig:
    """A validated config (ExperimentError naming each bad field)."""
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as err:
        raise ExperimentError(f"{source}: {_errors(err)}") from err


def load_config(path: str | Path) -> ExperimentConfig:
    """Read and validate a YAML (or JSON) experiment file."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        raise ExperimentError(f"{path}: {err}") from err
    if not isinstance(data, dict):
        raise ExperimentError(f"{path}: expected a mapping of experiment fields")
    return parse_config(data, str(path))


def experiment_path(bundles_dir: str | Path) -> Path:
    """BUNDLES/EXPERIMENT."""
    return Path(bundles_dir) / EXPERIMENT_FILE


def read_live(bundles_dir: str | Path) -> ExperimentConfig | None:
    """The live experiment of a bundles directory, or None."""
    path = experiment_path(bundles_dir)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    return parse_config(json.loads(text), str(path))


def write_live(bundles_dir: str | Path, cfg: ExperimentConfig) -> None:
    """Make `cfg` the live experiment (atomic replace) and keep a copy in the history."""
    text = cfg.model_dump_json(indent=2) + "\n"
    write_text(Path(bundles_dir) / HISTORY_DIR / f"{cfg.name}.json", text)
    write_text(experiment_path(bundles_dir), text)


def end_live(bundles_dir: str | Path) -> ExperimentConfig | None:
    """Remove the live experiment (its history copy stays); returns what was live."""
    cfg = read_live(bundles_dir)
    experiment_path(bundles_dir).unlink(missing_ok=True)
    return cfg


def read_history(bundles_dir: str | Path, name: str) -> ExperimentConfig:
    """A live or stopped experiment by name."""
    path = Path(bundles_dir) / HISTORY_DIR / f"{name}.json"
    if not path.exists():
        raise ExperimentError(f"no experiment {name!r} under {path.parent}")
    return parse_config(json.loads(path.read_text(encoding="utf-8")), str(path))


def bundle_bytes(manifest: Manifest) -> int:
    """Estimated resident bytes of a loaded bundle, from its manifest's file sizes."""
    total = BASE_BYTES
    for name, entry in manifest.files.items():
        total += int(entry.bytes * (ONNX_FACTOR if name.endswith(".onnx") else 1.0))
    return total


def available_bytes() -> int:
    """Memory this process may still take: MemAvailable, capped by a cgroup v2 limit."""
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
        if limit != "max":
            room = int(limit) - used
            avail = room if avail is None else min(avail, room)
    except (OSError, ValueError):
        pass
    return avail if avail is not None else os.sysconf("SC_PAGE_SIZE") * os.sysconf(
        "SC_AVPHYS_PAGES")


def check_memory(cfg: ExperimentConfig, manifests: dict[str, Manifest],
                 available: int | None = None) -> int:
    """Refuse (ExperimentError) bundles that do not fit; returns the estimated bytes.

    `manifests` holds the bundles to load (versions already in memory left out)."""
    need = {name: bundle_bytes(m) for name, m in manifests.items()}
    total = sum(need.values())
    limit = (int(cfg.memory_limit_mib * 2 ** 20) if cfg.memory_limit_mib is not None
             else available_bytes() if available is None else available)
    if total > limit:
        parts = ", ".join(f"{n} ~{b / 2 ** 20:.0f} MiB" for n, b in sorted(need.items()))
        raise ExperimentError(
            f"experiment {cfg.name}: its bundles need ~{total / 2 ** 20:.0f} MiB ({parts}) but "
            f"only {limit / 2 ** 20:.0f} MiB are available"
            f"{' (memory_limit_mib)' if cfg.memory_limit_mib is not None else ''}; stop another "
            f"process, give the server more memory or run fewer arms")
    return total
