"""Experiment arms in the server: each arm's model, the router that picks one per user, and the
watcher that takes up, changes and ends the experiment named by BUNDLES/EXPERIMENT.

Every arm serves its own bundle version, loaded like the live one (`build`: sha256-verified,
`check_contents`, smoke query) and replayed from the event store (`ModelHolder.swap`); an arm
whose version is the one CURRENT names shares the live model instead of loading it twice. The
arms' holders are the live holder's `followers`: an acknowledged write is applied to each of them
before the call answers (upserts encoded by each arm's own encoder), and the poller catches them
up with other processes' writes. A bundle that fails any step, or an experiment whose bundles do
not fit in memory (serve.experiment_config.check_memory), is refused, counted in
`recsys_experiment_loads_total{result="failure"}` and logged; serving goes on exactly as before
(no experiment, or the previous one). The router holds one reference to the live experiment,
replaced whole, so a request sees one experiment from start to end and none fails in a change.
If CURRENT moves on while an arm shares the live model, the arm keeps that model (the version it
names) and the watcher gives it its own holder at the next poll.
"""
from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from index.events import SQLStore
from index.events.impressions import Impression
from index.manifest import Manifest
from serve.experiment_config import (Arm, ExperimentConfig, ExperimentError, assign,
                                     check_memory, read_live, sampled)
from serve.impressions import ImpressionWriter
from serve.metrics import Metrics
from serve.model import ServingModel
from serve.polling import PollLoop
from serve.reload import ModelHolder

log = logging.getLogger(__name__)


class ArmHolder(ModelHolder):
    """An arm's model on the shared store; its gauges are not the server's."""

    def _report(self, model: ServingModel) -> None:
        """No gauges: the server's describe the live bundle."""


@dataclass
class LiveArm:
    """One arm: its holder, and the live model it shares (None when it has its own)."""

    spec: Arm
    holder: ModelHolder
    pinned: ServingModel | None = None

    def require(self) -> ServingModel:
        """The arm's model: the shared live model only while it is still the pinned version."""
        if self.pinned is not None and self.holder.model is not self.pinned:
            return self.pinned
        return self.holder.require()

    @property
    def version(self) -> int:
        """Bundle version the arm serves."""
        return self.require().version


@dataclass
class LiveExperiment:
    """A running experiment: its config, arms and impression log."""

    cfg: ExperimentConfig
    arms: dict[str, LiveArm]
    writer: ImpressionWriter | None = None
    started: float = field(default_factory=time.time)

    def own_holders(self) -> tuple[ModelHolder, ...]:
        """Holders that belong to the experiment (not the live one)."""
        return tuple(a.holder for a in self.arms.values() if a.pinned is None)


@dataclass(frozen=True)
class Pick:
    """What answers one request: the model, its arm ("" outside an experiment)."""

    model: ServingModel
    arm: str = ""
    live: LiveExperiment | None = None


class Router:
    """Picks the model of a user's arm and logs what it showed."""

    def __init__(self, holder: ModelHolder):
        self.holder = holder
        self.live: LiveExperiment | None = None

    def pick(self, user_id: int) -> Pick:
        """The model answering this user now."""
        return self.snapshot()(user_id)

    def snapshot(self) -> Callable[[int], Pick]:
        """pick() over one experiment snapshot (RecommendBatch: one snapshot per batch)."""
        live = self.live
        if live is None:
            model = self.holder.require()
            return lambda _user: Pick(model)

        def pick(user_id: int) -> Pick:
            arm = assign(live.cfg, user_id).name
            return Pick(live.arms[arm].require(), arm, live)
        return pick

    @staticmethod
    def shown(pick: Pick, user_id: int, response) -> None:
        """Stamp the arm and an impression id on a response and queue the impression."""
        if pick.live is None:
            return
        impression_id = uuid.uuid4().hex
        response.arm, response.impression_id = pick.arm, impression_id
        if pick.live.writer is not None and sampled(pick.live.cfg, user_id):
            pick.live.writer.offer(Impression(
                impression_id, pick.live.cfg.name, pick.arm, user_id, pick.model.version,
                time.time(), [i.item_id for i in response.items]))

    def info(self) -> dict:
        """The live experiment and its arms' versions, for GetModelInfo."""
        live = self.live
        if live is None:
            return {}
        return {"experiment": live.cfg.name,
                "arm_versions": {n: a.version for n, a in live.arms.items()}}


def read_manifest(path: Path) -> Manifest:
    """A bundle's manifest (ExperimentError when it is missing or invalid)."""
    try:
        return Manifest.model_validate_json((path / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ExperimentError(f"bundle {path.name}: no valid manifest.json ({err})") from err


class ExperimentWatcher(PollLoop):
    """Polls BUNDLES/EXPERIMENT and makes the router serve what it names."""

    def __init__(self, bundles_dir: Path, holder: ModelHolder, router: Router,
                 build: Callable[[Path], ServingModel], metrics: Metrics,
                 impression_store: SQLStore, poll_seconds: float = 2.0,
                 retry_seconds: float = 60.0):
        super().__init__("experiment-watcher", poll_seconds)
        self.bundles_dir, self.holder, self.router = Path(bundles_dir), holder, router
        self.build, self.metrics, self.store = build, metrics, impression_store
        self.retry_seconds = retry_seconds
        self._refused: tuple[ExperimentConfig | str, float] | None = None
        self._lock = threading.Lock()  # one take-up at a time (poll thread, bundle swaps)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop polling and flush the impression log."""
        super().stop(timeout)
        live = self.router.live
        if live is not None and live.writer is not None:
            live.writer.stop()

    def check(self) -> bool:
        """Take up, change or end the experiment; returns whether the router changed."""
        with self._lock:
            return self._check()

    def _check(self) -> bool:
        """check() with the lock held."""
        if self.holder.model is None:
            return False  # the live bundle first: an arm may share it
        try:
            cfg = read_live(self.bundles_dir)
        except (ExperimentError, ValueError) as err:
            return self._fail("EXPERIMENT", err)
        live = self.router.live
        if cfg is None:
            if live is not None:
                self._install(None)
                log.info("experiment %s ended; serving bundle %s to everyone", live.cfg.name,
                         self.holder.name)
                return True
            return False
        if live is not None and live.cfg == cfg:
            return self._rehome(live)
        if self._refused and self._refused[0] == cfg and (
                time.monotonic() - self._refused[1] < self.retry_seconds):
            return False
        try:
            new = self._take_up(cfg, live)
        except Exception as err:  # noqa: BLE001 - refuse the experiment, keep serving
            return self._fail(cfg, err)
        self._install(new)
        self.metrics.experiment_loads.labels(result="success").inc()
        log.info("experiment %s live: %s", cfg.name, ", ".join(
            f"{a.name}={a.bundle} ({a.share:.0%})" for a in cfg.arms))
        return True

    def _take_up(self, cfg: ExperimentConfig, live: LiveExperiment | None) -> LiveExperiment:
        """Arms for cfg: kept from the running experiment, shared with the live bundle, or
        loaded (after the memory check)."""
        kept = {a.spec.bundle: a for a in (live.arms.values() if live else ())}
        with self.holder.mutation_lock:  # the live bundle's name and model, consistently
            live_name, live_model = self.holder.name, self.holder.model
        to_load = {a.bundle for a in cfg.arms if a.bundle not in kept and a.bundle != live_name}
        for name in to_load:
            if not (self.bundles_dir / name).is_dir():
                raise ExperimentError(f"bundle {name} is not in {self.bundles_dir}")
        check_memory(cfg, {n: read_manifest(self.bundles_dir / n) for n in sorted(to_load)})
        loaded = {}
        for name in sorted(to_load):
            model = self.build(self.bundles_dir / name)
            model.smoke()
            holder = ArmHolder(self.holder.store, Metrics())
            holder.swap(model, name)
            loaded[name] = holder
        arms = {}
        for spec in cfg.arms:
            if spec.bundle in loaded:
                arms[spec.name] = LiveArm(spec, loaded[spec.bundle])
            elif spec.bundle in kept:
                old = kept[spec.bundle]
                arms[spec.name] = LiveArm(spec, old.holder, old.pinned)
            else:  # the live bundle's version: pinned, so a swap meanwhile cannot change it
                arms[spec.name] = LiveArm(spec, self.holder, live_model)
        same_log = live is not None and live.cfg.name == cfg.name and (
            live.cfg.impressions == cfg.impressions)
        writer = live.writer if same_log else ImpressionWriter(self.store, self.metrics,
                                                               cfg.impressions)
        if not same_log:
            writer.start()
        return LiveExperiment(cfg, arms, writer, live.started if same_log else time.time())

    def _rehome(self, live: LiveExperiment) -> bool:
        """Give an arm whose shared model is no longer the live one a holder of its own."""
        moved = [a for a in live.arms.values()
                 if a.pinned is not None and self.holder.model is not a.pinned]
        if not moved:
            return False
        arms = dict(live.arms)
        for name, arm in live.arms.items():
            if arm in moved:
                holder = ArmHolder(self.holder.store, Metrics())
                holder.model, holder.name = arm.pinned, arm.spec.bundle
                arms[name] = LiveArm(arm.spec, holder)
        self._install(LiveExperiment(live.cfg, arms, live.writer, live.started))
        return True

    def _install(self, new: LiveExperiment | None) -> None:
        """Make `new` the router's experiment; catch its arms up; retire the old log."""
        old = self.router.live
        followers = new.own_holders() if new else ()
        self.holder.followers = followers
        for follower in followers:
            follower.catch_up()
        self.router.live = new
        self.metrics.arms(new.cfg.name if new else None,
                          {n: a.version for n, a in new.arms.items()} if new else {})
        if old is not None and old.writer is not None and (new is None or
                                                           new.writer is not old.writer):
            old.writer.stop()

    def _fail(self, what: ExperimentConfig | str, err: Exception) -> bool:
        """Count and log a refused experiment once per retry period."""
        now = time.monotonic()
        if self._refused is None or self._refused[0] != what or (
                now - self._refused[1] >= self.retry_seconds):
            self.metrics.experiment_loads.labels(result="failure").inc()
            name = what.name if isinstance(what, ExperimentConfig) else what
            live = self.router.live
            log.error("refused experiment %s: %s: %s (still serving %s)", name,
                      type(err).__name__, err,
                      f"experiment {live.cfg.name}" if live else f"bundle {self.holder.name}")
            self._refused = (what, now)
        return False
