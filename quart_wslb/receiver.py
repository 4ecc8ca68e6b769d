"""The receiving side of an instance: its subscriber loop and local delivery.

Each instance subscribes to its own channel (envelopes for connections it owns; see
:mod:`quart_wslb.emitter` for the publishing side) and to the broadcast channel. The loop
is modelled on redis-py's ``PubSub.run``: it re-raises cancellation, and on any other
error logs (with the traceback when it is not a Redis failure), sends ``subscriber_lost``
with a reason, backs off and subscribes again; a probe that the liveness loop publishes
on the instance's own channel proves it still hears (see :mod:`quart_wslb.liveness`).
Whatever the connection holds is delivered before it is dropped: everything Redis sent
before closing it, and on a restart, whatever keeps arriving. On a Redis Cluster, a
restart for some shards drops only their masters' parts, drained, and at once (see
:mod:`quart_wslb.sharded`): the other masters' keep what they hold. It subscribes through
its :class:`~quart_wslb.transport.Transport`, whose subscription
(:mod:`quart_wslb.subscriber`) hands over every message that arrived at once.
A message either lists its targets (a user's or a connection's ids) or names its
selector, which is resolved here over this instance's own connections
(:class:`~quart_wslb.local_index.LocalIndex`). Control envelopes (join, leave,
disconnect) act on the local connections they select. With a secret, only signed
messages are delivered, each only to the targets its signed selector selects
(:mod:`quart_wslb.signing`).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable

from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from . import signals
from .cluster import pick_transport
from .connection import Connection
from .envelope import CONTROL_KINDS, Envelope, EnvelopeError, decode, read_close
from .exceptions import REDIS_FAILURES, describe
from .keys import Keys
from .local_index import LocalIndex
from .outgoing import Outgoing
from .positions import position_frame, wrap
from .recovery import HISTORY_LOST, TRY_AGAIN
from .redis_client import clustered
from .sharded import MergedSubscription
from .signal_sender import SignalSender
from .signing import Keyring, Verifier
from .subscriber import SubscriberClosedError, Subscription, output_buffer_cuts
from .transport import Transport, close

__all__ = ("Receiver",)

log = logging.getLogger("quart_wslb")
#: How long one read of the subscriber waits, so every iteration of the loop is bounded.
READ_TIMEOUT = 0.5
#: Probes start with a byte that no envelope starts with (an envelope starts with "{").
PROBE = b"\x00probe:"
BACKOFF_MIN, BACKOFF_MAX = 0.05, 2.0
#: Longest a restart waits for the subscriber to deliver what keeps arriving.
DRAIN_LIMIT = 5.0
#: Longest a restart then waits for Redis to confirm the unsubscription: a live one does
#: within a round trip; a frozen connection never does, and delays the new subscription.
UNSUBSCRIBE_WAIT = 0.25
#: How many recent message ids the count of messages received remembers (with several
#: shards), so that a send's copies from its shards count once: a few hundred kB at most.
RECENT_IDS = 4096


#: What each ``subscriber_lost`` reason (but ``"unexpected"``) costs this instance,
#: besides what is published until it listens again.
LOSSES = {
    "closed": "what Redis still held for it when it closed the connection (at most "
    "client-output-buffer-limit pubsub)",
    "output_buffer_limit": "what Redis still held for it (at most "
    "client-output-buffer-limit pubsub)",
    "error": "what was in flight",
    "deaf": "what was published while it heard nothing",
}


class SubscriberRestartedError(RedisConnectionError):
    """The subscriber was restarted for missing its probes (see :meth:`Receiver.restart`)."""


class Receiver:
    """Receives this instance's envelopes (its subscriber loop) and delivers their
    messages to its local connections; publishes only its own liveness probes.

    It subscribes through ``transport`` (the extension's, :func:`~quart_wslb.transport.pick`
    chose it at start); without one, :meth:`run` picks one for ``redis`` when it starts.
    """

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        instance: str,
        local: LocalIndex,
        sender: SignalSender,
        keyring: Keyring | None = None,
        transport: Transport | None = None,
    ) -> None:
        self._redis = redis
        self._transport = transport
        self._keys = keys
        self._instance = instance
        self._local = local
        self._sender = sender
        #: Set while this instance is subscribed to its channels.
        self.subscribed = asyncio.Event()
        # Monotonic time at which a restart was asked for; None if none was.
        self._restart: float | None = None
        # The shards whose channels went deaf, as the restart named them (None: all).
        self._deaf: set[int] | None = None
        # The callbacks' run after the last subscription (see _subscribed).
        self._followup: asyncio.Future[None] | None = None
        #: How many subscriptions were made: a probe's verdict holds only for the
        #: subscription it was published to.
        self.subscriptions = 0
        # Redis's count of output-buffer-limit cuts when we subscribed (None: unknown).
        self._cuts: int | None = None
        self._probe_sent = 0
        # Per shard, the last probe published and the last heard: probe n is shard
        # (n - 1) % shards's.
        self._probe_last = [0] * len(keys.views)
        self._probe_seen = [0] * len(keys.views)
        #: Monotonic time of the last message the subscriber received.
        self.last_message = time.monotonic()
        #: Messages taken off this instance's channels (probes aside), refused ones
        #: too: the heartbeat publishes it, for rates (``wslb watch``). With several
        #: shards a send reaches this instance as one envelope per shard that routed it,
        #: all of one message id: it counts once (see _count_messages).
        self.received = 0
        # The ids of the last messages counted, oldest first, and the same as a set:
        # a window, not every id ever seen, so memory stays bounded. The copies of one
        # send are published by one emitter call at once, so they arrive well within
        # RECENT_IDS messages of each other; a copy later than that would count again.
        self._recent_ids: deque[str] = deque(maxlen=RECENT_IDS)
        self._recent_set: set[str] = set()
        self._on_subscribed: list[Callable[[], Awaitable[None]]] = []
        self._on_subscribing: list[Callable[[], None]] = []
        #: Called with a recovery connection whose queue was full: it lags behind, and
        #: its messages come from the history (without it, it is closed: 1013).
        self.on_lagging: Callable[[Connection], None] | None = None
        self._keyring = keyring
        #: Checks every message when there is a secret; ``None``: everything is trusted.
        self._verifier = None if keyring is None else Verifier(keyring, keys)

    async def aclose(self) -> None:
        """Close the transport's own clients, if any (the loop is stopped)."""
        await self._stop_followup()
        await close(self._transport)

    def on_subscribing(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` at every (re)subscription, before the first message of it
        is delivered (it must not wait)."""
        self._on_subscribing.append(callback)

    def on_subscribed(self, callback: Callable[[], Awaitable[None]]) -> None:
        """Call ``callback`` after every (re)subscription, beside the delivery: in a task
        that the next subscription, or the loop's end, cancels (so it must let
        ``CancelledError`` through)."""
        self._on_subscribed.append(callback)

    def next_probe(self) -> bytes:
        """The next probe to publish on this instance's own channel, with one shard."""
        if len(self._probe_seen) != 1:
            raise RuntimeError("with several shards, publish next_probes(): one per shard")
        return self.next_probes()[0]

    def next_probes(self) -> list[bytes]:
        """The next probe of each shard, to publish on this instance's channel there."""
        probes = []
        for shard in range(len(self._probe_seen)):
            self._probe_sent += 1
            number = self._probe_last[shard] = self._probe_sent
            if self._keyring is not None:
                probes.append(PROBE + self._keyring.probe(self._instance, number))
            else:
                probes.append(PROBE + str(number).encode())
        return probes

    def missed_probes(self) -> int:
        """Probes published since the last one the subscriber received, on the shard's
        channel that missed the most."""
        shards = len(self._probe_seen)
        gaps = zip(self._probe_last, self._probe_seen, strict=True)
        return max(0, *((last - seen) // shards for last, seen in gaps))

    def silent_for(self) -> float:
        """Seconds since the subscriber last received anything (probes included)."""
        return time.monotonic() - self.last_message

    def restart(self, shards: Iterable[int] | None = None) -> None:
        """Subscribe again once the subscriber has delivered what it already holds.

        The loop reads on until the connection ends (Redis closed it: everything it sent
        is delivered) or no message comes for ``READ_TIMEOUT``, for at most
        ``DRAIN_LIMIT`` seconds; then it unsubscribes and delivers what came before Redis
        confirmed it (for at most ``UNSUBSCRIBE_WAIT``), subscribes again and sends
        ``subscriber_lost``.
        On a Redis Cluster the subscription ends at once instead: the parts holding the
        channels of the deaf ``shards`` (those a hung master holds; all when none are
        named) are drained and dropped, and the others are taken back unread.
        """
        named = None if shards is None else set(shards)
        if self._restart is None:
            self._restart, self._deaf = time.monotonic(), named
        elif self._deaf is not None:
            self._deaf = None if named is None else self._deaf | named

    async def run(self) -> None:
        """Subscribe and deliver until cancelled; no error other than cancellation ends it.

        Redis failures are routine: logged at WARNING, retried with backoff. Anything
        else is a bug: logged at ERROR with its traceback and retried after
        ``BACKOFF_MAX``, since an instance without a subscriber would accept clients it
        can never deliver to. Either way ``subscriber_lost`` says why.
        """
        channels = self._channels(range(len(self._keys.views)))
        delay = BACKOFF_MIN
        while True:
            since: float | None = None
            try:
                if self._transport is None:  # picked once, retried like a subscription
                    self._transport = await pick_transport(self._redis)
                # Before subscribing: Redis may cut the subscription as soon as it is
                # confirmed, and every cut after this read must count. A cluster
                # client's INFO tells of one node (maybe a hung one): not asked.
                if not clustered(self._redis):
                    self._cuts = await output_buffer_cuts(self._redis)
                async with self._transport.subscribe(channels) as subscription:
                    since = time.monotonic()
                    self._subscribed()
                    await self._listen(subscription)
            except asyncio.CancelledError:
                self.subscribed.clear()
                await self._stop_followup()
                raise
            except Exception as error:
                self.subscribed.clear()
                # Only a subscription that lived resets the backoff: one cut young (say,
                # for its output buffer under a flood, having delivered a little) is
                # the same failure again, not a fresh one.
                if since is not None and time.monotonic() - since > BACKOFF_MAX:
                    delay = BACKOFF_MIN
                if pause := await self._lost(error, delay):
                    await asyncio.sleep(pause * random.uniform(0.5, 1.0))
                    delay = min(pause * 2, BACKOFF_MAX)

    def _channels(self, shards: Iterable[int]) -> list[str]:
        """The channels of these shards: each routes its own connections' messages
        (:mod:`quart_wslb.keys`), on its own channels."""
        views = self._keys.views
        return [
            name
            for shard in shards
            for name in (views[shard].channel(self._instance), views[shard].broadcast)
        ]

    async def _listen(self, subscription: Subscription) -> None:
        """Dispatch every message in order until the subscription ends.

        Each read waits at most ``READ_TIMEOUT``. After :meth:`restart` the loop goes on
        while messages keep coming (see there), then raises
        :class:`SubscriberRestartedError`.
        """
        while True:
            batch = await subscription.read(READ_TIMEOUT)
            if batch:
                self.last_message = time.monotonic()
            for raw in batch:
                await self._dispatch_guarded(raw)
            asked = self._restart
            if asked is not None and isinstance(subscription, MergedSubscription):
                # Ended at once: the deaf parts are drained, the others parked unread.
                deaf = sorted(self._deaf or range(len(self._keys.views)))
                subscription.abandon(self._channels(deaf))
                raise SubscriberRestartedError(
                    f"the subscriber missed its probes on shards {deaf}"
                )
            if asked is not None and (not batch or time.monotonic() - asked > DRAIN_LIMIT):
                # Closed only once Redis confirmed an unsubscription: what it counted
                # as delivered before that arrives first (a frozen one: within the bound).
                for raw in await subscription.drain(UNSUBSCRIBE_WAIT):
                    await self._dispatch_guarded(raw)
                raise SubscriberRestartedError(
                    "the subscriber missed its probes; restarted "
                    + ("once it fell silent" if not batch else f"after {DRAIN_LIMIT}s")
                )

    async def _lost(self, error: Exception, delay: float) -> float:
        """Log and signal a lost subscription; returns the delay before the next try
        (none after a restart: the connection was fine, only deaf)."""
        reason = await self._reason(error)
        if reason == "deaf":
            delay = 0.0
        elif reason == "unexpected":
            delay = BACKOFF_MAX
            log.error(
                "the subscriber loop failed unexpectedly; subscribing again in %.2fs",
                delay,
                exc_info=error,
            )
        else:
            log.warning(
                "subscriber lost (%s: %s); lost for this instance: %s, and what is "
                "published until it listens again; subscribing again in %.2fs",
                reason,
                error,
                LOSSES[reason],
                delay,
            )
        await self._sender.send(signals.subscriber_lost, error=error, reason=reason)
        return delay

    async def _reason(self, error: Exception) -> str:
        if isinstance(error, SubscriberRestartedError):
            return "deaf"
        if isinstance(error, SubscriberClosedError):
            return await self._why_closed()
        if isinstance(error, REDIS_FAILURES):
            return "error"
        return "unexpected"

    async def _why_closed(self) -> str:
        """``"output_buffer_limit"`` if Redis counted one more client cut for its
        ``client-output-buffer-limit`` while we were subscribed (on servers that count
        them), else ``"closed"``."""
        before, self._cuts = self._cuts, None
        after = await output_buffer_cuts(self._redis) if before is not None else None
        cut = before is not None and after is not None and after > before
        return "output_buffer_limit" if cut else "closed"

    def _subscribed(self) -> None:
        """Mark the subscription live, and run the callbacks beside the listening: they
        talk to Redis (each bounded by its timeout), maybe to a master still hung, and
        delivery must not wait for them. A run still going from before is superseded."""
        self._restart = self._deaf = None
        self._probe_seen = [self._probe_sent] * len(self._probe_seen)
        self.subscriptions += 1
        for hook in self._on_subscribing:
            hook()
        self.subscribed.set()
        if self._followup is not None:
            self._followup.cancel()
        self._followup = asyncio.get_running_loop().create_task(
            self._after_subscribing(), name="wslb-after-subscribing"
        )

    async def _stop_followup(self) -> None:
        followup, self._followup = self._followup, None
        if followup is not None:
            followup.cancel()
            await asyncio.gather(followup, return_exceptions=True)

    async def _after_subscribing(self) -> None:
        for callback in self._on_subscribed:
            try:
                await callback()
            except REDIS_FAILURES as error:
                log.warning("after subscribing: %s", describe(error))
            except Exception:
                log.exception("a callback after subscribing failed")

    async def _dispatch_guarded(self, raw: bytes) -> None:
        """One bad publish must cost that publish, never the subscription."""
        try:
            await self.dispatch(raw)
        except Exception as error:
            log.exception("dropped a message that could not be handled")
            await self._sender.dropped("malformed", detail=repr(error))

    async def dispatch(self, raw: bytes) -> None:
        """Deliver every message of one publish to its local targets, in order; a
        malformed publish is logged and skipped, and so is (with a secret) every message
        that is not signed, signed badly or not fresh."""
        if raw.startswith(PROBE):
            await self._probe(raw[len(PROBE) :])
            return
        try:
            envelopes = decode(raw)
        except EnvelopeError as error:
            log.warning("dropped a malformed envelope: %s", error)
            await self._sender.dropped("malformed", detail=str(error))
            return
        if len(self._probe_seen) == 1:  # one shard: one envelope per message, no copies
            self.received += len(envelopes)
        else:
            self._count_messages(envelopes)
        verifier = self._verifier
        # One clock reading for the signed checks of the whole publish (Unix ms).
        now = 0 if verifier is None else time.time_ns() // 1_000_000
        for envelope in envelopes:
            try:  # one message's failure costs only that message, a signed one's too
                connections: list[Connection] | None = None
                if verifier is not None:
                    connections, gone, problems = self._admit(verifier, envelope, now)
                    for problem in problems:
                        await self._refuse(envelope, problem)
                    if envelope.kind not in CONTROL_KINDS:  # as unsigned: controls are quiet
                        for target in gone:
                            await self._gone(envelope, target)
                    if connections is None:
                        continue
                await self._deliver(envelope, connections)
            except Exception as error:
                log.exception("dropped message %s, which could not be handled", envelope.id)
                await self._sender.dropped("error", message_id=envelope.id, detail=repr(error))

    def _count_messages(self, envelopes: list[Envelope]) -> None:
        """Count the messages of one publish on one shard's channel, each once however
        many shards' copies of it arrive (they share the message's id)."""
        ids, seen = self._recent_ids, self._recent_set
        for envelope in envelopes:
            if envelope.id in seen:
                continue
            self.received += 1
            if len(ids) == ids.maxlen:  # the deque drops its oldest: so must the set
                seen.discard(ids[0])
            ids.append(envelope.id)
            seen.add(envelope.id)

    async def _probe(self, tail: bytes) -> None:
        """Count a probe as heard, unless it is one this instance never sent: a probe
        numbered past the last one published would hide every missed probe after it."""
        digits, _, signature = tail.partition(b":")
        if not digits.isdigit() or len(digits) > 20:
            await self._drop_probe("malformed", "not a probe number")
            return
        number = int(digits)
        if self._verifier is not None:
            problem = self._verifier.probe(self._instance, number, signature)
            if problem is not None:
                await self._drop_probe("bad_signature" if signature else "unsigned", problem)
                return
        if number > self._probe_sent:
            problem = f"probe {number} was never sent (last sent: {self._probe_sent})"
            await self._drop_probe("malformed", problem)
            return
        shard = (number - 1) % len(self._probe_seen)
        self._probe_seen[shard] = max(self._probe_seen[shard], number)

    async def _drop_probe(self, reason: str, problem: str) -> None:
        log.warning("dropped a probe: %s", problem)
        await self._sender.dropped(reason, detail=f"probe: {problem}")

    def _admit(
        self, verifier: Verifier, envelope: Envelope, now: int
    ) -> tuple[list[Connection] | None, list[str], list[str]]:
        """The local connections to deliver a message to (``None``: refused), its
        targets that have no local connection, and the problems to report.

        A message is delivered when it is authentic, fresh and new, only to the targets
        that its signed selector selects: the targets are Redis's work, not the sender's,
        so they carry no signature. Each is looked up and checked here, once, and
        delivery takes these very connections: one that appears later under a target id
        is never handed the message unchecked. Not a coroutine: it runs for every message.
        """
        problem = verifier.check(envelope, now)
        if problem is not None:
            return None, [], [problem]
        if envelope.targets is None:  # sent by its selector: the signed one, resolved here
            found = self._local.resolve(envelope.sel or [], envelope.shard)
            return (None, [], ["unreadable selector"]) if found is None else (found, [], [])
        match = verifier.selects(envelope.sel or [])
        if match is None or not envelope.targets:
            return None, [], ["unreadable selector, or no targets"]
        connections: list[Connection] = []
        gone: list[str] = []
        problems: list[str] = []
        local = self._local
        for target in envelope.targets:
            connection = local.get(target)
            if connection is None:
                gone.append(target)
            elif match(connection):
                connections.append(connection)
            else:
                problems.append(f"target outside the selector: {target}")
        admitted = connections or gone
        return connections if admitted else None, gone, problems

    async def _refuse(self, envelope: Envelope, problem: str) -> None:
        reason = "unsigned" if problem == "unsigned" else "bad_signature"
        log.warning("refused message %s from %s: %s", envelope.id, envelope.origin, problem)
        await self._sender.dropped(reason, message_id=envelope.id, detail=problem)

    async def _deliver(self, envelope: Envelope, connections: list[Connection] | None) -> None:
        """Hand a message to ``connections`` (those that :meth:`_admit` checked), or when
        ``None`` to its targets as they are looked up here, or to the local connections
        its selector selects when it lists no targets."""
        if signals.message_received.receivers:
            await self._sender.send(signals.message_received, envelope=envelope)
        if connections is None and envelope.targets is None:
            connections = self._local.resolve(envelope.sel or [], envelope.shard)
            if connections is None:
                log.warning("dropped message %s: unreadable selector", envelope.id)
                await self._sender.dropped(
                    "malformed", message_id=envelope.id, detail="unreadable selector"
                )
                return
        if envelope.kind in CONTROL_KINDS:
            await self._control(envelope, connections)
            return
        frame = Outgoing(envelope.frame, envelope.sent)  # one for every target: encoded once
        wrapped: Outgoing | None = None  # the same for recovery connections, once needed
        if connections is None:
            connections = []
            for target in envelope.targets or ():
                owner = self._local.get(target)
                if owner is not None and owner.recovery is None and owner.put_nowait(frame):
                    continue  # queued: the common case, with no coroutine
                if owner is None:
                    await self._gone(envelope, target)
                else:
                    connections.append(owner)
        for connection in connections:
            if connection.recovery is not None:
                wrapped = wrapped or Outgoing(
                    wrap(envelope.kind, envelope.frame, envelope.pos), envelope.sent
                )
                await self._recover(connection, envelope, wrapped)
            elif not connection.put_nowait(frame):
                await connection.offer(frame, envelope.id)

    async def _recover(
        self, connection: Connection, envelope: Envelope, wrapped: Outgoing
    ) -> None:
        """Hand a message to a recovery connection, wrapped with its position: held
        while its history is replayed. One numbered at or before what it already has
        means the history was renumbered (Redis lost it): closed (4410), its client
        resumes and is told."""
        recovery, pos = connection.recovery, envelope.pos
        if recovery is None:
            return
        if recovery.admit(pos, wrapped, envelope.id):
            if connection.put_nowait(wrapped):
                if pos is not None:
                    recovery.handed(pos)
            elif pos is not None and recovery.epoch and self.on_lagging is not None:
                recovery.lagging = True  # the history has it: handed at the client's pace
                self.on_lagging(connection)
            else:
                await connection.offer(wrapped, envelope.id)  # full: closed (1013)
        elif recovery.broken:
            await connection.close(HISTORY_LOST, "history lost: resume")
        elif recovery.unrecoverable:
            await connection.close(TRY_AGAIN, "send queue full")

    async def _mark(self, envelope: Envelope) -> None:
        """Where the shard's history ended when the mark was sent: every message before
        it reached this instance first, so each recovery connection of the shard that
        is not catching up is at least there (``{"t":"pos"}`` tells its client)."""
        shard = envelope.shard or 0
        for connection in list(self._local.values()):
            recovery = connection.recovery
            if recovery is None or recovery.keys.shard != shard:
                continue
            if recovery.mark(envelope.pos):
                connection.put_nowait(Outgoing(position_frame(recovery.position)))
            elif recovery.broken:
                await connection.close(HISTORY_LOST, "history lost: resume")

    async def _gone(self, envelope: Envelope, target: str) -> None:
        log.debug("message %s: no local connection %s", envelope.id, target)
        await self._sender.dropped("gone", message_id=envelope.id, detail=target)

    async def _control(self, envelope: Envelope, connections: list[Connection] | None) -> None:
        """Apply a join, leave or disconnect to ``connections`` (when ``None``: the
        local connections it lists)."""
        targets = connections
        if targets is None:
            ids = envelope.targets or []
            targets = [c for c in map(self._local.get, ids) if c is not None]
        text = str(envelope.frame)
        if envelope.kind == "mark":
            await self._mark(envelope)
        elif envelope.kind == "join":
            for connection in targets:
                self._local.join(connection, text)
        elif envelope.kind == "leave":
            for connection in targets:
                self._local.leave(connection, text)
        else:
            try:
                code, reason = read_close(text)
            except (ValueError, RecursionError) as error:
                log.warning("dropped disconnect %s: %s", envelope.id, error)
                await self._sender.dropped(
                    "malformed",
                    message_id=envelope.id,
                    detail=f"disconnect: {error!r}",
                )
                return
            for connection in targets:
                await connection.close(code, reason)
