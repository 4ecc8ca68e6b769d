"""One message on its way to local connections, encoded as a WebSocket frame once.

The receiver makes one :class:`Outgoing` per message and queues that same object to every
local target, so a message to a thousand members is UTF-8 encoded and framed once, not
once per connection. Each connection's writer then writes :attr:`Outgoing.wire` straight
to the server's stream where it can (Hypercorn, no extension negotiated: see
:func:`quart_wslb._compat.frame_writer`), and hands :attr:`Outgoing.frame` to the ASGI
server otherwise.
"""

from __future__ import annotations

import struct

from .envelope import Frame

__all__ = ("Outgoing", "encode_frame")

#: First byte of a whole (FIN) unextended text and binary frame (RFC 6455, 5.2).
_TEXT, _BINARY = 0x81, 0x82
_MEDIUM = struct.Struct("!BBH")
_LONG = struct.Struct("!BBQ")


def encode_frame(frame: Frame) -> bytes:
    """``frame`` as one unmasked, unfragmented, unextended WebSocket frame: what a
    server writes for it when no extension (such as permessage-deflate) is in use."""
    if isinstance(frame, str):
        first, payload = _TEXT, frame.encode("utf-8")
    else:
        first, payload = _BINARY, bytes(frame)
    size = len(payload)
    if size <= 125:
        header = bytes((first, size))
    elif size <= 0xFFFF:
        header = _MEDIUM.pack(first, 126, size)
    else:
        header = _LONG.pack(first, 127, size)
    return header + payload


class Outgoing:
    """A frame for local connections, shared by all of them: the ``frame`` itself
    (``str``: text, ``bytes``: binary) and its wire encoding, made on first use."""

    __slots__ = ("_wire", "frame", "sent")

    def __init__(self, frame: Frame, sent: int | None = None) -> None:
        #: What the client receives: ``str`` as a text frame, ``bytes`` as binary.
        self.frame = frame
        #: When its message was sent (Unix µs, the sender's clock), if it says
        #: (:attr:`Envelope.sent <quart_wslb.envelope.Envelope.sent>`).
        self.sent = sent
        self._wire: bytes | None = None

    def __repr__(self) -> str:
        return f"<Outgoing {self.frame!r:.60}>"

    @property
    def wire(self) -> bytes:
        """The frame as :func:`encode_frame` writes it, encoded once."""
        wire = self._wire
        if wire is None:
            wire = self._wire = encode_frame(self.frame)
        return wire
