"""Request limits and validation: every check raises a ServeError naming its status code.

Documented statuses (the servicer maps the error classes to gRPC codes):
- k outside 1..max_k, negative ids, too many exclude/recent ids or batch requests, an item with
  neither image nor text, an undecodable image or one longer than `max_image_aspect` times its
  width (checked from the header); RecordInteractions with no or too many item ids,
  timestamps that do not match them one to one or are negative, an over-long kind or request
  id: INVALID_ARGUMENT;
- image bytes over `max_image_bytes`, image pixels over `max_image_pixels`, text over
  `max_text_chars` characters: RESOURCE_EXHAUSTED (a payload too large, not a malformed one).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from serve.errors import InvalidArgument, ResourceExhausted

MIB = 1024 * 1024


class Limits(BaseModel):
    """Size limits on requests."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_k: int = Field(1000, ge=1)
    max_exclude: int = Field(10_000, ge=0)
    max_recent: int = Field(1000, ge=0)
    max_batch: int = Field(256, ge=1)
    max_image_bytes: int = Field(8 * MIB, ge=1)
    max_image_pixels: int = Field(50_000_000, ge=1)
    max_image_aspect: float = Field(20.0, ge=1, description="longest / shortest side")
    max_text_chars: int = Field(20_000, ge=0)
    max_interactions: int = Field(1000, ge=1)
    max_request_id_chars: int = Field(128, ge=1)
    max_action_chars: int = Field(64, ge=1)


@dataclass(frozen=True)
class Query:
    """A validated Recommend request."""

    user_id: int
    k: int
    exclude: np.ndarray          # (E,) int64
    exclude_seen: bool
    recent: np.ndarray           # (R,) int64


def check_id(value: int, what: str = "item_id") -> int:
    """A non-negative int64 id."""
    if value < 0:
        raise InvalidArgument(f"{what} must be non-negative, got {value}")
    return int(value)


def check_ids(values: Sequence[int], limit: int, what: str) -> np.ndarray:
    """A bounded list of non-negative ids as an int64 array."""
    if len(values) > limit:
        raise InvalidArgument(f"{what} has {len(values)} ids, more than the limit of {limit}")
    ids = np.fromiter(values, dtype=np.int64, count=len(values))
    if len(ids) and ids.min() < 0:
        raise InvalidArgument(f"{what} must be non-negative, got {int(ids.min())}")
    return ids


def check_query(user_id: int, k: int, exclude: Sequence[int], exclude_seen: bool,
                recent: Sequence[int], limits: Limits) -> Query:
    """Validate the fields of one Recommend request."""
    if not 1 <= k <= limits.max_k:
        raise InvalidArgument(f"k must be in 1..{limits.max_k}, got {k}")
    return Query(user_id=check_id(user_id, "user_id"), k=int(k),
                 exclude=check_ids(exclude, limits.max_exclude, "exclude_item_ids"),
                 exclude_seen=bool(exclude_seen),
                 recent=check_ids(recent, limits.max_recent, "recent_item_ids"))


def check_batch(n: int, limits: Limits) -> None:
    """A RecommendBatch holds 1..max_batch requests."""
    if not 1 <= n <= limits.max_batch:
        raise InvalidArgument(f"a batch needs 1..{limits.max_batch} requests, got {n}")


def check_item(image: bytes, text: str, limits: Limits) -> None:
    """Payload checks of an item to encode (the image is decoded later, by the encoder)."""
    if len(image) > limits.max_image_bytes:
        raise ResourceExhausted(f"image is {len(image)} bytes, more than the limit of "
                                f"{limits.max_image_bytes}")
    if len(text) > limits.max_text_chars:
        raise ResourceExhausted(f"text is {len(text)} characters, more than the limit of "
                                f"{limits.max_text_chars}")
    if not image and not text.strip():
        raise InvalidArgument("an item needs an image or a non-empty text")


def check_request_id(value: str, limits: Limits) -> str:
    """An optional client request id (empty: none), at most max_request_id_chars."""
    if len(value) > limits.max_request_id_chars:
        raise InvalidArgument(f"request_id has {len(value)} characters, more than the limit of "
                              f"{limits.max_request_id_chars}")
    return value


def check_interactions(user_id: int, item_ids: Sequence[int], timestamps: Sequence[int],
                       action: str, limits: Limits, now: int) -> tuple[int, np.ndarray, np.ndarray]:
    """Validated (user, items, timestamps) of RecordInteractions; timestamps default to now."""
    user = check_id(user_id, "user_id")
    if not item_ids:
        raise InvalidArgument("item_ids is empty")
    items = check_ids(item_ids, limits.max_interactions, "item_ids")
    if timestamps and len(timestamps) != len(items):
        raise InvalidArgument(f"{len(timestamps)} timestamps for {len(items)} item_ids; send "
                              "one per item or none")
    stamps = (check_ids(timestamps, limits.max_interactions, "timestamps") if timestamps
              else np.full(len(items), now, dtype=np.int64))
    if len(action) > limits.max_action_chars:
        raise InvalidArgument(f"kind has {len(action)} characters, more than the limit of "
                              f"{limits.max_action_chars}")
    return user, items, stamps
