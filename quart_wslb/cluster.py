"""Redis Cluster: telling one apart, its client, and :class:`ClusterTransport`, the
:class:`~quart_wslb.transport.Transport` that spreads round trips and sharded
subscriptions over its masters.

:class:`ClusterTransport` keeps its own map of slots to masters, read with
``CLUSTER SLOTS`` from every known node at once (the first complete answer wins, so a
hung node costs nothing: redis-py asks its startup nodes one after the other, each
within the socket timeout). Each master gets a plain client of its own, made with the
cluster client's connection options (credentials, TLS, timeouts, protocol), on which
the single-Redis machinery runs unchanged: :class:`~quart_wslb.transport.SocketTransport`
for round trips, :class:`~quart_wslb.subscriber.StreamSubscription` (reading
``smessage`` pushes) for subscriptions.

Round trips: each command goes to the master of its key's slot (``EVALSHA``: its first
key; ``SPUBLISH``: its channel; see :func:`route`), every master's share pipelined, all
masters at once, replies in order. Unlike a single Redis's transport, it takes round
trips from several callers at once, and is shared rather than made again by
:func:`~quart_wslb.transport.another` (every shard's group commit, the liveness loop):
each master's shares of concurrent round trips go out together on one connection
(:class:`~quart_wslb.funnel.Funnel`), so an instance holds one connection per master
for them, whatever the number of shards. A command that Redis refused without running it
(``MOVED``, ``ASK``, ``TRYAGAIN``, ``CLUSTERDOWN``, or a connection that could not be
made, so nothing was written) is sent again where the refreshed map says, until
``timeout``; then its error is its reply. A command written to a connection that then
failed may have run: its error is returned at once, never sent twice. ``SCRIPT LOAD``
goes to every master, so ``NOSCRIPT`` handling (:mod:`quart_wslb.batch`) works on any.

Subscriptions: :meth:`ClusterTransport.subscribe` refreshes the map first (a caller
subscribes again after a loss: the new subscription goes to the new owners), then
``SSUBSCRIBE``s each channel on its master, one connection per master. It raises once
any of them is lost: a closed or failed connection, or an ``sunsubscribe`` that Redis
sends by itself when a slot leaves the master (reshard, failover). A hung master says
nothing: probes tell (:mod:`quart_wslb.probes`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Final

from redis.asyncio import BlockingConnectionPool, Connection, Redis
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot
from redis.exceptions import (
    AskError,
    ClusterDownError,
    RedisError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError

from ._compat import check
from .config import DEFAULTS
from .funnel import Funnel, SentError
from .sharded import ShardedSubscriptions
from .subscriber import Subscription
from .transport import ClientTransport, SocketTransport, Transport, pick

__all__ = (
    "EVERY_MASTER",
    "ClusterTransport",
    "cluster_client",
    "is_cluster",
    "route",
    "slot_of",
)

log = logging.getLogger("quart_wslb")
#: The hash slots of a Redis Cluster.
SLOTS: Final = 16384
#: A node: host and port.
Address = tuple[str, int]
#: What :func:`route` returns for a command that every master must run (``SCRIPT``).
EVERY_MASTER: Final = object()
#: Pause before sending again what a cluster in transition refused (a failover takes
#: the node timeout and an election; a reshard, the time of the migration).
RETRY_PAUSE = 0.1
#: Longest wait for the first complete ``CLUSTER SLOTS`` answer of a refresh.
REFRESH_TIMEOUT = 2.0
#: Commands whose keys follow their key count (``EVALSHA sha numkeys key...``).
_SCRIPT_CALLS = frozenset({"EVAL", "EVALSHA", "EVAL_RO", "EVALSHA_RO", "FCALL", "FCALL_RO"})
#: Commands that every master must run (script and function management).
_BROADCAST = frozenset({"SCRIPT", "FUNCTION"})
#: Sent before a command that an ``ASK`` redirected (its reply is dropped).
_ASKING: Final = ("ASKING",)


async def is_cluster(target: str | Redis, timeout: float = DEFAULTS["redis_timeout"]) -> bool:
    """Whether ``target`` (a Redis URL, or a client of one node) is a node of a Redis
    Cluster (``INFO cluster`` says ``cluster_enabled:1``). Redis's errors raise."""
    if not isinstance(target, str):
        async with asyncio.timeout(timeout):
            return bool((await target.info("cluster")).get("cluster_enabled"))
    client = Redis.from_url(target, socket_timeout=timeout, socket_connect_timeout=timeout)
    try:
        return await is_cluster(client, timeout)
    finally:
        await client.aclose()


def cluster_client(
    url: str, timeout: float, max_connections: int = DEFAULTS["redis_max_connections"]
) -> RedisCluster:
    """A Redis Cluster client for ``url`` (any node; credentials and ``rediss://`` as in
    the URL) whose connects and reads give up after ``timeout`` seconds, with at most
    ``max_connections`` connections per node. Replies stay bytes."""
    return RedisCluster.from_url(
        url,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        max_connections=max_connections,
    )


def slot_of(key: bytes | str | int | float) -> int:
    """The hash slot of ``key`` (or of a sharded channel): of its ``{hash tag}`` if any."""
    if isinstance(key, bytes):
        return key_slot(key)
    return key_slot(str(key).encode())


def route(command: Sequence[Any]) -> Any:
    """The key that decides where ``command`` runs: the first key of a script call (none
    when it has no key), nothing for a bare command name, :data:`EVERY_MASTER` for
    ``SCRIPT``/``FUNCTION``, else its first argument (a key, or ``SPUBLISH``'s channel).
    ``None``: any master."""
    name = _text(command[0]).upper()
    if name in _SCRIPT_CALLS:
        return command[3] if len(command) > 3 and int(command[2]) > 0 else None
    if name in _BROADCAST:
        return EVERY_MASTER
    return command[1] if len(command) > 1 else None


@dataclass(slots=True)
class _Round:
    """One attempt at the commands still to run: what to send where, and the outcome."""

    plan: dict[Address, list[int]]
    asking: dict[int, Address]
    retry: dict[int, BaseException] = field(default_factory=dict)
    refresh: bool = False


class ClusterTransport:
    """A :class:`~quart_wslb.transport.Transport` over the masters of a Redis Cluster
    (see the module's doc). ``client`` gives the startup nodes and the connection
    options; ``timeout`` bounds a round trip's retries and each master's share of it
    (default: four fifths of the client's socket timeout, so that a caller that waits the
    socket timeout gets the replies of the healthy masters)."""

    def __init__(self, client: RedisCluster, timeout: float | None = None) -> None:
        self._client = client
        options: dict[str, Any] = dict(client.get_connection_kwargs())
        self._connection_class: type[Connection] = options.pop("connection_class")
        self._max_connections = int(options.pop("max_connections", 32) or 32)
        for unused in ("response_callbacks", "host", "port"):
            options.pop(unused, None)
        self._options = options
        socket_timeout = options.get("socket_timeout") or DEFAULTS["redis_timeout"]
        self._timeout = float(timeout if timeout is not None else socket_timeout * 0.8)
        self._owners: list[Address | None] = []
        # The masters the map names, kept with it: each round trip asks (16384 slots).
        self._masters: list[Address] = []
        self._known: set[Address] = set()
        self._nodes: dict[Address, tuple[Redis, Funnel]] = {}
        self._refreshing: asyncio.Lock | None = None
        self._refresher: asyncio.Task[None] | None = None
        self._subscriptions = ShardedSubscriptions(lambda node: self._node(node)[0], self._timeout)

    # -- the map of slots ------------------------------------------------------------

    def owner(self, key: Any) -> Address | None:
        """The master that serves ``key``'s slot, as last read (``None``: unknown)."""
        return self._owners[slot_of(key)] if self._owners else None

    def masters(self) -> list[Address]:
        """The masters that serve slots, as last read."""
        return list(self._masters)

    async def refresh(self) -> None:
        """Read the map of slots again: ``CLUSTER SLOTS`` from every known node at once;
        the first answer that covers every slot wins (else the fullest within
        ``REFRESH_TIMEOUT``). ``RedisConnectionError`` if no node answered."""
        if self._refreshing is None:
            self._refreshing = asyncio.Lock()
        async with self._refreshing:
            if not self._known:
                await self._client.initialize()
                self._known = {(n.host, int(n.port)) for n in self._client.get_nodes()}
            answer = await self._first_answer(sorted(self._known))
            if answer is None:
                raise RedisConnectionError("no node of the Redis Cluster answered CLUSTER SLOTS")
            owners, nodes = answer
            self._take_map(owners)
            self._known |= nodes

    async def _first_answer(
        self, nodes: list[Address]
    ) -> tuple[list[Address | None], set[Address]] | None:
        tasks = {asyncio.ensure_future(self._slots_of(node)) for node in nodes}
        best: tuple[list[Address | None], set[Address]] | None = None
        deadline = asyncio.get_running_loop().time() + min(REFRESH_TIMEOUT, self._timeout)
        try:
            while tasks:
                remaining = deadline - asyncio.get_running_loop().time()
                if remaining <= 0:
                    break
                done, tasks = await asyncio.wait(
                    tasks, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
                )
                for task in done:
                    if task.exception() is not None:
                        continue
                    answer = task.result()
                    if best is None or _covered(answer[0]) > _covered(best[0]):
                        best = answer
                if best is not None and _covered(best[0]) == SLOTS:
                    break
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        return best

    async def _slots_of(self, node: Address) -> tuple[list[Address | None], set[Address]]:
        """``node``'s map of slots, and every node it names (replicas too)."""
        connection = self._connection_class(**self._options, host=node[0], port=node[1])
        try:
            async with asyncio.timeout(min(REFRESH_TIMEOUT, self._timeout)):
                await connection.connect()  # type: ignore[no-untyped-call]
                await connection.send_command("CLUSTER", "SLOTS")
                ranges = await connection.read_response()
        finally:
            await connection.disconnect(nowait=True)
        owners: list[Address | None] = [None] * SLOTS
        named: set[Address] = set()
        for first, last, *servers in ranges:
            addresses = [(_text(s[0]) or node[0], int(s[1])) for s in servers]
            named.update(addresses)
            owners[int(first) : int(last) + 1] = [addresses[0]] * (int(last) - int(first) + 1)
        return owners, named

    def _take_map(self, owners: Sequence[Address | None]) -> None:
        """Use ``owners`` as the map of slots, and the masters it names."""
        self._owners = list(owners)
        self._masters = sorted({owner for owner in owners if owner is not None})

    async def _mapped(self) -> None:
        if not self._owners:
            await self.refresh()

    def _node(self, address: Address) -> tuple[Redis, Funnel]:
        """The plain client of one master, and the funnel of its round trips."""
        node = self._nodes.get(address)
        if node is None:
            pool = BlockingConnectionPool(
                connection_class=self._connection_class,
                max_connections=self._max_connections,
                timeout=self._timeout,
                **self._options,
                host=address[0],
                port=address[1],
            )
            redis = Redis.from_pool(pool)
            transport: Transport = (
                SocketTransport(redis) if check().raw else ClientTransport(redis)
            )
            funnel = Funnel(transport, f"{address[0]}:{address[1]}")
            node = self._nodes[address] = (redis, funnel)
        return node

    # -- round trips ------------------------------------------------------------------

    def sibling(self) -> ClusterTransport:
        """The transport for another caller of round trips (another shard's group
        commit, the liveness loop): this one, which takes round trips from several
        callers at once on one connection per master (see the module's doc)."""
        return self

    async def ready(self) -> None:
        """Read the map if there is none: what every round trip waits for. Connecting is
        left to :meth:`run`, each master's within the round trip's deadline (in its
        :class:`~quart_wslb.funnel.Funnel`), since connecting to every master here would
        hold a caller whose commands go to healthy masters for the socket timeout of a
        hung one's handshake."""
        await self._mapped()

    async def run(self, commands: Sequence[Sequence[Any]]) -> list[Any]:
        """The replies to ``commands``, in order, each from the master of its slot (see
        the module's doc); an error reply, or a failure, is returned, not raised."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout
        await self._mapped()
        results: list[Any] = [None] * len(commands)
        todo, asking = list(range(len(commands))), dict[int, Address]()
        while todo:
            attempt = _Round(self._plan(commands, todo, asking), asking)
            await self._attempt(commands, attempt, results, deadline)
            todo, asking = sorted(attempt.retry), attempt.asking
            if todo and loop.time() + RETRY_PAUSE >= deadline:
                for index in todo:
                    results[index] = attempt.retry[index]
                todo = []
            if not todo:
                if attempt.refresh:  # for the next round trip: this one is answered
                    self._refresh_soon()
                break
            await asyncio.sleep(RETRY_PAUSE)
            if attempt.refresh:
                with contextlib.suppress(RedisError):
                    await self.refresh()
        return results

    def _refresh_soon(self) -> None:
        """Read the map again in the background (unless that is under way already)."""
        if self._refresher is None or self._refresher.done():
            self._refresher = asyncio.ensure_future(self._refresh_quietly())

    async def _refresh_quietly(self) -> None:
        try:
            await self.refresh()
        except RedisError as error:
            log.debug("reading the map of slots failed: %r", error)

    def _plan(
        self, commands: Sequence[Sequence[Any]], todo: list[int], asking: dict[int, Address]
    ) -> dict[Address, list[int]]:
        """Which master runs which commands (in order): a broadcast goes to all."""
        plan: dict[Address, list[int]] = {}
        masters = self.masters()
        for index in todo:
            key = route(commands[index])
            if index in asking:
                targets = [asking[index]]
            elif key is EVERY_MASTER:
                targets = masters
            else:
                owner = self.owner(key) if key is not None else masters[0] if masters else None
                targets = [owner] if owner is not None else masters[:1]
            for target in targets:
                plan.setdefault(target, []).append(index)
        return plan

    async def _attempt(
        self,
        commands: Sequence[Sequence[Any]],
        attempt: _Round,
        results: list[Any],
        deadline: float,
    ) -> None:
        """Run one round of the plan on every master at once; sort out the replies."""
        plan = attempt.plan
        asking, attempt.asking = attempt.asking, {}
        outcomes = await asyncio.gather(
            *(
                self._exchange(node, [commands[i] for i in indexes],
                               [i in asking for i in indexes], deadline)
                for node, indexes in plan.items()
            ),
            return_exceptions=True,
        )  # fmt: skip
        for (node, indexes), outcome in zip(plan.items(), outcomes, strict=True):
            if isinstance(outcome, BaseException) and not isinstance(outcome, Exception):
                raise outcome  # cancellation
            if isinstance(outcome, SentError):  # may have run: never again
                attempt.refresh = True
                for index in indexes:
                    results[index] = outcome.__cause__ or outcome
                    attempt.retry.pop(index, None)
            elif isinstance(outcome, Exception):  # nothing written: send again
                attempt.refresh = True
                for index in indexes:
                    attempt.retry[index] = outcome
            else:
                for index, reply in zip(indexes, outcome, strict=True):
                    self._sort(index, node, reply, attempt, results)

    def _sort(
        self, index: int, node: Address, reply: Any, attempt: _Round, results: list[Any]
    ) -> None:
        """File one reply: a result, or a redirection to follow."""
        redirect = _redirection(reply)
        if redirect is None:
            # A broadcast's first error stays its reply; else any node's reply will do.
            if not isinstance(results[index], BaseException):
                results[index] = reply
            return
        kind, slot, target = redirect
        attempt.retry[index] = reply
        if kind == "MOVED" and target is not None and slot is not None and self._owners:
            self._owners[slot] = target  # right at once; the rest at the refresh
            if target not in self._masters:
                self._masters = sorted([*self._masters, target])
            attempt.refresh = True
        elif kind == "ASK" and target is not None:
            attempt.asking[index] = target
        else:  # TRYAGAIN, CLUSTERDOWN: wait and see where the slot is then
            attempt.refresh = True

    async def _exchange(
        self, node: Address, commands: list[Sequence[Any]], asking: list[bool], deadline: float
    ) -> list[Any]:
        """One master's share, pipelined with the other callers' shares for that master
        (``SentError`` once written: see :class:`~quart_wslb.funnel.Funnel`);
        ``ASKING`` before each redirected command."""
        packed: list[Sequence[Any]] = []
        for command, ask in zip(commands, asking, strict=True):
            if ask:
                packed.append(_ASKING)
            packed.append(command)
        replies = await self._node(node)[1].run(packed, deadline)
        if any(asking):
            replies = [r for r, c in zip(replies, packed, strict=True) if c is not _ASKING]
        return replies

    async def release(self) -> None:
        """Hand every master's connection back to its pool (once its round trips are
        done)."""
        await asyncio.gather(*(funnel.release() for _, funnel in self._nodes.values()))

    async def aclose(self) -> None:
        """Close every master's client and parked subscription (the cluster client is
        the caller's)."""
        if self._refresher is not None:
            self._refresher.cancel()
            await asyncio.gather(self._refresher, return_exceptions=True)
        await self._subscriptions.aclose()
        nodes, self._nodes = list(self._nodes.values()), {}
        await asyncio.gather(*(funnel.aclose() for _, funnel in nodes), return_exceptions=True)
        await asyncio.gather(*(redis.aclose() for redis, _ in nodes), return_exceptions=True)

    # -- subscriptions ----------------------------------------------------------------

    @asynccontextmanager
    async def subscribe(self, channels: Sequence[str]) -> AsyncIterator[Subscription]:
        """``SSUBSCRIBE`` to ``channels`` on their masters, after reading the map again
        (see the module's doc); entered once every channel is confirmed. The
        subscription is a :class:`~quart_wslb.sharded.MergedSubscription`."""
        await self.refresh()
        groups: dict[Address, list[str]] = {}
        for channel in channels:
            owner = self.owner(channel)
            if owner is None:
                raise RedisConnectionError(f"no master serves the slot of {channel!r}")
            groups.setdefault(owner, []).append(channel)
        async with self._subscriptions.subscribe(groups) as subscription:
            yield subscription


def _covered(owners: list[Address | None]) -> int:
    return sum(owner is not None for owner in owners)


def _redirection(reply: Any) -> tuple[str, int | None, Address | None] | None:
    """``(kind, slot, node)`` when ``reply`` says the command did not run here and where
    to send it (``MOVED``, ``ASK``) or to wait (``TRYAGAIN``, ``CLUSTERDOWN``)."""
    if not isinstance(reply, ResponseError):
        return None
    if isinstance(reply, TryAgainError):
        return "TRYAGAIN", None, None
    if isinstance(reply, ClusterDownError):
        return "CLUSTERDOWN", None, None
    if isinstance(reply, AskError):  # MovedError too: redis-py parsed it already
        kind = "MOVED" if type(reply).__name__ == "MovedError" else "ASK"
        return kind, reply.slot_id, (reply.host, int(reply.port))
    kind, _, rest = str(reply).partition(" ")
    if kind in ("MOVED", "ASK"):
        slot, _, where = rest.partition(" ")
        host, _, port = where.rpartition(":")
        return kind, int(slot), (host, int(port))
    if kind in ("TRYAGAIN", "CLUSTERDOWN"):
        return kind, None, None
    return None


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


async def pick_transport(redis: Redis) -> Transport:
    """The transport for ``redis``: a :class:`ClusterTransport` for a Redis Cluster
    client, else what :func:`~quart_wslb.transport.pick` picks."""
    if isinstance(redis, RedisCluster):
        return ClusterTransport(redis)
    return await pick(redis)
