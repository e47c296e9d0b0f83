"""Inspect and compact the event store.

    python -m serve.store show    --bundles DIR [--state DIR | --store postgresql://...]
    python -m serve.store compact --bundles DIR [--state DIR | --store URL] [--force]

`show` prints what the store holds (events per kind, users, interactions, disk use, compaction
mark) and how far the live bundle's watermark is behind it. `compact` deletes the events the live
bundle covers (id <= its `event_watermark`), keeping the newest upsert of any item the bundle
lacks (servers still replay those), records the compaction mark and the dataset that covers the
dropped events (RUN/data of the retraining that made the bundle, so the next retraining builds on
it), and returns the space to the disk. Without that dataset it refuses (exit 1) unless `--force`.
The store defaults to the server's: SQLite under BUNDLES/.state.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from index import bundle as files
from index.bundle import load_current
from index.events import open_store
from index.events.dataset import MARKER, dataset_watermark

log = logging.getLogger("serve.store")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(prog="python -m serve.store", description=__doc__.splitlines()[0])
    p.add_argument("command", choices=["show", "compact"])
    p.add_argument("--bundles", type=Path, required=True, help="directory holding CURRENT")
    p.add_argument("--state", type=Path, help="SQLite state folder (default BUNDLES/.state)")
    p.add_argument("--store", help="postgresql://... instead of SQLite")
    p.add_argument("--force", action="store_true",
                   help="compact even when no dataset covering the dropped events is found")
    return p.parse_args(argv)


def covering_dataset(source_run: str, watermark: int) -> Path | None:
    """RUN/data written by the retraining that produced a bundle, if it covers the watermark."""
    run = Path(source_run)
    for folder in (run, *list(run.parents)[:2]):
        candidate = folder / "data"
        if (candidate / MARKER).is_file() and dataset_watermark(candidate) >= watermark:
            return candidate
    return None


def show(store, bundles: Path) -> dict:
    """The store's stats plus the live bundle's watermark."""
    stats = store.stats()
    live = load_current(bundles)
    if live is not None:
        stats["live_bundle"] = {"version": live.version,
                                "event_watermark": live.manifest.event_watermark,
                                "events_after_watermark": max(
                                    0, stats["head"] - live.manifest.event_watermark)}
    return stats


def compact(store, bundles: Path, force: bool) -> int:
    """Drop what the live bundle covers; returns the exit code."""
    live = load_current(bundles)
    if live is None or live.manifest.event_watermark == 0:
        print("the live bundle covers no store events: nothing to compact")
        return 0
    watermark = live.manifest.event_watermark
    dataset = covering_dataset(live.manifest.source_run, watermark)
    if dataset is None and not force:
        log.error("no dataset covering events up to %d was found next to %s: the next "
                  "retraining could not rebuild them; refusing (use --force to drop them anyway)",
                  watermark, live.manifest.source_run)
        return 1
    dropped = store.compact(watermark, live.load_npy(files.ITEM_IDS))
    if dataset is not None:
        store.set_meta("base_dataset", str(dataset.resolve()))
    store.vacuum()
    print(f"dropped {dropped} events up to {watermark} (covered by bundle v{live.version}); "
          f"next retraining builds on {dataset or 'its configured base'}; "
          f"store now {store.disk_bytes():,} bytes")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    store = open_store(args.store or args.state or args.bundles / ".state")
    try:
        if args.command == "show":
            print(json.dumps(show(store, args.bundles), indent=2))
            return 0
        return compact(store, args.bundles, args.force)
    finally:
        store.close()


if __name__ == "__main__":
    sys.exit(main())
