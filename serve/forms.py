"""Bounded HTML form bodies for the inspection page: multipart/form-data and urlencoded.

Multipart bodies are parsed with the standard library's email parser (the `cgi` module is gone
from Python 3.13); the caller reads at most a configured number of bytes first, so a body never
costs more memory than the limit. Every refusal is a ServeError (InvalidArgument: 400,
ResourceExhausted: 413) with a message the page shows.
"""
from __future__ import annotations

from dataclasses import dataclass
from email import policy
from email.parser import BytesParser
from urllib.parse import parse_qs

from serve.errors import InvalidArgument, ResourceExhausted


@dataclass(frozen=True)
class Upload:
    """The fields of a submitted form: text values and file contents by field name."""

    fields: dict[str, str]
    files: dict[str, bytes]

    def get(self, name: str, default: str = "") -> str:
        """A text field's value."""
        return self.fields.get(name, default)


def body_length(header: str | None, limit: int) -> int:
    """The Content-Length of a request body, checked against `limit` before anything is read."""
    if header is None:
        raise InvalidArgument("the request has no Content-Length (chunked uploads are not "
                              "accepted)")
    try:
        length = int(header)
    except ValueError:
        raise InvalidArgument(f"Content-Length is not a number: {header[:40]!r}") from None
    if length < 0:
        raise InvalidArgument(f"Content-Length is negative: {length}")
    if length > limit:
        raise ResourceExhausted(f"the upload is {length} bytes, more than the limit of {limit}")
    return length


def parse_multipart(content_type: str, body: bytes) -> Upload:
    """Fields and files of a multipart/form-data body."""
    if not content_type.lower().startswith("multipart/form-data") or "boundary=" not in \
            content_type:
        raise InvalidArgument("the form must be sent as multipart/form-data with a boundary")
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode("latin-1")
    message = BytesParser(policy=policy.HTTP).parsebytes(head + body)
    if not message.is_multipart() or message.defects:
        raise InvalidArgument("the multipart body does not parse (" +
                              (", ".join(type(d).__name__ for d in message.defects) or
                               "no parts") + ")")
    fields: dict[str, str] = {}
    files: dict[str, bytes] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not name:
            continue
        payload = part.get_payload(decode=True) or b""
        if part.get_filename() is not None:
            files[str(name)] = payload
            continue
        charset = part.get_content_charset() or "utf-8"
        try:
            fields[str(name)] = payload.decode(charset)
        except (LookupError, UnicodeDecodeError):
            raise InvalidArgument(f"form field {name!r} is not valid {charset} text") from None
    return Upload(fields, files)


def parse_urlencoded(body: bytes) -> Upload:
    """Fields of an application/x-www-form-urlencoded body."""
    try:
        text = body.decode("ascii")
    except UnicodeDecodeError:
        raise InvalidArgument("the form body is not urlencoded ASCII") from None
    try:
        pairs = parse_qs(text, keep_blank_values=True, max_num_fields=20)
    except ValueError:
        raise InvalidArgument("the form has too many fields") from None
    return Upload({name: values[0] for name, values in pairs.items()}, {})
