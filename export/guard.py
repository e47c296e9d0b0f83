"""The retraining job's publish guard: the live bundle and a fresh one, scored the same way on the
fresh run's validation split, and the verdict of whether the fresh one may go live.

Both bundles are scored as the server would answer: the user's vector from `users.npy`, a top-k
search of the bundle's own FAISS index excluding the user's training items, Recall@k against the
user's validation items (MMRec's recall: hits / validation items). Only users both bundles know
are scored (the rest are counted); validation items the live bundle lacks count as misses for it
(it cannot recommend them) and are counted too.
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from index import ann
from index.atomic import write_text
from index.bundle import ITEM_IDS, ITEMS_INDEX, USER_IDS, USERS, load_bundle

log = logging.getLogger(__name__)
STATUS_FILE = "retrain_status.json"  # in the bundles directory, for a cron wrapper to alert on
BATCH = 1024


@dataclass(frozen=True)
class Score:
    """Recall@k of one bundle over the scored users."""

    recall: float
    users: int              # users scored (known to both bundles, with validation items)
    unknown_users: int      # validation users this bundle has no vector for
    unknown_items: int      # validation pairs whose item this bundle does not hold


@dataclass(frozen=True)
class Verdict:
    """Whether the fresh bundle may replace the live one, and why."""

    publish: bool
    live: Score | None
    fresh: Score
    reason: str


def _by_user(pairs: np.ndarray) -> dict[int, np.ndarray]:
    """{user: items} of (E, 2) [user, item] pairs."""
    order = np.argsort(pairs[:, 0], kind="stable")
    users, starts = np.unique(pairs[order, 0], return_index=True)
    return {int(u): items for u, items in zip(users, np.split(pairs[order, 1], starts[1:]))}


def bundle_recall(path: Path, valid: np.ndarray, train: np.ndarray, k: int = 20,
                  users: set[int] | None = None) -> Score:
    """Recall@k of the bundle at `path` on validation pairs, training items excluded; only the
    `users` given (default: every validation user the bundle knows)."""
    bundle = load_bundle(path)
    user_ids = bundle.load_npy(USER_IDS)
    rows = {int(u): r for r, u in enumerate(user_ids)}
    truth, seen = _by_user(valid), _by_user(train)
    known_items = set(bundle.load_npy(ITEM_IDS).tolist())
    unknown_items = int(sum(int(i) not in known_items for i in valid[:, 1]))
    scored = sorted(u for u in truth if u in rows and (users is None or u in users))
    vectors, index = bundle.load_npy(USERS), ann.load(bundle.file(ITEMS_INDEX))
    hits = 0.0
    for s in range(0, len(scored), BATCH):
        chunk = scored[s:s + BATCH]
        q = np.ascontiguousarray(vectors[[rows[u] for u in chunk]], dtype=np.float32)  # (B, d)
        _, ids = ann.search(index, q, k, [seen.get(u, np.empty(0, np.int64)) for u in chunk])
        for u, top in zip(chunk, ids):
            hits += np.isin(truth[u], top).sum() / len(truth[u])
    return Score(hits / max(1, len(scored)), len(scored),
                 sum(u not in rows for u in truth), unknown_items)


def known_users(path: Path) -> set[int]:
    """User ids the bundle at `path` has vectors for."""
    return set(load_bundle(path).load_npy(USER_IDS).tolist())


def judge(live: Path | None, fresh: Path, valid: np.ndarray, train: np.ndarray, k: int,
          tolerance: float) -> Verdict:
    """Publish unless the fresh bundle's Recall@k is below (1 - tolerance) x the live one's, both
    on the users both know."""
    if live is None:
        return Verdict(True, None, bundle_recall(fresh, valid, train, k), "no live bundle")
    common = known_users(live) & known_users(fresh)
    old = bundle_recall(live, valid, train, k, common)
    new = bundle_recall(fresh, valid, train, k, common)
    floor = (1.0 - tolerance) * old.recall
    ok = new.recall >= floor
    reason = (f"fresh {fresh.name} recall@{k} {new.recall:.4f} vs live {live.name} "
              f"{old.recall:.4f} on {new.users} users "
              f"({'>=' if ok else '<'} the floor {floor:.4f} of tolerance {tolerance:g}); "
              f"validation items the live bundle lacks: {old.unknown_items}")
    return Verdict(ok, old, new, reason)


def write_status(bundles: Path, verdict: Verdict, published: bool) -> None:
    """BUNDLES/retrain_status.json: what the last retrain did, atomically."""
    status = {"time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "status": "published" if published else "kept_live",
              "reason": verdict.reason, "fresh": asdict(verdict.fresh),
              "live": asdict(verdict.live) if verdict.live else None}
    write_text(bundles / STATUS_FILE, json.dumps(status, indent=2))
