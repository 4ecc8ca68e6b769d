"""The wire envelope: what one instance publishes to another.

One publish on an instance's channel carries one or more messages: a JSON header line
that lists them, a newline, then their payloads back to back, untouched::

    {"v":3,"origin":"...","messages":[{"id":"...","kind":"text","targets":["..."],"size":5},
    {"sel":["S{wslb}:g:room"],"id":"...","kind":"json","size":12},...]}\\n<payload>...

Concurrent sends share one publish per instance (``lua/send.lua`` batches them), so an
instance parses one header for all the messages it was sent at once. The payloads stay
out of the JSON so that binary frames need no base64 and text is not escaped twice;
``size`` (bytes) says where each ends. A message lists its ``targets`` (connection ids)
when Redis resolved its selector to ids (a user, a connection); otherwise it names the
selector, ``sel`` (``signing.canonical``: postfix ops, each set op naming its key), and
the receiving instance resolves it over its own connections
(:class:`~quart_wslb.local_index.LocalIndex`): a broadcast is ``"sel":["B"]``. The
header is checked by a versioned marshmallow
schema; unknown header fields are ignored so that a later minor version may add some (a
stream offset). With a secret, each message entry starts with its signature: ``ts``,
``sel`` and ``sig`` (:mod:`quart_wslb.signing`). A message whose sender has timestamps
on (:attr:`AsyncEmitter.timestamps <quart_wslb.AsyncEmitter.timestamps>`, which
:class:`quart_wslb.metrics.Metrics` turns on) carries ``t``: when it was sent, in Unix
µs by the sender's clock; an older receiver ignores it (through the schema), and so does
this one when it is not an integer in ``0..MAX_SENT``: a field read only for metrics
never costs a message its delivery. ``v`` is
:data:`quart_wslb.contract.VERSION` (exported here too), which ``lua/send.lua`` writes
from the same constant.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal, get_args

from marshmallow import (
    EXCLUDE,
    Schema,
    ValidationError,
    fields,
    post_load,
    validate,
    validates_schema,
)

from .contract import VERSION

__all__ = (
    "CONTROL_KINDS",
    "KINDS",
    "MAX_CLOSE_REASON",
    "MAX_SENT",
    "VERSION",
    "Envelope",
    "EnvelopeError",
    "Frame",
    "Kind",
    "close_payload",
    "decode",
    "encode",
    "head",
    "pack",
    "quick_header",
    "read_close",
    "to_frame",
)

Kind = Literal["text", "binary", "json", "join", "leave", "disconnect", "mark"]
#: Kinds that are instructions to the owning instance, not frames for the client:
#: ``join``/``leave`` carry a group name, ``disconnect`` ``{"code": int, "reason": str}``;
#: a ``mark`` (empty) carries where the history ends (``pos``, :mod:`quart_wslb.recovery`).
CONTROL_KINDS = frozenset({"join", "leave", "disconnect", "mark"})
#: What a websocket sends: ``str`` as a text frame, ``bytes`` as a binary frame.
Frame = str | bytes
#: Every kind an envelope's message may have.
KINDS: frozenset[str] = frozenset(get_args(Kind))
#: The largest send time (``t``, Unix µs) a message may carry, 2**53 (the year 2255):
#: up to it, a JSON reader that uses doubles reads every integer exactly, and a latency
#: computed from it is a float (10**400 is valid JSON, and no float). A ``t`` that is
#: not an integer in ``0..MAX_SENT`` is ignored, as if absent.
MAX_SENT = 2**53


class EnvelopeError(ValueError):
    """Bytes on a channel that are not a valid envelope."""


@dataclass(slots=True)
class Envelope:
    """One decoded message; ``targets`` ``None``: the local connections ``sel`` selects."""

    id: str
    origin: str
    kind: Kind
    targets: list[str] | None
    #: The websocket frame, decoded once for all local targets.
    frame: Frame
    #: Signed messages (:mod:`quart_wslb.signing`): when it was sent (Unix ms), the
    #: selector it was sent to, and ``<key id>:<mac>``; ``sel`` also on every message
    #: sent without ``targets``.
    ts: int | None = None
    sel: list[str] | None = None
    sig: str | None = None
    #: With several shards (:class:`~quart_wslb.keys.Keys`), the shard whose script
    #: call routed it (header field ``sh``): ``sel`` selects among that shard's
    #: connections only, since every shard routes its own.
    shard: int | None = None
    #: With recovery (:mod:`quart_wslb.recovery`), where the message lies in its
    #: shard's history stream: ``"<ms>-<seq>"`` (header field ``pos``).
    pos: str | None = None
    #: When it was sent, in Unix µs by the sender's clock (header field ``t``), if its
    #: sender had timestamps on (:mod:`quart_wslb.metrics`) and it is in ``0..MAX_SENT``.
    sent: int | None = None

    @property
    def payload(self) -> bytes:
        """The payload as it travels on the wire."""
        return self.frame if isinstance(self.frame, bytes) else self.frame.encode("utf-8")


class _MessageSchema(Schema):
    class Meta:
        unknown = EXCLUDE

    id = fields.String(required=True, validate=validate.Length(min=1, max=200))
    kind = fields.String(required=True, validate=validate.OneOf(sorted(KINDS)))
    targets = fields.List(fields.String(validate=validate.Length(min=1)))
    size = fields.Integer(required=True, strict=True, validate=validate.Range(min=0))
    ts = fields.Integer(strict=True)
    sel = fields.List(fields.String(), validate=validate.Length(min=1))
    sig = fields.String(validate=validate.Length(min=1, max=200))
    pos = fields.String(validate=validate.Length(min=3, max=48))
    # Any value: one that is not a send time is dropped (_sent), not refused.
    t = fields.Raw(allow_none=True)

    @validates_schema
    def _addressed(self, data: dict[str, Any], **_: Any) -> None:
        if "targets" not in data and "sel" not in data:
            raise ValidationError("a message needs its targets or its selector (sel)")

    @post_load
    def _sent(self, data: dict[str, Any], **_: Any) -> dict[str, Any]:
        # Read only for metrics, and unsigned: a bad one must not cost the message its
        # delivery (as it costs nothing to a receiver that predates the field).
        if "t" in data and not _is_sent(data["t"]):
            del data["t"]
        return data


def _is_sent(value: object) -> bool:
    """Whether ``value`` is a send time a message may carry (``t``)."""
    return type(value) is int and 0 <= value <= MAX_SENT


class _HeaderSchema(Schema):
    class Meta:
        unknown = EXCLUDE

    v = fields.Integer(required=True, strict=True, validate=validate.Equal(VERSION))
    origin = fields.String(required=True, validate=validate.Length(min=1, max=200))
    sh = fields.Integer(strict=True, validate=validate.Range(min=0))
    messages = fields.List(
        fields.Nested(_MessageSchema), required=True, validate=validate.Length(min=1)
    )

    @post_load
    def _drop_version(self, data: dict[str, Any], **_: Any) -> dict[str, Any]:
        data.pop("v")
        return data


_SCHEMA = _HeaderSchema()
_DECODER = json.JSONDecoder()


def quick_header(header: bytes) -> dict[str, Any] | None:
    """The schema's result for a plain, well-formed header, checked by hand; else ``None``.

    Every envelope is decoded on the hot path, and marshmallow costs tens of µs per
    header; this accepts exactly what :class:`_HeaderSchema` accepts without extra
    fields (a test holds them together) and leaves everything else, with its error
    message, to the schema.
    """
    try:
        text = header.decode("utf-8")
        data, end = _DECODER.raw_decode(text)
    except (ValueError, RecursionError):  # ValueError covers Unicode and JSON errors
        return None
    if end != len(text) or type(data) is not dict or len(data) != 3 + ("sh" in data):
        return None
    shard = data.get("sh", 0)
    if type(shard) is not int or shard < 0:
        return None
    version, origin, messages = data.get("v"), data.get("origin"), data.get("messages")
    if (
        type(version) is not int
        or version != VERSION
        or type(origin) is not str
        or not 0 < len(origin) <= 200
        or type(messages) is not list
        or not messages
    ):
        return None
    for message in messages:
        if not _plain_message(message):
            return None
    del data["v"]
    return data


def _plain_message(data: object) -> bool:
    """Whether ``data`` is a message entry the schema accepts with no other field: id,
    kind, size and ``targets`` or ``sel`` or both; with a signature, also ``ts`` and
    ``sig``; maybe ``pos`` and ``t``. A ``t`` that is not a send time is deleted from
    ``data``, as the schema drops it."""
    if type(data) is not dict:
        return False
    get = data.get
    fields = len(data) - ("targets" in data) - ("sel" in data) - ("pos" in data)
    if fields != 3:  # a send time, a signature's fields: inline, this runs per message
        if "t" in data:
            sent = data["t"]
            if type(sent) is not int or not 0 <= sent <= MAX_SENT:
                del data["t"]  # ignored, as the schema ignores it (_MessageSchema._sent)
            fields -= 1
        ts, sig = get("ts"), get("sig")
        if fields != 3 and (
            fields != 5 or type(ts) is not int or type(sig) is not str or not 0 < len(sig) <= 200
        ):
            return False
    id, kind, size = get("id"), get("kind"), get("size")
    if (
        type(id) is not str
        or not 0 < len(id) <= 200
        or type(kind) is not str  # a list or dict is unhashable: the schema says why
        or kind not in KINDS
        or type(size) is not int
        or size < 0
    ):
        return False
    if "targets" in data:
        targets = data["targets"]
        if type(targets) is not list:
            return False
        for target in targets:  # a loop: for one or two targets, cheaper than all()
            if type(target) is not str or not target:
                return False
    elif "sel" not in data:
        return False
    if "pos" in data:
        pos = data["pos"]
        if type(pos) is not str or not 3 <= len(pos) <= 48:
            return False
    if "sel" in data:
        sel = data["sel"]
        if type(sel) is not list or not sel:
            return False
        for op in sel:
            if type(op) is not str:
                return False
    return True


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


def head(message_id: str, origin: str, kind: Kind, signature: bytes = b"") -> bytes:
    """An envelope of one message, up to its ``"targets":``: a script appends
    ``[ids],"size":n}]}``, a newline and the payload. ``signature`` is the fragment
    that opens a signed entry (``Keyring.fragment``)."""
    return (
        f'{{"v":{VERSION},"origin":{_dumps(origin)},"messages":[{{'.encode()
        + signature
        + f'"id":{_dumps(message_id)},"kind":"{kind}","targets":'.encode()
    )


def encode(*envelopes: Envelope) -> bytes:
    """The wire form of one or more messages from one origin (what ``send.lua`` writes)."""
    if not envelopes or len({e.origin for e in envelopes}) != 1:
        raise ValueError("encode needs one or more envelopes of one origin")
    payloads = [e.payload for e in envelopes]
    header = {
        "v": VERSION,
        "origin": envelopes[0].origin,
        "messages": [_entry(e, p) for e, p in zip(envelopes, payloads, strict=True)],
    }
    return _dumps(header).encode() + b"\n" + b"".join(payloads)


def _entry(envelope: Envelope, payload: bytes) -> dict[str, Any]:
    entry: dict[str, Any] = {}
    if envelope.sig is not None:  # first, as send.lua writes them
        entry.update(ts=envelope.ts, sel=envelope.sel, sig=envelope.sig)
    elif envelope.sel is not None:
        entry["sel"] = envelope.sel
    entry.update(id=envelope.id, kind=envelope.kind)
    if envelope.targets is not None:
        entry["targets"] = envelope.targets
    if envelope.pos is not None:
        entry["pos"] = envelope.pos
    if envelope.sent is not None:
        entry["t"] = envelope.sent
    entry["size"] = len(payload)
    return entry


def decode(raw: bytes) -> list[Envelope]:
    """Parse and validate one publish: its messages, in order; raises
    :class:`EnvelopeError` on any defect (then none of them is delivered)."""
    header, sep, body = raw.partition(b"\n")
    if not sep:
        raise EnvelopeError("no header line")
    data = quick_header(header)
    if data is None:  # anything unusual gets the schema's full check and its message
        try:
            data = _SCHEMA.loads(header)
        except (ValidationError, ValueError, RecursionError) as error:
            raise EnvelopeError(f"bad header: {error!r:.200}") from error
    messages: list[dict[str, Any]] = data["messages"]
    if sum(m["size"] for m in messages) != len(body):
        raise EnvelopeError("the sizes in the header do not add up to the payloads")
    origin, shard, start, envelopes = data["origin"], data.get("sh"), 0, []
    for message in messages:
        end = start + message["size"]
        payload = body[start:end]
        start = end
        try:
            frame = payload if message["kind"] == "binary" else payload.decode("utf-8")
        except UnicodeDecodeError as error:
            raise EnvelopeError(f"message {message['id']}: text is not UTF-8") from error
        get = message.get
        if "sig" in message:
            envelope = Envelope(
                message["id"],
                origin,
                message["kind"],
                get("targets"),
                frame,
                get("ts"),  # the schema lets ts and sel lack: Verifier says so
                get("sel"),
                message["sig"],
                shard,
                get("pos"),
            )
        else:
            envelope = Envelope(
                message["id"],
                origin,
                message["kind"],
                get("targets"),
                frame,
                sel=get("sel"),
                shard=shard,
                pos=get("pos"),
            )
        if "t" in message:  # set apart: a message without one pays one lookup
            envelope.sent = message["t"]
        envelopes.append(envelope)
    return envelopes


#: Most bytes of UTF-8 in a close frame's reason (RFC 6455: 125 bytes of payload).
MAX_CLOSE_REASON = 123


def close_payload(code: int, reason: str) -> bytes:
    """The payload of a ``disconnect`` control; ``ValueError`` for a close code other
    than 1000 or 3000-4999, or a reason that is not a str of at most 123 UTF-8 bytes."""
    _check_close(code, reason)
    return _dumps({"code": code, "reason": reason}).encode()


def read_close(text: str) -> tuple[int, str]:
    """The code and reason of a ``disconnect`` payload, checked as
    :func:`close_payload` checks them; ``ValueError`` otherwise."""
    data = json.loads(text)
    if type(data) is not dict or "code" not in data:
        raise ValueError("a disconnect needs an object with a code")
    code, reason = data["code"], data.get("reason", "")
    _check_close(code, reason)
    return code, reason


def _check_close(code: object, reason: object) -> None:
    if type(code) is not int or not (code == 1000 or 3000 <= code <= 4999):
        raise ValueError(f"close code must be 1000 or in 3000-4999, not {code!r:.20}")
    if type(reason) is not str or len(reason.encode("utf-8", "replace")) > MAX_CLOSE_REASON:
        raise ValueError(f"a close reason must be a str of at most {MAX_CLOSE_REASON} bytes")


def to_frame(message: object) -> Frame:
    """The websocket frame for a message sent straight to a local connection."""
    if isinstance(message, str):
        return message
    kind, payload = pack(message)
    return payload if kind == "binary" else payload.decode("utf-8")
