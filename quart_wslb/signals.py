"""blinker signals of quart-wslb.

Every signal is sent with the :class:`~quart_wslb.WsLoadBalance` extension as sender
(by :class:`~quart_wslb.signal_sender.SignalSender`). Coroutine receivers are awaited;
plain functions are called inline on the event loop, so they must be quick. Unlike
``Signal.send_async``, a receiver that raises is logged and the others still run: a
signal never breaks delivery.
"""

from __future__ import annotations

from blinker import NamedSignal, Namespace

__all__ = (
    "connection_closed",
    "connection_opened",
    "message_delivered",
    "message_dropped",
    "message_received",
    "message_routed",
    "message_timed",
    "instance_joined",
    "instance_left",
    "instance_reaped",
    "registry_repaired",
    "subscriber_lost",
    "user_offline",
    "user_online",
)

_signals = Namespace()

#: A local connection was registered. Receivers: ``(sender, connection)``.
connection_opened: NamedSignal = _signals.signal("connection_opened")
#: A local connection ended and left the registry. Receivers: ``(sender, connection)``.
connection_closed: NamedSignal = _signals.signal("connection_closed")
#: ``send`` published a message. Receivers: ``(sender, message_id, selector, routed,
#: instances)``: connections and instances it was routed to.
message_routed: NamedSignal = _signals.signal("message_routed")
#: This instance took an envelope off its channel. Receivers: ``(sender, envelope)``.
message_received: NamedSignal = _signals.signal("message_received")
#: A frame was written to a local client. Receivers: ``(sender, connection, frame)``.
message_delivered: NamedSignal = _signals.signal("message_delivered")
#: A frame whose message carried its send time (its sender had
#: :attr:`~quart_wslb.AsyncEmitter.timestamps` on) was written to a local client, right
#: after ``message_delivered``. Receivers: ``(sender, connection, latency)``: seconds from
#: the send to the write, this machine's clock minus the sender's (so skew between them
#: counts, and may make it negative).
message_timed: NamedSignal = _signals.signal("message_timed")
#: Something was not delivered. Receivers: ``(sender, reason, message_id, connection,
#: detail)``. ``reason`` is one of ``"malformed"`` (an envelope failed the schema),
#: ``"error"`` (delivering one message raised; logged with its traceback),
#: ``"queue_full"``, ``"gone"`` (no such local connection), ``"closed"`` (still queued
#: when the connection ended) or ``"too_large"`` (a client frame over
#: ``WSLB_MAX_MESSAGE_SIZE``; the socket was closed with 1009). ``"malformed"`` also
#: covers a disconnect with an invalid close code or reason and a probe this instance
#: never sent. With ``WSLB_SECRET``: ``"unsigned"`` (a message or probe without a
#: signature) and ``"bad_signature"`` (a wrong MAC, an unknown key id, a stale or
#: replayed message, or a target its signed selector does not select; ``detail`` says
#: which). ``message_id`` and ``connection`` are ``None`` when unknown.
message_dropped: NamedSignal = _signals.signal("message_dropped")

#: This instance saw another instance's heartbeat appear. Receivers: ``(sender, instance)``.
instance_joined: NamedSignal = _signals.signal("instance_joined")
#: This instance saw an instance's heartbeat disappear (stopped, or crashed and expired).
#: Receivers: ``(sender, instance)``.
instance_left: NamedSignal = _signals.signal("instance_left")
#: This instance reaped a dead instance's records (exactly one survivor does).
#: Receivers: ``(sender, instance, connections)``: how many records it removed.
instance_reaped: NamedSignal = _signals.signal("instance_reaped")
#: Redis held records that differed from this instance's live connections, and they were
#: made to agree. Receivers: ``(sender, restored, removed)``.
registry_repaired: NamedSignal = _signals.signal("registry_repaired")
#: A user's first connection in the whole cluster opened (sent once, by the instance that
#: registered it). Receivers: ``(sender, user)``.
user_online: NamedSignal = _signals.signal("user_online")
#: A user's last connection in the cluster closed or was reaped (sent once, by the
#: instance that removed it). Receivers: ``(sender, user)``.
user_offline: NamedSignal = _signals.signal("user_offline")
#: The subscriber connection was lost; it is being re-established (with backoff, but
#: after a restart). Receivers: ``(sender, error, reason)``. ``reason`` is one of
#: ``"closed"`` (Redis closed the connection: ``CLIENT KILL``, a restart, its
#: ``client-output-buffer-limit pubsub``...; everything it sent first was delivered),
#: ``"output_buffer_limit"`` (closed, and Redis counted a client cut for that limit
#: meanwhile, where it counts them), ``"error"`` (any other Redis or network failure),
#: ``"deaf"`` (the liveness probe found it deaf; restarted once it delivered what it
#: held) or ``"unexpected"`` (not a Redis failure: a bug, logged with its traceback).
#: ``error`` is the exception (a ``redis.exceptions.ConnectionError`` for the first two
#: and ``"deaf"``).
subscriber_lost: NamedSignal = _signals.signal("subscriber_lost")
