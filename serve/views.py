"""What the inspection page shows, computed from one ServingModel and the catalogue (no HTML here).

A user's view is their training history (the bundle's seen items), the items recorded for them
since the bundle, and their current top-k exactly as Recommend answers it (same query, same
exclusions, same source). An item's view is its card and the items nearest to its vector. An
uploaded item is encoded with the bundle's towers (nothing is written) and shown with its nearest
items and the users who would get it in their top-k if it were added: `users_who_get` is the same
test `make demo` (serve.demo) runs after its UpsertItem, here over each user's top-k with the
candidate ranked in by its score (`top_with_candidate`), for at most `MAX_SCAN_USERS` users.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from serve.catalogue import Catalogue
from serve.errors import NotFound
from serve.limits import Limits, Query, check_query
from serve.model import POPULAR, RECENT, USER, ServingModel

SOURCE_LABELS = {USER: "user vector", RECENT: "recent items", POPULAR: "popularity"}
MAX_HISTORY = 60          # history cards shown (the page says how many there are)
MAX_SCAN_USERS = 5000     # users checked for "who would get it"
MAX_LISTED_USERS = 100    # of those, ids listed on the page
CANDIDATE = -1            # the uploaded item's id inside top_with_candidate
_NO_IDS = np.empty(0, dtype=np.int64)


@dataclass(frozen=True)
class Card:
    """One item as the page draws it."""

    item_id: int
    text: str | None          # None: not in the catalogue
    has_image: bool
    score: float | None = None
    in_index: bool = True


@dataclass(frozen=True)
class UserView:
    """A user's history and current top-k."""

    user_id: int
    k: int
    version: int
    history: list[Card]
    history_total: int
    recorded: list[Card]
    top: list[Card]
    source: str
    reason: str


@dataclass(frozen=True)
class ItemView:
    """An item and its nearest items."""

    card: Card
    k: int
    version: int
    nearest: list[Card]


@dataclass(frozen=True)
class EncodeView:
    """An uploaded item's nearest items and the users who would get it."""

    k: int
    version: int
    dim: int
    text: str
    image_bytes: int
    nearest: list[Card]
    users: list[int] = field(default_factory=list)
    users_total: int = 0
    scanned: int = 0
    known_users: int = 0


def cards(catalogue: Catalogue, ids: Iterable[int], scores: Sequence[float] | None = None,
          model: ServingModel | None = None) -> list[Card]:
    """Cards for item ids (with scores when given; `model` marks items missing from the index)."""
    out = []
    for n, item in enumerate(int(i) for i in ids):
        out.append(Card(item, catalogue.text(item), catalogue.has_image(item),
                        None if scores is None else float(scores[n]),
                        True if model is None else model.has_item(item)))
    return out


def query(user_id: int, k: int, limits: Limits) -> Query:
    """The validated query Recommend would get for (user_id, k) with default fields."""
    return check_query(user_id, k, (), True, (), limits)


def user_view(model: ServingModel, catalogue: Catalogue, user_id: int, k: int,
              limits: Limits) -> UserView:
    """A known user's view (NotFound for a user the bundle and the recorded events lack)."""
    q = query(user_id, k, limits)
    row, recorded = model.user_row(user_id), model.online.items(user_id)
    if row is None and not len(recorded):
        raise NotFound(f"user {user_id} is not in bundle v{model.version} "
                       f"({len(model.user_ids)} users) and has no recorded interactions; "
                       f"Recommend would answer it from popularity")
    seen = model.seen_items(row) if row is not None else _NO_IDS
    rec = model.recommend(q)
    return UserView(user_id, k, model.version, cards(catalogue, seen[:MAX_HISTORY], model=model),
                    len(seen), cards(catalogue, recorded[::-1][:MAX_HISTORY], model=model),
                    cards(catalogue, rec.item_ids, rec.scores), rec.source, rec.reason)


def item_view(model: ServingModel, catalogue: Catalogue, item_id: int, k: int,
              limits: Limits) -> ItemView:
    """An item's card and its nearest live items (NotFound when neither index nor catalogue
    has it)."""
    query(0, k, limits)  # validates k
    vec = model.item_vector(item_id)
    if vec is None and catalogue.text(item_id) is None:
        raise NotFound(f"item {item_id} is neither in the index of bundle v{model.version} "
                       f"nor in the catalogue")
    card = Card(item_id, catalogue.text(item_id), catalogue.has_image(item_id),
                in_index=vec is not None)
    near = [] if vec is None else _near(model, catalogue, vec, k, np.array([item_id]))
    return ItemView(card, k, model.version, near)


def _near(model: ServingModel, catalogue: Catalogue, vec: np.ndarray, k: int,
          exclude: np.ndarray | None = None) -> list[Card]:
    """Cards of the k items nearest to a vector."""
    rec = model.nearest(vec, k, exclude)
    return cards(catalogue, rec.item_ids, rec.scores)


def encode_view(model: ServingModel, catalogue: Catalogue, vec: np.ndarray, text: str,
                image_bytes: int, k: int, limits: Limits) -> EncodeView:
    """Nearest items of an encoded upload and the users who would get it in their top-k."""
    query(0, k, limits)
    users = model.user_ids[:MAX_SCAN_USERS]
    hits = users_who_get(CANDIDATE, users.tolist(),
                         lambda u: top_with_candidate(model, u, k, vec, limits))
    return EncodeView(k, model.version, int(vec.shape[0]), text, image_bytes,
                      _near(model, catalogue, vec, k), hits[:MAX_LISTED_USERS], len(hits),
                      len(users), len(model.user_ids))


def users_who_get(item_id: int, users: Iterable[int],
                  top_ids: Callable[[int], Sequence[int]]) -> list[int]:
    """The users whose top-k (`top_ids(user)`) contains `item_id`."""
    return [u for u in users if item_id in top_ids(u)]


def top_with_candidate(model: ServingModel, user_id: int, k: int, vec: np.ndarray,
                       limits: Limits) -> list[int]:
    """A user's top-k ids if an item with vector `vec` (id CANDIDATE) were in the index; it
    ranks after items with an equal score."""
    plan = model.plan(query(user_id, k, limits))
    if plan.vector is None:
        return []  # popularity answers: an item without interactions never enters it
    rec = model.nearest(plan.vector, k, plan.excluded)
    score = float(np.dot(plan.vector, vec))
    ids = rec.item_ids.tolist()
    pos = int(np.count_nonzero(rec.scores >= score))
    return (ids[:pos] + [CANDIDATE] + ids[pos:])[:k]


def overview(model: ServingModel, catalogue: Catalogue, bundle_name: str | None) -> dict:
    """The counts the front page shows."""
    m = model.manifest
    return dict(version=m.version, bundle=bundle_name, backbone=m.backbone, dim=m.dim,
                users=len(model.user_ids), bundle_items=m.counts.items, index_items=model.n_items,
                upserts=model.upserts, deletes=model.deletes, cold_start=model.encoder is not None,
                online_users=len(model.online), catalogue=len(catalogue),
                faiss_factory=m.faiss_factory, source_run=m.source_run,
                loaded_at=model.loaded_at.strftime("%Y-%m-%d %H:%M:%S UTC"),
                sample_users=model.user_ids[:5].tolist())
