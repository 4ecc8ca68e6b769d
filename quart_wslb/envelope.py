"""The wire envelope: what one instance publishes to another.

An envelope is one JSON header line, a newline, then the payload bytes untouched::

    {"v":1,"id":"...","origin":"...","kind":"json","targets":["..."]}\\n<payload>

The payload stays out of the JSON so that binary frames need no base64 and text is not
escaped twice. The header ends with ``targets`` so that the routing script can append the
ids it resolved to a head that Python built (see :func:`head`). The header is checked by a
versioned marshmallow schema; unknown header fields are ignored so that a later minor
version may add some (a signature, a stream offset).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from marshmallow import EXCLUDE, Schema, ValidationError, fields, post_load, validate

__all__ = (
    "CONTROL_KINDS",
    "VERSION",
    "Envelope",
    "EnvelopeError",
    "Frame",
    "Kind",
    "decode",
    "encode",
    "head",
    "pack",
    "quick_header",
    "to_frame",
)

VERSION = 1
Kind = Literal["text", "binary", "json", "join", "leave", "disconnect"]
#: Kinds that are instructions to the owning instance, not frames for the client:
#: ``join``/``leave`` carry a group name, ``disconnect`` ``{"code": int, "reason": str}``.
CONTROL_KINDS = frozenset({"join", "leave", "disconnect"})
#: What a websocket sends: ``str`` as a text frame, ``bytes`` as a binary frame.
Frame = str | bytes


class EnvelopeError(ValueError):
    """Bytes on a channel that are not a valid envelope."""


@dataclass(slots=True)
class Envelope:
    """A decoded envelope; ``targets`` empty means every local connection."""

    id: str
    origin: str
    kind: Kind
    targets: list[str]
    #: The websocket frame, decoded once for all local targets.
    frame: Frame

    @property
    def payload(self) -> bytes:
        """The payload as it travels on the wire."""
        return self.frame if isinstance(self.frame, bytes) else self.frame.encode("utf-8")


class _HeaderSchema(Schema):
    class Meta:
        unknown = EXCLUDE

    v = fields.Integer(required=True, strict=True, validate=validate.Equal(VERSION))
    id = fields.String(required=True, validate=validate.Length(min=1, max=200))
    origin = fields.String(required=True, validate=validate.Length(min=1, max=200))
    kind = fields.String(
        required=True,
        validate=validate.OneOf(("text", "binary", "json", "join", "leave", "disconnect")),
    )
    targets = fields.List(fields.String(validate=validate.Length(min=1)), required=True)

    @post_load
    def _drop_version(self, data: dict[str, Any], **_: Any) -> dict[str, Any]:
        data.pop("v")
        return data


_SCHEMA = _HeaderSchema()
_DECODER = json.JSONDecoder()
_KINDS = frozenset(("text", "binary", "json", "join", "leave", "disconnect"))


def quick_header(header: bytes) -> dict[str, Any] | None:
    """The schema's result for a well-formed header, checked by hand; else ``None``.

    Every envelope is decoded on the hot path, and marshmallow costs tens of µs per
    header; this accepts exactly what :class:`_HeaderSchema` accepts (a test holds them
    together) and leaves everything else, with its error message, to the schema.
    """
    try:
        text = header.decode("utf-8")
        data, end = _DECODER.raw_decode(text)
    except (ValueError, RecursionError):  # ValueError covers Unicode and JSON errors
        return None
    if end != len(text) or type(data) is not dict:
        return None
    version, id, origin = data.get("v"), data.get("id"), data.get("origin")
    kind, targets = data.get("kind"), data.get("targets")
    if (
        type(version) is not int
        or version != VERSION
        or type(id) is not str
        or not 0 < len(id) <= 200
        or type(origin) is not str
        or not 0 < len(origin) <= 200
        or kind not in _KINDS
        or type(targets) is not list
        or not all(type(t) is str and t for t in targets)
    ):
        return None
    return {"id": id, "origin": origin, "kind": kind, "targets": targets}


_dumps = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode


def pack(message: object) -> tuple[Kind, bytes]:
    """Encode a user message once: ``str`` text, ``bytes`` binary, ``dict``/``list`` JSON.

    Raises ``TypeError`` for anything else, before anything is published.
    """
    if isinstance(message, str):
        return "text", message.encode("utf-8")
    if isinstance(message, bytes | bytearray | memoryview):
        return "binary", bytes(message)
    if isinstance(message, dict | list):
        try:
            return "json", _dumps(message).encode("utf-8")
        except (TypeError, ValueError) as error:
            raise TypeError(f"message is not JSON serialisable: {error}") from error
    raise TypeError(f"message must be str, bytes, dict or list, not {type(message).__name__}")


def head(message_id: str, origin: str, kind: Kind) -> bytes:
    """The header up to ``"targets":``; the router appends ``[ids]}`` and the payload."""
    return (
        f'{{"v":{VERSION},"id":{_dumps(message_id)},"origin":{_dumps(origin)},'
        f'"kind":"{kind}","targets":'
    ).encode()


def encode(envelope: Envelope) -> bytes:
    """The complete wire form (what :func:`head` plus the routing script produce)."""
    start = head(envelope.id, envelope.origin, envelope.kind)
    return start + _dumps(envelope.targets).encode() + b"}\n" + envelope.payload


def decode(raw: bytes) -> Envelope:
    """Parse and validate one envelope; raises :class:`EnvelopeError` on any defect."""
    header, sep, payload = raw.partition(b"\n")
    if not sep:
        raise EnvelopeError("no header line")
    data = quick_header(header)
    if data is None:  # anything unusual gets the schema's full check and its message
        try:
            data = _SCHEMA.loads(header)
        except (ValidationError, ValueError, RecursionError) as error:
            raise EnvelopeError(f"bad header: {error!r:.200}") from error
    if data["kind"] == "binary":
        return Envelope(frame=payload, **data)
    try:
        return Envelope(frame=payload.decode("utf-8"), **data)
    except UnicodeDecodeError as error:
        raise EnvelopeError("text payload is not UTF-8") from error


def to_frame(message: object) -> Frame:
    """The websocket frame for a message sent straight to a local connection."""
    if isinstance(message, str):
        return message
    kind, payload = pack(message)
    return payload if kind == "binary" else payload.decode("utf-8")
