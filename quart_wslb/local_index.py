"""This instance's connections, and its index of them by user, path, metadata and group.

A send to a group, path or metadata pair reaches an instance as one envelope that names
the selector, not the members (``lua/send.lua``): the instance resolves it here, from
its own connections, so that Redis does O(instances) work per send, never O(members).
The index is keyed by the selector's canonical ops (:func:`quart_wslb.signing.canonical`):
``S<key>`` for the Redis index set ``key`` a connection is in, ``U<user>`` for a user, so
resolving an operand is one dictionary lookup with no parsing. With several shards
(:class:`~quart_wslb.keys.Keys`), each shard's envelope names the selector for the
connections of that shard only, so the index is kept per shard.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from .connection import Connection
from .contract import OP_ALL, OP_BROADCAST, OP_CONNECTION, OP_SET, OP_USER
from .keys import Keys, shard_of
from .selectors import fold

__all__ = ("LocalIndex",)


class LocalIndex(Mapping[str, Connection]):
    """The connections this instance holds, by id (a read-only mapping), and by operand.

    Change a connection's groups only through :meth:`join` and :meth:`leave`, so that
    the index follows.
    """

    __slots__ = (
        "_by_id",
        "_by_shard",
        "_changes",
        "_members",
        "_ops",
        "_shards",
        "names",
        "on_recovery_change",
    )

    def __init__(self, keys: Keys) -> None:
        #: The names the index keys are built with (the prefix's).
        self.names = keys
        self._by_id: dict[str, Connection] = {}
        # Per shard: its connections by id, and by operand.
        self._by_shard: list[dict[str, Connection]] = [{} for _ in keys.views]
        self._members: list[dict[str, set[Connection]]] = [{} for _ in keys.views]
        self._shards = [_Shard(m, b) for m, b in zip(self._members, self._by_shard, strict=True)]
        #: What each held connection is indexed under, so that forgetting it forgets all
        #: of it even if its ``groups`` were changed by hand.
        self._ops: dict[str, set[str]] = {}
        # How many joins and leaves each held connection has had: a record of its groups
        # read before one of them is older than the connection (see :meth:`changes`).
        self._changes: dict[str, int] = {}
        #: Called with a recovery connection whose groups changed (its session follows).
        self.on_recovery_change: Callable[[Connection], None] | None = None

    def __getitem__(self, id: str) -> Connection:
        return self._by_id[id]

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_id)

    def __len__(self) -> int:
        return len(self._by_id)

    def snapshot(self) -> list[Connection]:
        """The held connections, copied at once: safe to call from another thread.

        ``list(index.values())`` runs Python code per connection (the ``Mapping``
        mixin's), between which the event loop's thread may add or remove one: the
        iteration then fails. This copies the dict's values in one C call, during which
        no other Python thread runs.
        """
        return list(self._by_id.values())

    def operands(self, connection: Connection) -> list[str]:
        """The ops that select ``connection``: its user, path, metadata pairs and groups."""
        keys = self.names
        ops = [OP_SET + keys.path(connection.path)]
        if connection.user is not None:
            ops.append(OP_USER + connection.user)
        ops.extend(OP_SET + keys.metadata(k, v) for k, v in connection.metadata.items())
        ops.extend(OP_SET + keys.group(g) for g in connection.groups)
        return ops

    def add(self, connection: Connection) -> None:
        """Hold ``connection`` (replacing any under its id) and index it."""
        held = self._by_id.get(connection.id)
        if held is not None:
            self.discard(held)
        self._by_id[connection.id] = connection
        self._by_shard[self._shard(connection)][connection.id] = connection
        self._ops[connection.id] = set()
        for op in self.operands(connection):
            self._index(op, connection)

    def discard(self, connection: Connection) -> None:
        """Forget ``connection`` if it is the one held under its id."""
        if self._by_id.get(connection.id) is not connection:
            return
        del self._by_id[connection.id]
        del self._by_shard[self._shard(connection)][connection.id]
        self._changes.pop(connection.id, None)
        for op in self._ops.pop(connection.id):
            self._unindex(op, connection)

    def join(self, connection: Connection, group: str) -> None:
        """Add ``connection`` to ``group``, in its ``groups`` and here if it is held."""
        connection.groups.add(group)
        if self._by_id.get(connection.id) is connection:
            self._index("S" + self.names.group(group), connection)
            self._changed(connection)

    def leave(self, connection: Connection, group: str) -> None:
        """Take ``connection`` out of ``group``; nothing happens if it is not in it."""
        was_in = group in connection.groups
        connection.groups.discard(group)
        if self._by_id.get(connection.id) is connection:
            op = "S" + self.names.group(group)
            self._ops[connection.id].discard(op)
            self._unindex(op, connection)
            if was_in:
                self._changed(connection)

    def changes(self) -> dict[str, int]:
        """How many joins and leaves each held connection has had so far (a copy): to
        tell, after reading the groups Redis records, which connections changed since."""
        return dict(self._changes)

    def changes_of(self, id: str) -> int:
        """How many joins and leaves the connection held under ``id`` has had."""
        return self._changes.get(id, 0)

    def _changed(self, connection: Connection) -> None:
        self._changes[connection.id] = self._changes.get(connection.id, 0) + 1
        if connection.recovery is not None and self.on_recovery_change is not None:
            self.on_recovery_change(connection)

    def regroup(self, connection: Connection, groups: frozenset[str]) -> None:
        """Make ``connection``'s groups exactly ``groups`` (as Redis records them)."""
        for group in connection.groups - groups:
            self.leave(connection, group)
        for group in groups - connection.groups:
            self.join(connection, group)

    def _shard(self, connection: Connection) -> int:
        return shard_of(connection.id, self.names.shards)

    def _index(self, op: str, connection: Connection) -> None:
        self._ops[connection.id].add(op)
        self._members[self._shard(connection)].setdefault(op, set()).add(connection)

    def _unindex(self, op: str, connection: Connection) -> None:
        index = self._members[self._shard(connection)]
        members = index.get(op)
        if members is not None:
            members.discard(connection)
            if not members:
                del index[op]

    def resolve(self, sel: list[str], shard: int | None = None) -> list[Connection] | None:
        """The held connections that the canonical selector ``sel`` selects (postfix
        ops, see ``selectors.Program``), of shard ``shard`` only if given; ``None``
        when ``sel`` cannot be read (or names no shard there is).

        An operand costs a lookup; ``&`` walks the smaller side.
        """
        shards = self._shards
        if shard is None and len(shards) > 1:
            found: list[Connection] = []
            for each in range(len(shards)):
                part = self.resolve(sel, each)
                if part is None:
                    return None
                found += part
            return found
        if not 0 <= (shard or 0) < len(shards):
            return None
        on = shards[shard or 0]
        if len(sel) == 1:  # the common case: one operand
            one = on.operand(sel[0])
            return None if one is None else list(one)
        result = fold(sel, on.operand_set, on.ids, _both, _either)
        return None if result is None else list(result)


class _Shard:
    """The operands of one shard's connections."""

    __slots__ = ("by_id", "members")

    def __init__(self, members: dict[str, set[Connection]], by_id: dict[str, Connection]) -> None:
        self.members, self.by_id = members, by_id

    def operand_set(self, op: str) -> set[Connection] | None:
        found = self.operand(op)
        return None if found is None else set(found)

    def operand(self, op: str) -> set[Connection] | list[Connection] | None:
        code = op[:1]
        if code == OP_SET or code == OP_USER:
            return self.members.get(op, set())
        if code == OP_CONNECTION:
            connection = self.by_id.get(op[1:])
            return [connection] if connection is not None else []
        if op == OP_ALL or op == OP_BROADCAST:
            return list(self.by_id.values())
        return None

    def ids(self, ids: list[str]) -> set[Connection]:
        found = (self.by_id.get(id) for id in ids)
        return {connection for connection in found if connection is not None}


def _both(left: set[Connection], right: set[Connection]) -> set[Connection]:
    return left & right


def _either(left: set[Connection], right: set[Connection]) -> set[Connection]:
    return left | right
