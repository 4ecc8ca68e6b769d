"""Instance liveness: heartbeats, the sweep that reaps dead instances, and self-repair.

Every ``WSLB_HEARTBEAT_INTERVAL`` one bounded tick of :class:`Liveness` does, in order:

1. **beat**: refresh ``hb:<id>`` (TTL ``WSLB_INSTANCE_TTL``) and the ``instances`` record,
   read how many records Redis holds for this instance, and publish a probe on this
   instance's own channel; all one round trip.
2. **probe check**: if nobody heard the probe, or the subscriber has missed the last two,
   the subscriber is restarted (a killed or silently dead pub/sub connection), once it
   has delivered what its connection still holds (see :meth:`Receiver.restart`).
3. **repair**: if Redis holds a different number of records than this instance has live
   connections (Redis restarted and lost its data, an unregister failed, the instance was
   reaped while cut off), :meth:`Registry.reconcile` makes them agree; a full
   reconciliation also runs every ``FULL_REPAIR_EVERY`` ticks.
4. **sweep**: every instance whose heartbeat expired is reaped by exactly one survivor
   (a lock taken in a script that first checks the heartbeat again).

Correctness never depends on keyspace notifications (managed Redis often forbids them).
With several shards (:class:`~quart_wslb.keys.Keys`), an instance beats, probes and is
listed in every shard, and each shard of a dead instance is reaped on its own: a shard
is a registry of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable
from typing import Any

from redis.asyncio import Redis

from . import signals
from ._lua import source
from .cluster import pick_transport
from .contract import check_layout
from .exceptions import REDIS_FAILURES, WsLoadBalanceError, describe
from .instances import InstanceInfo, live, read, record
from .keys import Keys
from .local_index import LocalIndex
from .receiver import Receiver
from .redis_client import clustered
from .registry import Registry, Removal
from .signal_sender import SignalSender
from .transport import Transport, close

__all__ = ("FULL_REPAIR_EVERY", "InstanceInfo", "Liveness")

log = logging.getLogger("quart_wslb")
#: Every this many ticks the registry is reconciled in full, even when counts agree.
FULL_REPAIR_EVERY = 15
#: Probes the subscriber may miss before it is restarted.
MISSED_PROBES = 2


class Liveness:
    """The per-instance liveness loop (see the module docstring)."""

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        instance: str,
        *,
        interval: float,
        ttl: float,
        registry: Registry,
        receiver: Receiver,
        local: LocalIndex,
        sender: SignalSender,
        transport: Transport | None = None,
        timeout: float = 0.0,
    ) -> None:
        self._redis = redis
        #: Redis's timeout (``WSLB_REDIS_TIMEOUT``), on top of a tick's own bound.
        self._timeout = timeout
        #: On one Redis (or Sentinel's master), a connection of its own, one round trip
        #: at a time; on a cluster, the instance's ClusterTransport, shared with the
        #: sends. Picked at the first beat if not given.
        self._transport = transport
        self._one_at_a_time = asyncio.Lock()
        self._keys = keys
        self._instance = instance
        self._interval = interval
        self._ttl_ms = int(ttl * 1000)
        self._registry = registry
        self._receiver = receiver
        self._local = local
        self._sender = sender
        self._reap = redis.register_script(source("reap"))
        self._delist = redis.register_script(source("delist"))
        self._ticks = 0
        self._layout_seen = False
        #: Whether the groups must still be taken from Redis after a resubscription.
        self._regroup_due = False
        self._known: set[str] = set()
        # Monotonic time since which every tick reached Redis; None after a failed one.
        self._healthy_since: float | None = None
        self.started_at = time.time()

    async def run(self) -> None:
        """Tick every interval until cancelled; a failed tick is logged (with its
        traceback unless Redis failed), never fatal."""
        while True:
            started = time.monotonic()
            try:
                # Room for Redis's own timeout to fire inside a tick: a client cut short
                # by cancellation would not learn that a cluster's master hangs.
                async with asyncio.timeout(max(self._interval, 1.0) * 2 + self._timeout):
                    await self.tick()
            except asyncio.CancelledError:
                raise
            except (*REDIS_FAILURES, WsLoadBalanceError) as error:
                self._healthy_since = None
                log.warning("liveness tick failed: %s", describe(error))
            except Exception:  # a bug: its traceback, and the next tick tries again
                self._healthy_since = None
                log.exception("liveness tick failed unexpectedly")
            await asyncio.sleep(max(0.0, self._interval - (time.monotonic() - started)))

    async def tick(self) -> None:
        """One beat, probe check, repair and sweep."""
        self._ticks += 1
        # A probe published while the subscriber was still (re)subscribing tells nothing
        # of it (on a cluster, the first beat often outruns the first subscription): it
        # is subscribing already, and a restart asked for just after it subscribed would
        # drop that fresh subscription, and what is published while it subscribes again.
        listening = self._receiver.subscribed.is_set()
        subscription = self._receiver.subscriptions
        registered, listeners = await self.beat()
        heard = min(listeners)
        # ... nor of one made while the probe was out: it tested the one before.
        still = self._receiver.subscribed.is_set() and self._receiver.subscriptions == subscription
        listening = listening and still
        if self._healthy_since is None:
            self._healthy_since = time.monotonic()
        # Deaf: unsubscribed, or probes missed while nothing at all arrives. A subscriber
        # that lags behind a backlog still receives, and restarting it would drop that.
        deaf = self._receiver.missed_probes() >= MISSED_PROBES
        if listening and (heard == 0 or (deaf and self._receiver.silent_for() > self._interval)):
            log.warning(
                "subscriber is deaf (probe heard by %d); restarting it once it has "
                "delivered what it holds",
                heard,
            )
            # Some shards unheard (their beat failed: a cluster's hung master): only
            # theirs are dropped, the others' subscriptions stay. Else all are drained.
            unheard = [shard for shard, count in enumerate(listeners) if count == 0]
            self._receiver.restart(unheard if 0 < len(unheard) < len(listeners) else None)
        if registered != len(self._local) or self._ticks % FULL_REPAIR_EVERY == 0:
            await self.repair()
        if self._regroup_due:  # a resubscription's regroup that Redis cut short
            await self.regroup()
        await self.sweep()

    async def beat(self) -> tuple[int, list[int]]:
        """Refresh the heartbeat; returns (records Redis holds for us, probe listeners of
        each shard: 0 where the probe failed).

        Raises :class:`~quart_wslb.WsLoadBalanceError`, announcing nothing, when the
        prefix holds keys of another layout (another version of quart-wslb).
        """
        keys, me = self._keys, self._instance
        mine = record(self.started_at, self._receiver.received, time.time())
        layout = [
            [("SETNX", view.layout, keys.layout_value), ("GET", view.layout)]  # SET NX GET: 7.0
            for view in keys.views
        ]
        if not self._layout_seen:  # the first beat announces nothing before it checked
            self._check_layouts(await self._run(layout))
            self._layout_seen = True
        publish = "SPUBLISH" if clustered(self._redis) else "PUBLISH"
        probes = self._receiver.next_probes()
        beat = [
            [
                *marker,
                ("SET", view.heartbeat(me), "1", "PX", self._ttl_ms),
                ("HSET", view.instances, me, mine),
                ("HLEN", view.records(me)),
                (publish, view.channel(me), probe),
            ]
            for view, probe, marker in zip(keys.views, probes, layout, strict=True)
        ]
        replies = await self._run(beat, partial=True)
        self._check_layouts([r for n, r in enumerate(replies) if n % 6 < 2])
        # A shard that failed (a cluster's hung master) is as good as deaf: its probe
        # went unheard, and the subscriber is rebuilt once the map names another master.
        registered = sum(r for r in replies[4::6] if isinstance(r, int))
        return registered, [r if isinstance(r, int) else 0 for r in replies[5::6]]

    def _check_layouts(self, replies: list[Any]) -> None:
        """Check the layout marker that each shard's ``GET`` read (``SETNX``, ``GET``
        pairs); an error reading one is no verdict."""
        keys = self._keys
        for found in replies[1::2]:
            if not isinstance(found, BaseException):
                check_layout(keys.prefix, found, keys.layout_value)

    async def _run(
        self, groups: Iterable[list[tuple[Any, ...]]], *, partial: bool = False
    ) -> list[Any]:
        """The replies of the commands, in one round trip on this loop's own transport;
        the first error raises, or with ``partial`` only if every command failed (the
        others' errors are their replies). Several shards' keys are in several slots of
        a cluster: no transaction, and none is needed."""
        commands = [command for group in groups for command in group]
        # A cluster's transport times out inside (and must, to learn of a hung master);
        # a single Redis's (or Sentinel's master's) socket transport reads without a
        # timeout, so a beat stuck on a hung master would hold the tick to its bound
        # (twice the interval plus the timeout) before the next beat can reach the new one.
        shared = clustered(self._redis)
        bound = None if shared else self._timeout or None
        deadline = None if bound is None else asyncio.get_running_loop().time() + bound
        # The tick, a resubscription (the subscriber's task) and instances() (a request)
        # all come here. One Redis's transport takes one round trip at a time: the wait
        # for the others is within the bound, or a request's instances() would wait
        # without one behind a stuck tick. A cluster's takes them all at once, and its
        # connections serve the sends too: no lock, and no release after each.
        async with contextlib.AsyncExitStack() as turn:
            if not shared:
                async with asyncio.timeout_at(deadline):
                    await turn.enter_async_context(self._one_at_a_time)
            if self._transport is None:
                self._transport = await pick_transport(self._redis)
            transport = self._transport
            try:
                async with asyncio.timeout_at(deadline):
                    await transport.ready()
                    replies = await transport.run(commands)
            finally:
                if not shared:
                    await transport.release()
        failed = [reply for reply in replies if isinstance(reply, BaseException)]
        if failed and (not partial or len(failed) == len(replies)):
            raise failed[0]
        return replies

    async def resubscribed(self) -> None:
        """After (re)subscribing, maybe to a Redis that lost its data: announce, repair,
        and take each connection's groups from Redis, where a join or leave made
        elsewhere while this instance was not listening is recorded (its instructions
        to this instance were lost)."""
        self._regroup_due = True  # retried by the ticks until it succeeds
        await self.beat()
        await self.repair()
        await self.regroup()

    async def regroup(self) -> None:
        """Make each local connection's groups those that Redis records for it (a
        connection Redis has no record of keeps its own: the repair restores it)."""
        before = self._local.changes()
        changed = stale = 0
        for id, groups in (await self._registry.groups(self._instance)).items():
            connection = self._local.get(id)
            if connection is None or connection.registering or connection.groups == groups:
                continue
            if self._local.changes_of(id) != before.get(id, 0):
                # A join or leave came while Redis was read (the subscriber delivers
                # meanwhile): the record read is older. The next tick reads again.
                stale += 1
                continue
            self._local.regroup(connection, groups)
            changed += 1
        self._regroup_due = stale > 0
        if changed:
            log.warning("groups of %d connections taken from Redis", changed)

    async def repair(self) -> None:
        """Make Redis agree with the connections this instance really holds."""
        repair = await self._registry.reconcile(self._instance, self._local)
        if repair.restored or repair.removed:
            log.warning(
                "registry repaired: %d restored, %d removed", repair.restored, repair.removed
            )
            await self._sender.send(
                signals.registry_repaired,
                restored=repair.restored,
                removed=repair.removed,
            )
        await self._sender.presence(repair.online, repair.offline)

    def may_reap(self) -> bool:
        """Whether this instance has reached Redis for a whole TTL without a failure.

        After an outage every heartbeat may have expired inside Redis while the instances
        could not renew them: the first to come back must not reap the others before
        they had a TTL to beat again.
        """
        since = self._healthy_since
        return since is not None and time.monotonic() - since >= self._ttl_ms / 1000

    async def sweep(self) -> None:
        """Reap every instance whose heartbeat expired; report joins and leaves."""
        alive, dead = await self._census()
        for instance, shards in dead.items() if self.may_reap() else ():
            reaped = []
            for view in shards:
                if await self._reap(
                    keys=[view.heartbeat(instance), view.reap_lock(instance)],
                    args=[self._instance, max(self._ttl_ms, 10_000)],
                ):
                    reaped.append(view)
            if reaped:
                await self._reap_instance(instance, reaped)
        alive.discard(self._instance)
        for instance in sorted(alive - self._known):
            await self._sender.send(signals.instance_joined, instance=instance)
        for instance in sorted(self._known - alive):
            await self._sender.send(signals.instance_left, instance=instance)
        self._known = alive

    async def _reap_instance(self, instance: str, shards: list[Keys]) -> None:
        """Reap the ``shards`` of ``instance`` that this instance claimed."""
        removed, offline = 0, list[str]()
        for view in shards:
            removal = await self._registry.unregister_instance(instance, view, unless_alive=True)
            await self._delist_from(view, instance)
            removed, offline = removed + removal.removed, offline + removal.offline
        removal = Removal(removed, offline)
        log.warning("reaped instance %s: %d connections removed", instance, removal.removed)
        await self._sender.send(
            signals.instance_reaped,
            instance=instance,
            connections=removal.removed,
        )
        await self._sender.presence([], removal.offline)

    async def _census(self) -> tuple[set[str], dict[str, list[Keys]]]:
        """(live instance ids, the shards in which each other instance is dead)."""
        listed = await self._read()
        alive = {info.id for _, info, up in listed if up}
        dead: dict[str, list[Keys]] = {}
        for view, info, up in listed:
            if not up and info.id != self._instance:
                dead.setdefault(info.id, []).append(view)
        return alive, dead

    async def instances(self) -> list[InstanceInfo]:
        """Every live instance with its start time and connection count, from Redis."""
        return live(await self._read())

    async def _read(self) -> list[tuple[Keys, InstanceInfo, bool]]:
        """Every instance listed in each shard, and whether its heartbeat there is alive:
        two round trips on this loop's own transport."""
        return await read(self._keys, self._run)

    async def aclose(self) -> None:
        """Close this loop's own transport (the loop is stopped)."""
        await close(self._transport)

    async def leave(self) -> None:
        """Remove the heartbeat (a graceful stop); :meth:`delist` follows the records."""
        await self._redis.delete(*(view.heartbeat(self._instance) for view in self._keys.views))

    async def delist(self, instance: str | None = None) -> bool:
        """Take ``instance`` (default: this one) off the list of instances of every
        shard where it has no heartbeat and no records left; elsewhere it stays listed,
        for a survivor to reap. Whether it is off every list."""
        name = instance or self._instance
        return all([await self._delist_from(view, name) for view in self._keys.views])

    async def _delist_from(self, view: Keys, name: str) -> bool:
        keys = [view.instances, view.heartbeat(name), view.records(name), view.layout]
        return bool(await self._delist(keys=keys, args=[name]))
