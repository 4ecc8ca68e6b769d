"""Send to, query and act on connections anywhere in the cluster, without hosting any.

:class:`AsyncEmitter` holds every rule about selectors and channels that acts on the
cluster from outside a connection: the extension uses one, and so can a worker, a
script or another web framework. It never subscribes and never appears as an instance.

A built-in selector is resolved by Redis itself: a send is one script call that resolves
it and publishes one envelope per owning instance, and concurrent sends share that script
call and those publishes (:mod:`quart_wslb.batch`); :meth:`AsyncEmitter.send_many`
hands it many sends at once. A :class:`CustomSelector` is
evaluated over records read in bounded pages (:mod:`quart_wslb.queries`, which also
serves the queries), and its matches are then routed by id, a page at a time.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Self, cast

from redis.asyncio import Redis

from ._compat import check
from ._lua import source
from .cluster import cluster_client, is_cluster, pick_transport
from .config import EmitterOptions, default_instance_id, emitter_options, validated_instance_id
from .contract import NO_INSTANCES, OP_IDS, check_layout
from .envelope import KINDS, Kind, close_payload, head, pack
from .exceptions import (
    REDIS_FAILURES,
    NoInstancesError,
    ours,
    redis_deadline,
)
from .instances import InstanceInfo, live, read
from .keys import Keys
from .queries import Reader, Stream
from .records import ConnectionRecord
from .redis_client import checked_client, clustered, make_client, may_be_cluster
from .selectors import AllSelector, Program, Selector
from .shards import Routed, ShardedSends
from .signing import canonical
from .transport import Transport, another

__all__ = ("AsyncEmitter", "Receipt")

#: The default selector of the queries: every connection.
EVERYONE = AllSelector()
_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


@dataclass(frozen=True, slots=True)
class Receipt:
    """What one send (or disconnect) did."""

    message_id: str
    #: Connections the message was routed to.
    routed: int
    #: Instances that received an envelope.
    instances: int
    #: Owning instances whose channel nobody heard (dead or cut off).
    unheard: tuple[str, ...]


class AsyncEmitter:
    """Cluster-wide operations over one Redis and one prefix (asyncio).

    Give it a ``redis.asyncio.Redis`` client (kept open on :meth:`aclose`), or a
    ``redis_url``. ``redis_url``, ``prefix`` and ``timeout`` that are not given are read
    from the environment like the extension's options (``WSLB_REDIS_URL``,
    ``WSLB_PREFIX``, ``WSLB_REDIS_TIMEOUT``), else take their defaults (see
    :mod:`quart_wslb.config`). A client built from the URL holds at most
    ``max_connections`` (``WSLB_REDIS_MAX_CONNECTIONS``), and a call waits for a free
    one. Every Redis exchange of a call is bounded by ``timeout`` seconds from its start
    and raises :class:`~quart_wslb.RedisUnavailableError` past it. A ``strict`` emitter
    (the default) raises :class:`~quart_wslb.NoInstancesError` from sends and queries
    when no instance ever announced itself under the prefix (a wrong prefix); the
    extension's emitter is not strict, because right after Redis lost its data that is a
    normal, passing state.
    ``shards`` (``WSLB_SHARDS``) must be the instances' count; ``None`` takes one on one
    Redis, 16 on a Redis Cluster, which a URL naming any node of one is found to be at the
    first call (docs/deploy.md).
    With a ``secret`` (``"kid:secret,..."``, a ``{key id: secret}`` mapping or a
    :class:`~quart_wslb.signing.Keyring`; else ``WSLB_SECRET``), every message it
    publishes is signed with the first key, as instances with a secret require
    (``docs/security.md``).
    """

    #: Whether each message it sends carries its send time (Unix µs, this machine's
    #: clock), from which instances with :class:`quart_wslb.metrics.Metrics` measure
    #: send-to-deliver latency. Off by default: it costs a clock reading and ~20 bytes
    #: per message. ``Metrics`` turns it on for its app's own emitter.
    timestamps: bool = False

    def __init__(
        self,
        redis: Redis | None = None,
        *,
        redis_url: str | None = None,
        prefix: str | None = None,
        origin: str | None = None,
        timeout: float | None = None,
        strict: bool = True,
        max_connections: int | None = None,
        secret: object = None,
        shards: int | None = None,
    ) -> None:
        if redis is not None and redis_url is not None:
            raise TypeError("give at most one of redis and redis_url")
        options = emitter_options(
            redis_url=redis_url,
            prefix=prefix,
            timeout=timeout,
            max_connections=max_connections,
            secret=secret,
            shards=shards,
        )
        self._setup(options, redis, origin, strict)

    @classmethod
    def from_options(
        cls,
        options: EmitterOptions,
        redis: Redis | None = None,
        *,
        origin: str | None = None,
        strict: bool = True,
        transport: Transport | None = None,
    ) -> Self:
        """An emitter of options resolved already (:func:`~quart_wslb.config.emitter_options`),
        with ``redis`` as its client if given (then ``options.redis_url`` and
        ``options.max_connections`` go unused), sending through ``transport`` if given
        (one that :func:`~quart_wslb.transport.pick` chose for ``redis``)."""
        emitter = cls.__new__(cls)
        emitter._setup(options, redis, origin, strict, transport)
        return emitter

    def _setup(
        self,
        options: EmitterOptions,
        redis: Redis | None,
        origin: str | None,
        strict: bool,
        transport: Transport | None = None,
    ) -> None:
        """The construction proper, from resolved options."""
        if redis is not None:
            checked_client(redis)
        check()  # says, once, what the installed redis-py cannot do fast
        self._options = options
        self._owns_client = redis is None
        #: The id that envelopes from here carry as their origin.
        self.origin = validated_instance_id(origin or "emitter-" + default_instance_id())
        self.timeout = options.timeout
        #: Raise ``NoInstancesError`` where no instance announced itself under the prefix.
        self.strict = strict
        self._keyring = options.keyring
        self._layout_seen = False
        # A client made from the URL is told a Redis Cluster's at the first exchange.
        self._detected = redis is not None
        self._transport = transport
        #: Runs the sends; made at the first, on the transport (picked then, if not given).
        self._sends: ShardedSends | None = None
        self._picking = asyncio.Lock()
        # Concurrent first calls ask once: the first to learn of a cluster closes the
        # client that the others would still be asking on.
        self._detecting = asyncio.Lock()
        self._bind(
            redis or make_client(options.redis_url, options.timeout, options.max_connections)
        )

    def _bind(self, redis: Redis) -> None:
        """Use ``redis``: its names (a cluster's shards), its scripts (a cluster's
        publish on sharded channels), its reads."""
        self._redis = redis
        self.keys = Keys.of(self._options.prefix, redis, self._options.shards)
        sharded = clustered(redis)
        self._send = redis.register_script(source("send", sharded))
        self._count = redis.register_script(source("count"))
        self._reader = Reader(
            redis, self.keys, self.timeout, redis.register_script(source("match"))
        )
        self._membership = redis.register_script(source("membership", sharded))

    async def _detect(self) -> None:
        """Once, for a client made from the URL: a node of a Redis Cluster gets a
        cluster client instead (Redis out of reach: asked again at the next call)."""
        async with self._detecting:
            if not self._detected:
                await self._detect_now()

    async def _detect_now(self) -> None:
        options = self._options
        if not may_be_cluster(options.redis_url):
            self._detected = True
            return
        async with redis_deadline(self.timeout, "query"):
            found = await is_cluster(self._redis, self.timeout)
        self._detected = True
        if found:
            await self._redis.aclose()
            self._bind(
                cast(
                    Redis, cluster_client(options.redis_url, self.timeout, options.max_connections)
                )
            )

    async def aclose(self) -> None:
        """Give back the connection that sends use, and close the Redis client if this
        emitter created it."""
        if self._sends is not None:
            await self._sends.aclose()
        if self._owns_client:
            await self._redis.aclose()

    async def send(self, selector: Selector, message: object) -> int:
        """Send ``message`` to every connection ``selector`` matches; returns how many
        (exactly, or an upper bound for compound index selectors: see
        :meth:`WsLoadBalance.send <quart_wslb.WsLoadBalance.send>`).

        ``str`` is a text frame, ``bytes`` a binary frame, ``dict``/``list`` JSON text;
        anything else raises ``TypeError`` before anything is published. Raises
        :class:`~quart_wslb.NoInstancesError` when no instance ever announced itself
        under the prefix (a wrong prefix), rather than answering 0.
        """
        kind, payload = pack(message)
        return (await self._publish(selector, kind, payload)).routed

    async def send_many(self, messages: Iterable[tuple[Selector, object]]) -> list[int]:
        """Send each ``(selector, message)`` as :meth:`send` would, in order, in as few
        round trips as batching allows; returns each one's count of connections.

        Every pair is checked first: a bad selector or message raises ``TypeError``
        before anything is published. Built-in selectors' sends go out as script calls
        of up to ``MAX_CALLS`` sends, ``MAX_PIPELINE`` of them per round trip (10,000
        one-user sends: 79 script calls in 10 round trips), each round trip bounded by
        ``timeout`` from its own start, so the whole by ``timeout`` per round trip; a
        custom selector's send goes alone, between them, as :meth:`send` routes it.
        An error raises as :meth:`send`'s would (:class:`~quart_wslb.RedisUnavailableError`
        for Redis): then the sends before it were routed, and some after it may have
        been.
        """
        receipts = await self._publish_many(pack_many(messages))  # packed: valid already
        return [receipt.routed for receipt in receipts]

    async def publish_many(
        self, messages: Sequence[tuple[Selector, Kind, bytes]]
    ) -> list[Receipt]:
        """:meth:`publish` for each ``(selector, kind, payload)``, batched as
        :meth:`send_many` does; every one is checked before anything is published."""
        for selector, kind, payload in messages:
            _check(selector)
            _check_payload(kind, payload)
        return await self._publish_many(messages)

    async def _publish_many(
        self, messages: Sequence[tuple[Selector, Kind, bytes]]
    ) -> list[Receipt]:
        if messages and not self._layout_seen:
            async with redis_deadline(self.timeout, "send"):
                await self._check_layout()
        receipts: list[Receipt] = []
        start = 0
        for at, (selector, kind, payload) in enumerate(messages):
            if not selector.indexed:  # the built-in ones before it go first, in order
                receipts += await self._publish_indexed(messages[start:at])
                receipts.append(await self._publish(selector, kind, payload))
                start = at + 1
        receipts += await self._publish_indexed(messages[start:])
        return receipts

    async def _publish_indexed(
        self, messages: Sequence[tuple[Selector, Kind, bytes]]
    ) -> list[Receipt]:
        """The receipts of built-in selectors' messages, through ``GroupCommit.many``."""
        if not messages:
            return []
        ids: list[str] = []
        sends: list[tuple[Program, list[bytes | str], bool]] = []
        for selector, kind, payload in messages:
            message_id = os.urandom(8).hex()
            program = selector.compile(self.keys)
            fragment = self._fragment(message_id, kind, payload, program)
            ids.append(message_id)
            sends.append((program, [message_id, kind, payload, fragment], _heavy(program)))
        try:
            replies = await (self._sends or await self._first_sends()).many(sends)
        except REDIS_FAILURES as error:
            raise ours(error, "send") from error
        receipts = []
        for message_id, reply in zip(ids, replies, strict=True):
            if isinstance(reply, BaseException):
                if isinstance(reply, REDIS_FAILURES):
                    raise ours(reply, "send") from reply
                raise reply
            receipts.append(self._receipt(message_id, self._checked(reply)))
        return receipts

    async def disconnect(self, selector: Selector, code: int = 1000, reason: str = "") -> int:
        """Close every matching connection, on whichever instance owns it.

        Returns how many connections were told to close.
        """
        payload = close_payload(code, reason)
        return (await self._publish(selector, "disconnect", payload)).routed

    async def publish(self, selector: Selector, kind: Kind, payload: bytes) -> Receipt:
        """Publish one message of ``kind`` to the owners of the matching connections.

        Raises ``ValueError`` for an unknown ``kind`` or a payload that the receiving
        instances could not decode (text that is not UTF-8), before anything is
        published: concurrent sends share envelopes, and one bad message would cost the
        others theirs.
        """
        _check_payload(kind, payload)
        return await self._publish(selector, kind, payload)

    async def _publish(self, selector: Selector, kind: Kind, payload: bytes) -> Receipt:
        _check(selector)
        if not self._layout_seen:
            return await self._first_publish(selector, kind, payload)
        message_id = os.urandom(8).hex()
        if selector.indexed:
            routed = await self._publish_program(
                message_id, selector.compile(self.keys), kind, payload
            )
            return self._receipt(message_id, routed)
        # Pages of matches, by id: an instance may own connections on several pages.
        total = Routed(nobody=False)
        async for ids in self._matching_ids(selector):
            routed = await self._publish_program(message_id, _by_id(ids), kind, payload)
            total.routed += routed.routed
            total.reached |= routed.reached
            total.unheard |= routed.unheard
        return self._receipt(message_id, total)

    async def _first_publish(self, selector: Selector, kind: Kind, payload: bytes) -> Receipt:
        """:meth:`_publish` for a call made before the layout marker was read: it reads
        the marker first. A built-in selector's send gets one deadline for both, from its
        own start, as for any other send; a custom selector's reads pages, each (and so
        the marker) bounded on its own."""
        if not selector.indexed:
            await self._check_layout()
            return await self._publish(selector, kind, payload)
        async with redis_deadline(self.timeout, "send"):
            await self._check_layout()
            return await self._publish(selector, kind, payload)

    async def _publish_program(
        self, message_id: str, program: Program, kind: Kind, payload: bytes
    ) -> Routed:
        """What one send did (send.lua's replies, over the shards it went to); nothing
        when no instance ever announced itself."""
        fragment = self._fragment(message_id, kind, payload, program)
        try:  # GroupCommit bounds every round trip in time
            routed = await (self._sends or await self._first_sends()).send(
                program, [message_id, kind, payload, fragment], _heavy(program)
            )
        except REDIS_FAILURES as error:  # not redis_errors(): this is the hot path
            raise ours(error, "send") from error
        return self._checked(routed)

    async def _first_sends(self) -> ShardedSends:
        """The group commits of sends, made at the first (concurrent first sends wait for
        them), on the transport given or picked now, within ``timeout``: one for each
        shard, the others on what :func:`~quart_wslb.transport.another` gives (a
        cluster's transport serves them all)."""
        async with asyncio.timeout(self.timeout), self._picking:
            if self._sends is None:
                first = self._transport or await pick_transport(self._redis)
                transports = [first, *(another(first, self._redis) for _ in self.keys.views[1:])]
                self._sends = ShardedSends(
                    self.keys, transports, self._send, self.timeout, self.origin
                )
            return self._sends

    def _checked(self, routed: Routed) -> Routed:
        """``routed``, or ``NoInstancesError`` if strict when no instance ever announced
        itself."""
        if routed.nobody:
            self._no_instances()
        return routed

    @staticmethod
    def _receipt(message_id: str, routed: Routed) -> Receipt:
        """The :class:`Receipt` of a send."""
        unheard = tuple(sorted(name.decode() for name in routed.unheard)) if routed.unheard else ()
        return Receipt(message_id, routed.routed, routed.instances, unheard)

    def _fragment(self, message_id: str, kind: Kind, payload: bytes, program: Program) -> bytes:
        """What opens the message's entries (``send.lua``): its signature with a
        secret; else its selector, for the receivers to resolve, unless Redis resolves
        it to ids (:attr:`Program.exact`); then its send time with :attr:`timestamps`."""
        if self._keyring is not None:
            fragment = self._sign(message_id, kind, payload, program)
        elif program.exact:
            fragment = b""
        else:
            fragment = b'"sel":' + _dumps(canonical(program)).encode() + b","
        if self.timestamps:
            return fragment + b'"t":%d,' % (time.time_ns() // 1000)
        return fragment

    def _sign(self, message_id: str, kind: Kind, payload: bytes, program: Program) -> bytes:
        """The fragment that opens the message's entries: empty without a secret."""
        if self._keyring is None:
            return b""
        return self._keyring.fragment(self.origin, message_id, kind, payload, canonical(program))

    async def resolve(self, selector: Selector) -> dict[str, list[str]]:
        """``{instance id: [connection ids]}`` for every connection ``selector`` matches."""
        owners: dict[str, list[str]] = {}
        async for record in self.connections(selector):
            owners.setdefault(record.instance, []).append(record.id)
        return {instance: sorted(ids) for instance, ids in sorted(owners.items())}

    async def count(self, selector: Selector = EVERYONE) -> int:
        """How many connections in the cluster ``selector`` matches, exactly.

        One operand (a user, a connection, an index set, everyone) is one script call
        that reads no members; a compound selector is counted over its matches, read in
        bounded pages as :meth:`connections` reads them.
        """
        _check(selector)
        program = selector.compile(self.keys) if selector.indexed else None
        if program is None or len(program.ops) != 1:  # pages, each bounded on its own
            await self._check_layout()
            return sum([len(ids) async for ids in self._matching_ids(selector)])
        async with redis_deadline(self.timeout, "count"):  # one deadline, marker included
            await self._check_layout()
            counts = await self._count_shards(program)
        if all(count == NO_INSTANCES for count in counts):
            self._no_instances()
            return 0
        return sum(count for count in counts if count != NO_INSTANCES)

    async def _count_shards(self, program: Program) -> list[int]:
        """count.lua's count of one operand in each shard that may hold a match."""
        calls = []
        for shard in program.shards(self.keys.shards):
            view = self.keys.view(shard)
            keys = [view.users, view.instances, *(view.move(k) for k in program.keys)]
            calls.append(self._count(keys=keys, args=program.ops))
        return [int(count) for count in await asyncio.gather(*calls)]

    def _no_instances(self) -> None:
        """Nobody announced itself under the prefix: an error for a strict emitter."""
        if self.strict:
            raise NoInstancesError(
                f"no instance has announced itself under prefix {self.keys.prefix!r}: "
                "a wrong prefix, or the cluster is down"
            )

    async def _check_layout(self) -> None:
        """Raise if the prefix holds keys of another version's layout (read once: an
        empty prefix has nothing to misread, and instances of another layout refuse to
        start beside ours)."""
        if self._layout_seen:
            return
        if not self._detected:
            await self._detect()
        async with redis_deadline(self.timeout, "query"):
            async with self._redis.pipeline(transaction=False) as pipe:
                for view in self.keys.views:
                    pipe.get(view.layout)
                found = await pipe.execute()
        for layout in found:
            check_layout(self.keys.prefix, layout, self.keys.layout_value)
        self._layout_seen = True

    async def _check_instances(self) -> bool:
        """Whether any instance announced itself (raises instead, if strict)."""
        await self._check_layout()
        async with redis_deadline(self.timeout, "query"):
            present = bool(await self._redis.exists(self.keys.instances))
        if not present:
            self._no_instances()
        return present

    def connections(self, selector: Selector = EVERYONE) -> Stream[ConnectionRecord]:
        """The record of every matching connection, read in bounded pages.

        ``async for record in emitter.connections(s)`` streams them;
        ``await emitter.connections(s)`` collects them into a list.
        """
        _check(selector)
        return Stream(self._connection_pages(selector))

    async def _connection_pages(self, selector: Selector) -> AsyncIterator[list[ConnectionRecord]]:
        """The matching records, a page of candidates at a time (none if no instance)."""
        if await self._check_instances():
            async for page in self._reader.records(selector):
                yield page

    def users(self, selector: Selector = EVERYONE) -> Stream[str]:
        """The distinct users of the matching connections: ``async for`` or ``await``."""
        _check(selector)
        return Stream(self._user_pages(selector))

    async def _user_pages(self, selector: Selector) -> AsyncIterator[list[str]]:
        """The users first seen in each page (none if no instance)."""
        if await self._check_instances():
            async for page in self._reader.users(selector):
                yield page

    async def instances(self) -> list[InstanceInfo]:
        """Every live instance (id, start time, connections, messages received), sorted
        by id, as :meth:`WsLoadBalance.instances <quart_wslb.WsLoadBalance.instances>`
        lists them; empty, never ``NoInstancesError``, when none is live."""
        await self._check_layout()
        async with redis_deadline(self.timeout, "instances"):
            return live(await read(self.keys, self._run))

    async def _run(self, groups: Iterable[list[tuple[Any, ...]]]) -> list[Any]:
        """The replies of the commands, in one pipeline (no transaction: a cluster's
        shards are in several slots)."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for group in groups:
                for command in group:
                    pipe.execute_command(*command)
            return list(await pipe.execute())

    async def join(self, selector: Selector, group: str) -> int:
        """Add every matching connection to ``group``; returns how many matched."""
        return await self._change_membership("join", selector, group)

    async def leave(self, selector: Selector, group: str) -> int:
        """Remove every matching connection from ``group``; returns how many matched."""
        return await self._change_membership("leave", selector, group)

    async def _change_membership(self, action: Kind, selector: Selector, group: str) -> int:
        _check(selector)
        if not isinstance(group, str) or not group:
            raise TypeError("a group name must be a non-empty str")
        payload = group.encode()
        # Signed with the selector's program, or a page's ids for a custom selector; an
        # id per page, since an instance may own connections on several pages and
        # would refuse a second copy of one signed message as a replay.
        # So is each shard's part of a page (each shard's script call tells its owners).
        program = selector.compile(self.keys) if selector.indexed else None
        changed = 0
        async for page in self._matching_ids(selector):
            for view, ids in self.keys.split(page):
                message_id = os.urandom(8).hex()
                signature = self._sign(message_id, action, payload, program or _by_id(ids))
                start = head(message_id, self.origin, action, signature)
                async with redis_deadline(self.timeout, action):
                    changed += int(
                        await self._membership(
                            keys=[view.users, view.group(group)],
                            args=[action, group, view.channel(""), start, *ids],
                        )
                    )
        return changed

    async def _matching_ids(self, selector: Selector) -> AsyncIterator[list[str]]:
        async for records in self._connection_pages(selector):
            if records:
                yield [record.id for record in records]


def _by_id(ids: Sequence[str]) -> Program:
    """The program of ``ConnectionSelector(a) | ConnectionSelector(b) | ...``, as one op."""
    return Program(ops=[f"{OP_IDS}{len(ids)}", *ids])


def _heavy(program: Program) -> bool:
    """Whether a send may hold Redis long (a page of ids): then it runs in a script call
    of its own, so that a batch of them cannot stall everyone else's commands. Every
    other send costs Redis O(instances), plus a user's ids (``lua/send.lua``)."""
    ops = program.ops
    return len(ops) != 1 and any(op[:1] == OP_IDS for op in ops)


def pack_many(messages: Iterable[tuple[Selector, object]]) -> list[tuple[Selector, Kind, bytes]]:
    """``(selector, kind, payload)`` of each ``(selector, message)`` pair, as
    :meth:`AsyncEmitter.send` packs one; ``TypeError`` for a bad pair."""
    packed: list[tuple[Selector, Kind, bytes]] = []
    for pair in messages:
        if not isinstance(pair, tuple) or len(pair) != 2:
            raise TypeError("each item of send_many must be a (selector, message) tuple")
        _check(pair[0])
        packed.append((pair[0], *pack(pair[1])))
    return packed


def _check_payload(kind: object, payload: bytes) -> None:
    """Raise ``ValueError`` for an unknown ``kind`` or a payload receivers could not
    decode (text that is not UTF-8)."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}")
    if kind != "binary":
        try:
            payload.decode("utf-8")
        except (UnicodeDecodeError, AttributeError) as error:
            raise ValueError(f"a {kind} payload must be UTF-8 bytes") from error


def _check(selector: object) -> None:
    if not isinstance(selector, Selector):
        raise TypeError(f"selector must be a Selector, not {type(selector).__name__}")
