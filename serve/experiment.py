"""Run online experiments: start, read out, promote the winner, stop.

    python -m serve.experiment start   --bundles DIR --config exp.yaml [--replace] [--wait H:P]
    python -m serve.experiment status  --bundles DIR [--state DIR | --store URL] [--name N] [--json]
    python -m serve.experiment promote ARM --bundles DIR [--wait H:P]
    python -m serve.experiment stop    --bundles DIR [--wait H:P]

`start` validates the YAML (serve.experiment_config.ExperimentConfig), verifies every arm's
bundle (every sha256, `check_contents`) and that the bundles not already live fit in memory,
then writes BUNDLES/EXPERIMENT; the servers take it up within `--poll-seconds` (each checks the
bundles and the memory again and refuses the experiment, serving on, if they fail there).
`promote ARM` publishes that arm's bundle as CURRENT (index.bundle.publish with verification)
and ends the experiment, so every user gets it; `stop` ends the experiment and everyone gets
CURRENT again. `--wait` blocks until the server at HOST:PORT reports the change (GetModelInfo).
Exit codes: 0 done, 1 refused (bad config, bundle or memory; nothing changed), 2 bad arguments.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from index.bundle import BundleError, check_contents, current_version, load_bundle, publish
from index.events import StoreError, open_store
from serve.arms import read_manifest
from serve.experiment_config import (ExperimentConfig, ExperimentError, check_memory, end_live,
                                     load_config, read_history, read_live, write_live)
from serve.readout import readout, table


def verify_arms(bundles_dir: Path, cfg: ExperimentConfig) -> None:
    """Every arm's bundle exists, verifies and fits in memory (ExperimentError otherwise)."""
    live = current_version(bundles_dir)
    for arm in cfg.arms:
        path = bundles_dir / arm.bundle
        if not path.is_dir():
            raise ExperimentError(f"arms.{arm.name}.bundle: {arm.bundle} is not in {bundles_dir}")
        try:
            check_contents(load_bundle(path))
        except BundleError as err:
            raise ExperimentError(f"arms.{arm.name}.bundle: {arm.bundle} is refused: {err}") \
                from err
    extra = {a.bundle for a in cfg.arms if a.bundle != live}
    check_memory(cfg, {n: read_manifest(bundles_dir / n) for n in sorted(extra)})


def wait_for(target: str, done, timeout: float = 120.0) -> None:
    """Poll GetModelInfo at target until done(info) holds (TimeoutError after timeout)."""
    from serve.client import RecommenderClient

    deadline = time.monotonic() + timeout
    with RecommenderClient(target) as client:
        while time.monotonic() < deadline:
            try:
                if done(client.info()):
                    return
            except Exception:  # noqa: BLE001 - not serving yet
                pass
            time.sleep(0.2)
    raise TimeoutError(f"{target} did not report the change within {timeout:.0f} s")


def cmd_start(args) -> int:
    """Validate, verify, write EXPERIMENT."""
    cfg = load_config(args.config)
    live = read_live(args.bundles)
    if live is not None and live.name != cfg.name and not args.replace:
        raise ExperimentError(f"experiment {live.name} is running; stop it or pass --replace")
    verify_arms(args.bundles, cfg)
    write_live(args.bundles, cfg)
    print(f"experiment {cfg.name} written to {args.bundles / 'EXPERIMENT'}: " + ", ".join(
        f"{a.name}={a.bundle} {a.share:.0%}" for a in cfg.arms))
    if args.wait:
        wait_for(args.wait, lambda info: info.experiment == cfg.name and set(
            info.arm_versions) == {a.name for a in cfg.arms})
        print(f"{args.wait} serves experiment {cfg.name}")
    return 0


def _clean(value):
    """NaN as null and tuples as lists, for JSON."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def cmd_status(args) -> int:
    """Print the readout of the live (or a named) experiment."""
    cfg = read_history(args.bundles, args.name) if args.name else read_live(args.bundles)
    if cfg is None:
        print("no experiment is running (name a stopped one with --name)")
        return 0
    store = open_store(args.store or args.state or args.bundles / ".state")
    try:
        result = readout(store, cfg)
    finally:
        store.close()
    live = read_live(args.bundles)
    result["running"] = live is not None and live.name == cfg.name
    if args.json:
        print(json.dumps(_clean(result), indent=2))
    else:
        print(f"experiment {cfg.name} ({'running' if result['running'] else 'stopped'}), "
              f"attribution window {cfg.attribution.window_seconds:g} s\n")
        print(table(result))
    return 0


def cmd_promote(args) -> int:
    """Publish the arm's bundle as CURRENT, then end the experiment."""
    cfg = read_live(args.bundles)
    if cfg is None:
        raise ExperimentError("no experiment is running")
    arm = cfg.arm(args.arm)
    publish(args.bundles, arm.bundle, verify=True)
    end_live(args.bundles)
    print(f"published {arm.bundle} (arm {arm.name}) as CURRENT; experiment {cfg.name} ended")
    if args.wait:
        version = int(arm.bundle[1:])
        wait_for(args.wait, lambda info: not info.experiment and info.model_version == version)
        print(f"{args.wait} serves {arm.bundle} to everyone")
    return 0


def cmd_stop(args) -> int:
    """End the experiment: everyone gets CURRENT."""
    cfg = end_live(args.bundles)
    print("no experiment was running" if cfg is None else
          f"experiment {cfg.name} ended; everyone gets {current_version(args.bundles)}")
    if args.wait and cfg is not None:
        wait_for(args.wait, lambda info: not info.experiment)
        print(f"{args.wait} ended experiment {cfg.name}")
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(prog="python -m serve.experiment",
                                description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    start = sub.add_parser("start", help="validate a config and start the experiment")
    start.add_argument("--config", type=Path, required=True, help="experiment YAML")
    start.add_argument("--replace", action="store_true", help="replace a running experiment")
    status = sub.add_parser("status", help="readout per arm")
    status.add_argument("--state", type=Path, help="SQLite store folder (default BUNDLES/.state)")
    status.add_argument("--store", help="postgresql://... event store")
    status.add_argument("--name", help="a stopped experiment")
    status.add_argument("--json", action="store_true")
    promote = sub.add_parser("promote", help="publish an arm's bundle and end the experiment")
    promote.add_argument("arm")
    stop = sub.add_parser("stop", help="end the experiment")
    for cmd in (start, status, promote, stop):
        cmd.add_argument("--bundles", type=Path, required=True, help="bundles directory")
    for cmd in (start, promote, stop):
        cmd.add_argument("--wait", metavar="HOST:PORT", help="wait until this server reports it")
    return p.parse_args(argv)


COMMANDS = {"start": cmd_start, "status": cmd_status, "promote": cmd_promote, "stop": cmd_stop}


def main(argv: list[str] | None = None) -> int:
    """Run one command; refusals print `error: ...` and exit 1."""
    args = parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (ExperimentError, BundleError, StoreError, TimeoutError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
