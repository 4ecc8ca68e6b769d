"""The Redis schema of connection records and their indexes.

A record is one field of its instance's hash (token -> JSON), so that hash is also the
index of the instance's connections. The ``users`` hash maps each user to its connection
ids (and so says who is present); every path, metadata pair and group has a set of ids.
Removing a connection (locally, or by a survivor reaping a dead instance) rebuilds those
set names from the record in Lua, the same way :class:`~quart_wslb.keys.Keys` builds
them. Every change is one script call, in the shard that holds the connection (one
shard for one Redis: :class:`~quart_wslb.keys.Keys`). This layout keeps Redis memory at
about 300 bytes per connection (``docs/redis-schema.md``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import cast

from redis.asyncio import Redis

from ._lua import source
from .connection import Connection
from .contract import F_CONNECTED_AT, F_GROUPS, F_METADATA, F_PATH, F_USER
from .keys import Keys
from .records import ConnectionRecord

__all__ = ("Registry", "Removal", "Repair")

#: Ids removed per script call while reaping, so Redis is never blocked for long.
REAP_BATCH = 500


@dataclass(frozen=True, slots=True)
class Removal:
    """What an unregister did."""

    #: Records removed (those already gone are not counted).
    removed: int
    #: Users whose last connection in the cluster this removed.
    offline: list[str]


@dataclass(frozen=True, slots=True)
class Repair:
    """What a reconciliation did."""

    restored: int
    removed: int
    online: list[str]
    offline: list[str]


class Registry:
    """Registers, unregisters and reaps connection records."""

    def __init__(self, redis: Redis, keys: Keys) -> None:
        self._redis = redis
        self._keys = keys
        self._register = redis.register_script(source("register"))
        self._unregister = redis.register_script(source("unregister"))

    def index_keys(self, connection: Connection) -> list[str]:
        """Every set the connection belongs to (its user is a field of ``users``), as
        its shard names them."""
        keys = self._keys.of_connection(connection.id)
        names = [keys.path(connection.path)]
        names.extend(keys.metadata(k, v) for k, v in sorted(connection.metadata.items()))
        names.extend(keys.group(g) for g in sorted(connection.groups))
        return names

    def record(self, connection: Connection) -> str:
        """The JSON record stored for a connection (fields ``F_*`` of
        :mod:`quart_wslb.contract`, which the scripts read too); empty parts are left
        out."""
        data: dict[str, object] = {F_PATH: connection.path}
        if connection.user is not None:
            data[F_USER] = connection.user
        if connection.metadata:
            data[F_METADATA] = connection.metadata
        if connection.groups:
            data[F_GROUPS] = sorted(connection.groups)
        # A string: Redis's cjson keeps only 14 significant digits of a number, and
        # membership.lua rewrites records.
        data[F_CONNECTED_AT] = repr(connection.connected_at)
        # Raw UTF-8 rather than \u escapes: the scripts build key names from these bytes.
        return json.dumps(data, separators=(",", ":"), ensure_ascii=False)

    def _register_call(self, connection: Connection) -> tuple[list[str], list[str]]:
        view = self._keys.of_connection(connection.id)
        keys = [view.users, view.records(connection.instance), *self.index_keys(connection)]
        token = connection.id.partition(":")[2]
        args = [connection.id, token, self.record(connection), connection.user or ""]
        return keys, args

    async def register(self, *connections: Connection) -> list[str]:
        """Write records and every index entry, each atomically, in one round trip.

        Returns the users that this made present in the cluster (first connection).
        """
        if len(connections) == 1:  # the common case: one EVALSHA, no pipeline preamble
            keys, args = self._register_call(connections[0])
            online = [await self._register(keys=keys, args=args)]
        else:
            async with self._redis.pipeline(transaction=False) as pipe:
                for connection in connections:
                    keys, args = self._register_call(connection)
                    await self._register(keys=keys, args=args, client=pipe)
                online = await pipe.execute()
        return [c.user for c, new in zip(connections, online, strict=True) if new and c.user]

    async def unregister(self, ids: Sequence[str]) -> Removal:
        """Remove records and their index entries."""
        if not ids:
            return Removal(0, [])
        parts = self._keys.split(ids)
        if len(parts) == 1:  # one shard: one EVALSHA, no pipeline preamble
            view, mine = parts[0]
            replies = [await self._unregister(keys=[view.users], args=mine)]
        else:
            async with self._redis.pipeline(transaction=False) as pipe:
                for view, mine in parts:
                    await self._unregister(keys=[view.users], args=mine, client=pipe)
                replies = await pipe.execute()
        offline = [user.decode() for _, users in replies for user in users]
        return Removal(sum(int(removed) for removed, _ in replies), offline)

    async def reconcile(self, instance: str, local: Mapping[str, Connection]) -> Repair:
        """Make Redis hold exactly the ``local`` connections of ``instance``.

        Safe against connections that open or close meanwhile: a restored record whose
        connection closed during the repair is removed again, and unregistering twice is
        harmless.
        """
        remote = {
            f"{instance}:{token.decode()}"
            for view in self._keys.views
            async for token, _ in self._redis.hscan_iter(view.records(instance), count=1000)
        }
        held = {i: c for i, c in local.items() if not c.registering}
        missing = [c for i, c in held.items() if i not in remote]
        extra = [i for i in remote if i not in local]
        online: list[str] = []
        gone = Removal(0, [])
        if missing:
            online = await self.register(*missing)
            closed = [c.id for c in missing if c.id not in local]
            gone = await self.unregister(closed)
            missing = [c for c in missing if c.id in local]
        removal = await self.unregister(extra)
        return Repair(len(missing), removal.removed, online, removal.offline + gone.offline)

    async def groups(self, instance: str) -> dict[str, frozenset[str]]:
        """The groups that Redis records for each connection of ``instance``."""
        found: dict[str, frozenset[str]] = {}
        for view in self._keys.views:
            async for token, raw in self._redis.hscan_iter(view.records(instance), count=1000):
                record = ConnectionRecord.parse(f"{instance}:{token.decode()}", raw)
                found[record.id] = record.groups
        return found

    async def unregister_instance(
        self, instance: str, shard: Keys | None = None, *, unless_alive: bool = False
    ) -> Removal:
        """Remove every connection an instance owns (in ``shard`` only, if given), in
        bounded batches.

        With ``unless_alive``, stop as soon as the instance beats again in that shard.
        """
        total = Removal(0, [])
        for view in self._keys.views if shard is None else (shard,):
            records, alive = view.records(instance), view.heartbeat(instance)
            while batch := cast(list[bytes], await self._redis.hrandfield(records, REAP_BATCH)):
                if unless_alive and await self._redis.exists(alive):
                    break
                removal = await self.unregister([f"{instance}:{t.decode()}" for t in batch])
                total = Removal(total.removed + removal.removed, total.offline + removal.offline)
        return total
