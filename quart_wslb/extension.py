"""``WsLoadBalance``: the extension users wire into their Quart app."""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import secrets
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from quart import Quart, websocket
from redis.asyncio import Redis

from . import _compat, signals
from .asgi import ACTIVITY, GOING_AWAY, WebsocketGuard, quiet_cancelled_connections
from .client_liveness import ClientLiveness
from .cluster import pick_transport
from .config import QueueFullPolicy, Settings, UserGetter, redact_url, resolve_settings
from .connection import Activity, Connection
from .emitter import EVERYONE, AsyncEmitter, Receipt, pack_many
from .envelope import pack
from .exceptions import (
    REDIS_FAILURES,
    NotStartedError,
    RedisAuthenticationError,
    RedisUnavailableError,
    cancelled_meanwhile,
    describe,
    redis_deadline,
)
from .keys import Keys
from .liveness import InstanceInfo, Liveness
from .local_index import LocalIndex
from .outgoing import Outgoing
from .positions import Recovery
from .queries import Stream
from .receiver import Receiver
from .records import ConnectionRecord
from .recovery import (
    FIRST_FRAME_TIMEOUT,
    HISTORY_LOST,
    RESUMED_ELSEWHERE,
    TRY_AGAIN,
    Claim,
    HistoryGapError,
    Peek,
    Resume,
    ResumeRefusedError,
    Sessions,
    hand,
    parse_resume,
    release,
)
from .redis_client import checked_client, open_client
from .registry import Registry
from .selectors import ConnectionSelector, Selector
from .signal_sender import SignalSender
from .transport import Transport, another

__all__ = ("WsLoadBalance",)

log = logging.getLogger("quart_wslb")

#: Recovery sessions refreshed per round trip.
REFRESH_PAGE = 500
#: Seconds a changed session waits to be written with the others that change with it.
DIRTY_BATCH = 0.01


@dataclass(slots=True)
class _Runtime:
    """What exists only while the app is serving."""

    redis: Redis
    registry: Registry
    receiver: Receiver
    liveness: Liveness
    emitter: AsyncEmitter
    sessions: Sessions
    tasks: list[asyncio.Task[None]]


class WsLoadBalance:
    """Cluster-wide websocket messaging for one Quart app.

    Every keyword argument overrides the matching ``app.config["WSLB_*"]`` key, which
    overrides the environment variable of the same name, which overrides the default
    (see :mod:`quart_wslb.config`). Nothing connects until the app
    starts serving. ``redis`` takes a ready ``redis.asyncio.Redis`` client instead of
    ``redis_url`` (the caller keeps it: it is not closed on stop). ``secret``
    (``WSLB_SECRET``) makes the instance sign what it publishes and refuse what is not
    signed (``docs/security.md``).
    """

    def __init__(
        self,
        app: Quart | None = None,
        *,
        redis_url: str | None = None,
        instance_id: str | None = None,
        prefix: str | None = None,
        shards: int | None = None,
        max_message_size: int | None = None,
        send_queue_size: int | None = None,
        queue_full: QueueFullPolicy | None = None,
        redis_timeout: float | None = None,
        redis_max_connections: int | None = None,
        heartbeat_interval: float | None = None,
        instance_ttl: float | None = None,
        ping_interval: float | None = None,
        ping_message: str | bytes | None = None,
        idle_timeout: float | None = None,
        user: UserGetter | None = None,
        recovery_length: int | None = None,
        recovery_ttl: float | None = None,
        redis: Redis | None = None,
        secret: str | Mapping[str, str | bytes] | None = None,
    ) -> None:
        self._client = redis
        self._overrides: dict[str, Any] = {
            "redis_url": redis_url,
            "instance_id": instance_id,
            "prefix": prefix,
            "shards": shards,
            "max_message_size": max_message_size,
            "send_queue_size": send_queue_size,
            "queue_full": queue_full,
            "redis_timeout": redis_timeout,
            "redis_max_connections": redis_max_connections,
            "heartbeat_interval": heartbeat_interval,
            "instance_ttl": instance_ttl,
            "ping_interval": ping_interval,
            "ping_message": ping_message,
            "idle_timeout": idle_timeout,
            "user": user,
            "recovery_length": recovery_length,
            "recovery_ttl": recovery_ttl,
            "secret": secret,
        }
        self._settings: Settings | None = None
        # Recovery connections whose groups changed, for _refresh_sessions.
        self._dirty: set[Connection] = set()
        self._dirty_sessions = asyncio.Event()
        # The tasks that hand lagging recovery connections their history.
        self._following: set[asyncio.Task[None]] = set()
        self._sender = SignalSender(self)  # every signal names this extension
        # Keyed by the prefix's names: made again for the app's prefix by init_app.
        self._local = LocalIndex(Keys("wslb"))
        self._runtime: _Runtime | None = None
        #: Undoes ``quiet_cancelled_connections`` (installed while serving).
        self._unquiet: Callable[[], None] = lambda: None
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Quart) -> None:
        """Resolve the settings and hook into ``app``'s serving lifecycle."""
        if self._settings is not None:
            raise RuntimeError("this WsLoadBalance is already bound to an app")
        if self._client is not None:
            checked_client(self._client)
        if "wslb" in app.extensions:
            raise RuntimeError("the app already has a WsLoadBalance")
        self._settings = resolve_settings(self._overrides, app.config)
        self._local = LocalIndex(self._names())  # none held before serving
        app.extensions["wslb"] = self
        app.wslb = self  # type: ignore[attr-defined]
        app.asgi_app = WebsocketGuard(  # type: ignore[method-assign]
            app.asgi_app, self._settings.max_message_size, self._sender
        )
        app.before_serving(self._start)
        app.after_serving(self._stop)

    @property
    def settings(self) -> Settings:
        """The resolved settings (after ``init_app``)."""
        if self._settings is None:
            raise RuntimeError("WsLoadBalance is not bound to an app; call init_app(app)")
        return self._settings

    @property
    def instance_id(self) -> str:
        """This instance's id, unique in the cluster."""
        return self.settings.instance_id

    @property
    def keys(self) -> Keys:
        """The Redis key and channel names of this cluster (its database's, once serving)."""
        if self._runtime is not None:
            return self._runtime.emitter.keys
        return self._names()

    def _names(self) -> Keys:
        """The key names of the settings' prefix and shards, on database 0."""
        return Keys(self.settings.prefix, shards=self.settings.shards or 1)

    @property
    def local_connections(self) -> LocalIndex:
        """The connections this instance holds, by id (a read-only mapping; its
        :meth:`~quart_wslb.local_index.LocalIndex.snapshot` copies them at once)."""
        return self._local

    @property
    def emitter(self) -> AsyncEmitter:
        """The cluster operations behind :meth:`send` and the queries (while serving)."""
        return self._running().emitter

    async def send(self, selector: Selector, message: object) -> int:
        """Send ``message`` to every connection in the cluster that ``selector`` matches.

        ``str`` goes out as a text frame, ``bytes`` as a binary frame, ``dict``/``list``
        as JSON text. Returns how many connections it was routed to (0 when none match):
        exact for a user, a connection, a path, a group, one metadata pair and everyone,
        and for ``&`` with a user or connection side; for several metadata pairs and
        ``&``/``|`` of those index selectors, an upper bound (per instance, the smaller
        side's count for ``&``, the sum for ``|``), since Redis counts members per
        instance and never reads them on a send.
        Raises ``TypeError`` for any other message, before anything is published, and
        :class:`~quart_wslb.RedisUnavailableError` when Redis does not answer in time.
        """
        kind, payload = pack(message)
        receipt = await self.emitter.publish(selector, kind, payload)
        await self._routed(selector, receipt)
        return receipt.routed

    async def _routed(self, selector: Selector, receipt: Receipt) -> None:
        """Log a receipt's unheard owners; ``message_routed``, when someone listens."""
        if receipt.unheard:
            log.info("message %s: nobody listens for %s", receipt.message_id, receipt.unheard)
        if signals.message_routed.receivers:  # the hot path: no call when nobody listens
            await self._sender.send(
                signals.message_routed,
                message_id=receipt.message_id,
                selector=selector,
                routed=receipt.routed,
                instances=receipt.instances,
            )

    async def send_many(self, messages: Iterable[tuple[Selector, object]]) -> list[int]:
        """Send each ``(selector, message)`` as :meth:`send` would, in order, in as few
        round trips as batching allows; returns each one's count of connections.

        Every pair is checked before anything is published (``TypeError``). A Redis
        failure raises as :meth:`send`'s does; the sends before it were routed, and
        some after it may have been. See :meth:`AsyncEmitter.send_many
        <quart_wslb.AsyncEmitter.send_many>` for the batching and its time bound.
        ``message_routed`` is sent once per message, when someone listens.
        """
        packed = pack_many(messages)
        receipts = await self.emitter.publish_many(packed)
        for (selector, _, _), receipt in zip(packed, receipts, strict=True):
            await self._routed(selector, receipt)
        return [receipt.routed for receipt in receipts]

    async def disconnect(self, selector: Selector, code: int = 1000, reason: str = "") -> int:
        """Close every matching connection, on whichever instance owns it.

        Returns how many connections were told to close; each handler then ends and its
        connection leaves the registry.
        """
        return await self.emitter.disconnect(selector, code, reason)

    async def join(self, selector: Selector, group: str) -> int:
        """Add every matching connection, anywhere, to ``group``; returns how many."""
        return await self.emitter.join(selector, group)

    async def leave(self, selector: Selector, group: str) -> int:
        """Remove every matching connection, anywhere, from ``group``; returns how many."""
        return await self.emitter.leave(selector, group)

    async def count(self, selector: Selector = EVERYONE) -> int:
        """How many connections in the cluster ``selector`` matches."""
        return await self.emitter.count(selector)

    def connections(self, selector: Selector = EVERYONE) -> Stream[ConnectionRecord]:
        """The records of the matching connections, read in bounded pages.

        ``async for record in wslb.connections(s)`` streams them; ``await
        wslb.connections(s)`` collects them into a list.
        """
        return self.emitter.connections(selector)

    def users(self, selector: Selector = EVERYONE) -> Stream[str]:
        """The distinct users of the matching connections: ``async for`` or ``await``."""
        return self.emitter.users(selector)

    async def resolve(self, selector: Selector) -> dict[str, list[str]]:
        """``{instance id: [connection ids]}`` for the connections ``selector`` matches."""
        return await self.emitter.resolve(selector)

    async def instances(self) -> list[InstanceInfo]:
        """Every live instance of the cluster (id, start time, connections), from Redis."""
        runtime = self._running()
        async with redis_deadline(self.settings.redis_timeout, "instances"):
            return await runtime.liveness.instances()

    def _running(self) -> _Runtime:
        if self._runtime is None:
            raise NotStartedError("the app is not serving: WsLoadBalance is not started")
        return self._runtime

    async def _start(self) -> None:
        settings = self.settings
        _compat.check()  # says, once, what the installed redis-py cannot do fast
        timeout = settings.redis_timeout
        instance = settings.instance_id
        # Which Redis an instance uses is the first question when messages go nowhere,
        # and a plain WsLoadBalance(app) quietly means redis://127.0.0.1:6379/0.
        where = "the Redis client passed in" if self._client else redact_url(settings.redis_url)
        log.info("instance %s starts on %s, prefix %r", instance, where, settings.prefix)
        redis = self._client or await open_client(
            settings.redis_url, timeout, settings.redis_max_connections
        )
        keys = Keys.of(settings.prefix, redis, settings.shards)
        if keys.shards != self._local.names.shards:  # a cluster's: none held before serving
            self._local = LocalIndex(keys)
        registry = Registry(redis, keys)
        transport = await _pick(redis, timeout)
        receiver = Receiver(
            redis,
            keys,
            instance,
            self._local,
            self._sender,
            keyring=settings.secret,
            transport=transport,
        )
        liveness = Liveness(
            redis,
            keys,
            instance,
            interval=settings.heartbeat_interval,
            ttl=settings.instance_ttl,
            registry=registry,
            receiver=receiver,
            local=self._local,
            sender=self._sender,
            transport=None if transport is None else another(transport, redis),
            timeout=timeout,
        )
        # After Redis comes back (possibly empty), restore our records at once; then what
        # recovery connections missed meanwhile.
        receiver.on_subscribed(liveness.resubscribed)
        receiver.on_subscribing(self._hold_recovery)
        receiver.on_lagging = self._lagging
        receiver.on_subscribed(self._catch_up)
        try:
            await _first_beat(liveness, timeout)
        except BaseException:
            if redis is not self._client:
                await redis.aclose()
            raise
        tasks = [
            asyncio.create_task(receiver.run(), name="wslb-subscriber"),
            asyncio.create_task(liveness.run(), name="wslb-liveness"),
        ]
        clients = ClientLiveness(
            self._local,
            ping_interval=settings.ping_interval,
            ping_message=settings.ping_message,
            idle_timeout=settings.idle_timeout,
        )
        if clients.enabled:
            tasks.append(asyncio.create_task(clients.run(), name="wslb-clients"))
        # Not strict: right after Redis lost its data no instance is listed until this one
        # beats again, and sends then route to nobody rather than fail.
        emitter = AsyncEmitter.from_options(
            settings.emitter_options(), redis, origin=instance, strict=False, transport=transport
        )
        sessions = Sessions(
            redis,
            keys,
            length=settings.recovery_length,
            ttl=settings.recovery_ttl,
            timeout=timeout,
        )
        self._local.on_recovery_change = self._session_changed
        tasks.append(asyncio.create_task(self._refresh_sessions(sessions), name="wslb-sessions"))
        self._runtime = _Runtime(redis, registry, receiver, liveness, emitter, sessions, tasks)
        self._unquiet = quiet_cancelled_connections()  # Hypercorn cancels before _stop
        try:
            await asyncio.wait_for(receiver.subscribed.wait(), timeout)
        except TimeoutError:
            log.warning("not subscribed after %.1fs; still trying in the background", timeout)

    async def _stop(self) -> None:
        runtime = self._runtime
        if runtime is None:
            return
        self._unquiet()
        for connection in list(self._local.values()):
            await connection.close(GOING_AWAY, "server stopping")
        await _cancel([*runtime.tasks, *self._following])
        timeout = self.settings.redis_timeout
        try:  # first stop being routed to, then clean up (each step bounded on its own)
            async with redis_deadline(timeout, "stop"):
                await runtime.liveness.leave()
        except Exception as error:
            log.warning("could not remove this instance's heartbeat: %r", error)
        try:
            async with redis_deadline(timeout * 4, "stop"):
                removal = await runtime.registry.unregister_instance(self.instance_id)
                await runtime.liveness.delist()  # only now: records left get reaped
            await self._sender.presence([], removal.offline)
        except Exception as error:
            log.warning("could not unregister this instance's connections: %r", error)
        self._runtime = None
        await runtime.emitter.aclose()  # the client is runtime.redis, closed next if ours
        await runtime.liveness.aclose()
        await runtime.receiver.aclose()
        if runtime.redis is not self._client:
            await runtime.redis.aclose()

    @asynccontextmanager
    async def track(
        self,
        *,
        user: UserGetter | None = None,
        metadata: Callable[[], object] | None = None,
        accept: bool = True,
        recovery: bool = False,
    ) -> AsyncIterator[Connection]:
        """The current websocket as a registered connection, for the block's lifetime.

        What :func:`~quart_wslb.ws_route` does around a handler (its arguments are the
        decorator's): ``async with wslb.track() as connection:`` inside a websocket
        handler. Whatever interrupts it (the client leaving during registration, a
        failing receiver, cancellation), the connection leaves this instance and Redis.
        With ``recovery``, a client that does not open with a resume frame is closed
        (1008) and :class:`~quart_wslb.recovery.ResumeRefusedError` raised.
        """
        connection = await self._connection(user, metadata, accept)
        resume = await self._resume_frame(connection) if recovery else None
        peek = None if resume is None else await self._peek(connection, resume)
        # Local first, so that a message routed right after registering finds it.
        self._local.add(connection)
        try:
            await self._register(connection)
            connection.start()
            if resume is not None and peek is not None:
                await self._recover(connection, resume, peek)
            cancelled_meanwhile(asyncio.current_task())
            await self._sender.send(signals.connection_opened, connection=connection)
            yield connection
        finally:
            await asyncio.shield(self._forget(connection))

    async def _connection(
        self, user: UserGetter | None, metadata: Callable[[], object] | None, accept: bool
    ) -> Connection:
        """Run the getters (which may reject the socket), accept, and build the record."""
        settings = self.settings
        self._running()
        name = await _call(user or settings.user)
        if name is not None and not isinstance(name, str):
            raise TypeError(f"the user callable must return str or None, not {name!r}")
        pairs = _checked_metadata(await _call(metadata))
        if accept:
            await websocket.accept()
        return Connection(
            id=f"{settings.instance_id}:{self.keys.token(settings.instance_id, name or None)}",
            user=name or None,
            path=websocket.path,
            instance=settings.instance_id,
            metadata=pairs,
            websocket=websocket._get_current_object(),  # type: ignore[attr-defined]
            activity=_activity(websocket.scope.get(ACTIVITY)),
            queue_size=settings.send_queue_size,
            policy=settings.queue_full,
            sender=self._sender,
            membership=self,
            index=self._local,
        )

    async def _refresh_sessions(self, sessions: Sessions) -> None:
        """Keep the sessions of this instance's recovery connections fresh: at once (in
        a batch) those whose groups changed, and all of them (their TTL) every
        ``sessions.refresh_every``, each shard then marked (:meth:`_mark`). Nothing but
        cancellation ends it."""
        loop = asyncio.get_running_loop()
        due = loop.time() + sessions.refresh_every
        while True:
            full = False
            try:
                async with asyncio.timeout(max(0.0, due - loop.time())):
                    await self._dirty_sessions.wait()
                await asyncio.sleep(DIRTY_BATCH)  # the joins of one handler step, together
                connections = [c for c in self._dirty if self._local.get(c.id) is c]
            except TimeoutError:
                due, full = loop.time() + sessions.refresh_every, True
                connections = [c for c in self._local.values() if c.recovery is not None]
            self._dirty.clear()
            self._dirty_sessions.clear()
            try:
                await self._refresh_pages(sessions, connections, mark=full)
            except Exception as error:  # an error reply, say: the next change tries again
                log.warning("could not refresh recovery sessions: %s", describe(error))
                self._dirty.update(c for c in connections if c.recovery is not None)

    async def _refresh_pages(
        self, sessions: Sessions, connections: list[Connection], *, mark: bool
    ) -> None:
        """Refresh ``connections``' sessions, a page per round trip; with ``mark``, then
        mark each shard they are in."""
        shards: dict[Keys, Connection] = {}
        for start in range(0, len(connections), REFRESH_PAGE):
            page = connections[start : start + REFRESH_PAGE]
            async with redis_deadline(self.settings.redis_timeout, "refresh sessions"):
                await sessions.refresh(page)
            for connection in page:
                if connection.recovery is not None:
                    shards.setdefault(connection.recovery.keys, connection)
        if mark:
            for connection in shards.values():
                await self._mark(connection)

    async def _mark(self, connection: Connection) -> None:
        """Send a mark through ``connection``'s shard (routed by its id to this
        instance): its position is where the history ends, and it arrives after every
        message before that, so each recovery connection of the shard moves on to it.
        A quiet client's position would otherwise fall out of the history it keeps."""
        emitter = self._running().emitter
        await emitter.publish(ConnectionSelector(connection.id), "mark", b"")

    def _hold_recovery(self) -> None:
        """The subscriber (re)subscribed: hold the recovery connections' live messages
        until :meth:`_catch_up` has filled what they may have missed."""
        for connection in self._local.values():
            if connection.recovery is not None:
                connection.recovery.hold()

    async def _catch_up(self) -> None:
        """After the subscriber (re)subscribed: hand the recovery connections what they
        may have missed while it was not listening, from history. Those whose history
        is lost are closed with 4410, and if Redis fails here all of them with 1013:
        either way their clients resume, and get what was missed or are told."""
        runtime = self._runtime
        connections = [c for c in self._local.values() if c.recovery and c.recovery.catching]
        if runtime is None or not connections:
            return
        try:
            lost = await runtime.sessions.catch_up(connections)
        except Exception as error:  # Redis's or the history's: their clients resume
            log.warning("could not catch up %d recovery connections: %r", len(connections), error)
            for connection in connections:
                if connection.recovery is not None and connection.recovery.catching:
                    await connection.close(TRY_AGAIN, "catching up failed: resume")
            return
        for connection in lost:
            await connection.close(HISTORY_LOST, "history lost: resume")

    def _lagging(self, connection: Connection) -> None:
        """A recovery connection's queue was full: a task hands it its history at the
        pace it reads (:meth:`Sessions.follow`), rather than closing it."""
        task = asyncio.create_task(self._follow(connection), name=f"wslb-follow-{connection.id}")
        self._following.add(task)
        task.add_done_callback(self._following.discard)

    async def _follow(self, connection: Connection) -> None:
        runtime = self._running()
        receiver = runtime.receiver
        try:
            whole = await runtime.sessions.follow(connection, lambda: receiver.subscriptions)
        except Exception as error:  # too slow (TimeoutError), or Redis's: it resumes
            log.info("%s lagged and could not catch up: %r", connection.id, error)
            await connection.close(TRY_AGAIN, "send queue full")
            return
        if not whole:
            await connection.close(HISTORY_LOST, "history lost: resume")

    def _session_changed(self, connection: Connection) -> None:
        """A recovery connection's groups changed: its session is rewritten soon."""
        self._dirty.add(connection)
        self._dirty_sessions.set()

    async def _resume_frame(self, connection: Connection) -> Resume:
        """The client's first frame, which must be a resume frame."""
        try:
            async with asyncio.timeout(FIRST_FRAME_TIMEOUT):
                frame = await websocket.receive()
        except TimeoutError:
            frame = None
        resume = None if frame is None else parse_resume(frame)
        if resume is None:
            await websocket.close(1008, "expected a resume frame first")
            raise ResumeRefusedError(f"{connection.id}: no resume frame first")
        return resume

    async def _peek(self, connection: Connection, resume: Resume) -> tuple[Peek, Keys, str]:
        """Read the session to resume (and the history's end) before registering, so
        the connection registers in the session's groups; pick the session id, and for
        a session without a user a connection id in its shard."""
        sessions = self._running().sessions
        user, instance = connection.user, self.settings.instance_id
        session = resume.session or sessions.new_session(user, connection.id)
        view = sessions.view(user, session)
        if user is None and resume.session is not None:
            connection.id = f"{instance}:{self.keys.token(instance, None, view.shard)}"
        async with redis_deadline(self.settings.redis_timeout, "resume"):
            peek = await sessions.peek(view, user, connection.path, resume)
        if peek.record is not None:
            connection.groups = {str(g) for g in peek.record.get("g") or ()}
        connection.recovery = Recovery(view, session)
        return peek, view, session

    async def _recover(
        self, connection: Connection, resume: Resume, peeked: tuple[Peek, Keys, str]
    ) -> None:
        """Claim the session, send the welcome frame, replay the history, then the live
        messages held meanwhile; close the session's previous owner."""
        peek, view, session = peeked
        runtime = self._running()
        sessions, subscriptions = runtime.sessions, runtime.receiver.subscriptions
        recovery = connection.recovery
        assert recovery is not None
        claim = await self._claim(connection, resume, peek, view, session)
        recovery.session, recovery.epoch, recovery.ids = claim.session, claim.epoch, claim.ids
        recovery.handed(claim.start)
        pages = sessions.replay(claim, view)
        first: list[tuple[str, Outgoing]] = []
        try:  # the first page before the welcome: a position the history lacks is told
            first = await anext(pages, [])
        except HistoryGapError:
            claim.recovered, claim.start = False, claim.end
            recovery.handed(claim.end)
            first, pages = [], _nothing()
        welcome = {
            "t": "welcome",
            "session": claim.session,
            "token": claim.token,
            "epoch": claim.epoch,
            "pos": claim.start,
            "recovered": claim.recovered,
            "end": claim.end,
        }
        await connection.put(json.dumps(welcome, separators=(",", ":")))
        try:
            for page in [first]:
                await hand(connection, page)
            async for page in pages:
                await hand(connection, page)
        except HistoryGapError as error:  # trimmed while replaying: the client resumes
            log.info("%s: %s", connection.id, error)
            await connection.close(HISTORY_LOST, "history lost: resume")
            return
        if runtime.receiver.subscriptions != subscriptions:  # it resubscribed meanwhile
            recovery.catching = True
            if await sessions.catch_up([connection]):
                await connection.close(HISTORY_LOST, "history lost: resume")
                return
        await release(connection)
        if claim.old and claim.old != connection.id:
            try:
                await self.disconnect(
                    ConnectionSelector(claim.old), RESUMED_ELSEWHERE, "session resumed elsewhere"
                )
            except RedisUnavailableError as error:
                log.warning("could not close %s (session resumed): %s", claim.old, error)

    async def _claim(
        self, connection: Connection, resume: Resume, peek: Peek, view: Keys, session: str
    ) -> Claim:
        """Resume the session the client named if it may be, else start a new one."""
        sessions = self._running().sessions
        token = resume.token if resume.session is not None else secrets.token_urlsafe(24)
        async with redis_deadline(self.settings.redis_timeout, "resume"):
            claim = None
            if peek.record is not None:
                claim = await sessions.claim(connection, view, session, token, resume, peek)
            if claim is None:  # a new session, or one that may not be resumed
                if resume.session is not None:
                    session = sessions.new_session(connection.user, connection.id)
                    token = secrets.token_urlsafe(24)
                claim = await sessions.claim(connection, view, session, token, Resume(), peek)
                assert claim is not None
                claim.recovered = resume.session is None
        return claim

    async def _register(self, connection: Connection) -> None:
        try:
            async with redis_deadline(self.settings.redis_timeout, "register"):
                online = await self._running().registry.register(connection)
            await self._sender.presence(online, [])
        except RedisUnavailableError as error:
            # The connection works locally; the next repair registers it.
            log.warning("%s opened while Redis is unreachable: %s", connection.id, error)
        finally:
            connection.registering = False

    async def _forget(self, connection: Connection) -> None:
        self._local.discard(connection)
        await connection.stop()
        runtime = self._runtime
        if runtime is not None and connection.recovery is not None:
            try:  # its window starts now
                async with redis_deadline(self.settings.redis_timeout, "session"):
                    await runtime.sessions.refresh([connection])
            except Exception as error:
                log.warning("could not refresh the session of %s: %r", connection.id, error)
        if runtime is not None:
            try:
                async with redis_deadline(self.settings.redis_timeout, "unregister"):
                    removal = await runtime.registry.unregister([connection.id])
                await self._sender.presence([], removal.offline)
            except Exception as error:
                log.warning("could not unregister %s: %r", connection.id, error)
        await self._sender.send(signals.connection_closed, connection=connection)


async def _nothing() -> AsyncIterator[list[tuple[str, Outgoing]]]:
    """No pages."""
    return
    yield


async def _pick(redis: Redis, timeout: float) -> Transport | None:
    """The transport for ``redis`` (:func:`~quart_wslb.transport.pick`); ``None`` while
    Redis is out of reach, and then the receiver and the emitter each pick one when they
    first reach it."""
    try:
        async with asyncio.timeout(timeout):
            return await pick_transport(redis)
    except REDIS_FAILURES as error:
        log.warning("transport not picked yet (%s); picked when Redis answers", describe(error))
        return None


async def _first_beat(liveness: Liveness, timeout: float) -> None:
    """Announce the instance; Redis being out of reach is no reason not to start (it is
    retried in the background), but refused credentials are: retrying cannot help."""
    try:
        async with redis_deadline(timeout, "start"):
            await liveness.beat()
    except RedisAuthenticationError:
        raise
    except RedisUnavailableError as error:
        log.warning("starting without Redis (%s); retrying in the background", error)


async def _call(getter: Callable[[], object] | None) -> object:
    """Run a sync or async callable in the websocket context (sync ones inline)."""
    if getter is None:
        return None
    value = getter()
    if inspect.isawaitable(value):
        value = await value
    return value


def _activity(found: object) -> Activity | None:
    return found if isinstance(found, Activity) else None


def _checked_metadata(pairs: object) -> dict[str, str]:
    if pairs is None:
        return {}
    if not isinstance(pairs, Mapping):
        raise TypeError(f"the metadata callable must return a mapping, not {pairs!r}")
    for name, value in pairs.items():
        if not isinstance(name, str) or not isinstance(value, str) or not name:
            raise TypeError(f"metadata must map non-empty str to str, not {name!r}: {value!r}")
    return dict(pairs)


async def _cancel(tasks: list[asyncio.Task[None]], attempts: int = 5) -> None:
    """Cancel and wait, again if a cancellation was swallowed; bounded in time."""
    pending = set(tasks)
    for _ in range(attempts if pending else 0):
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=1.0)
        if not pending:
            return
    log.warning("background tasks did not stop: %s", [t.get_name() for t in pending])
