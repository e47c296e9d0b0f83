"""Domain errors of the serving core; the servicer maps each to one gRPC status code.

The core (model, encoder, preprocessing, reload) raises these instead of touching gRPC, so it can
be used and tested without a server. `code` is the name of a `grpc.StatusCode` member.
"""
from __future__ import annotations

from index.events import StoreError, StoreFull
from index.preprocess import ImageError, ImageTooLarge


class ServeError(Exception):
    """A request the server refuses, with the gRPC status code name to answer with."""

    code = "INTERNAL"


class InvalidArgument(ServeError):
    """Malformed input: bad k, negative id, undecodable image, too many ids."""

    code = "INVALID_ARGUMENT"


class ResourceExhausted(ServeError):
    """A payload over a configured size limit (image bytes or pixels, text length), or an event
    store without room for the write."""

    code = "RESOURCE_EXHAUSTED"


class NotFound(ServeError):
    """The item to delete is not in the index."""

    code = "NOT_FOUND"


class AlreadyExists(ServeError):
    """Upsert of an item already in the index without overwrite."""

    code = "ALREADY_EXISTS"


class FailedPrecondition(ServeError):
    """The loaded bundle cannot do this (no encoders for EncodeItem / UpsertItem)."""

    code = "FAILED_PRECONDITION"


class Unavailable(ServeError):
    """No bundle is loaded yet, the server is shutting down, or the event store is down."""

    code = "UNAVAILABLE"


def refused_image(err: ImageError) -> ServeError:
    """The status of an image the torch-free preprocessing (index.preprocess) refused."""
    if isinstance(err, ImageTooLarge):
        return ResourceExhausted(str(err))
    return InvalidArgument(str(err))


def refused_write(err: StoreError) -> ServeError:
    """The status of a write the event store (index.events) could not commit or look up."""
    if isinstance(err, StoreFull):
        return ResourceExhausted(f"the event store is full; nothing was written: {err}")
    return Unavailable(f"the event store cannot take writes now; nothing was written, retry: "
                       f"{err}")
