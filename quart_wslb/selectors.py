"""Selectors: which connections of the cluster a message is for.

A selector is data. The built-in ones compile to a small postfix program over Redis index
sets that the routing script runs in one round trip, so resolving never scans every
connection. Values are matched exactly: a user called ``a*`` matches only that user.

A :class:`CustomSelector` is a predicate over connection records that no index serves:
it costs a read of every candidate record, in bounded pages, on each use.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

from .contract import (
    FIXED_KEYS,
    OP_ALL,
    OP_AND,
    OP_BROADCAST,
    OP_CONNECTION,
    OP_IDS,
    OP_OR,
    OP_SET,
    OP_USER,
)
from .keys import Keys, shard_of

if TYPE_CHECKING:
    from .records import ConnectionInfo

__all__ = (
    "AllSelector",
    "AndSelector",
    "ConnectionSelector",
    "CustomSelector",
    "GroupSelector",
    "MetadataSelector",
    "OrSelector",
    "PathSelector",
    "Selector",
    "UserSelector",
)


@dataclass(slots=True)
class Program:
    """A compiled selector: Redis keys and postfix ops for the scripts (``fold`` in
    ``lua/_common.lua``, for send, match and count) and for each instance's
    :class:`~quart_wslb.local_index.LocalIndex`. The ops are those of
    :mod:`quart_wslb.contract` (``OP_*``).

    Ops: ``S<n>`` members of the ``n``-th key, counting the two fixed keys (``KEYS[n]``
    for a script call of its own; in a batch, offset by the keys of the calls before);
    ``U<user>`` the user's connections; ``A`` every connection; ``C<id>`` one connection
    if it exists; ``M<n>`` then ``n`` ids, those that exist; ``&`` and ``|`` combine the
    top two sets; a lone ``B`` is a broadcast to every instance.
    """

    keys: list[str] = field(default_factory=list)
    ops: list[str] = field(default_factory=list)

    @property
    def exact(self) -> bool:
        """Whether a send resolves it to connection ids in Redis (a user, a connection,
        ids, and ``&`` with any of those), rather than to the instances that hold index
        members (``lua/send.lua``), which then resolve it themselves."""
        ops = self.ops
        if len(ops) == 1:  # the hot path: one operand
            return ops[0][:1] in (OP_USER, OP_CONNECTION)
        stack: list[bool] = []
        i = 0
        while i < len(ops):
            op = ops[i]
            if op == OP_AND or op == OP_OR:
                right, left = stack.pop(), stack.pop()
                stack.append(left or right if op == OP_AND else left and right)
            else:
                stack.append(op[:1] in (OP_USER, OP_CONNECTION, OP_IDS))
                if op[:1] == OP_IDS:
                    i += int(op[1:])
            i += 1
        return stack[0]

    def shards(self, count: int) -> list[int]:
        """The shards of ``count`` (:class:`~quart_wslb.keys.Keys`) that may hold a
        match: a user's or a connection's own, those of a list of ids, every shard for
        an index set or everyone; ``&`` keeps the shards of both sides, ``|`` of
        either. Only an optimisation: another shard's script call would find nothing."""
        every = frozenset(range(count))
        if count == 1:
            return [0]
        stack: list[frozenset[int]] = []
        ops, i = self.ops, 0
        while i < len(ops):
            op, code = ops[i], ops[i][:1]
            if op == OP_AND or op == OP_OR:
                right, left = stack.pop(), stack.pop()
                stack.append(left & right if op == OP_AND else left | right)
            elif code == OP_USER or code == OP_CONNECTION:
                stack.append(frozenset({shard_of(op[1:], count)}))
            elif code == OP_IDS:
                n = int(op[1:])
                stack.append(frozenset(shard_of(id, count) for id in ops[i + 1 : i + 1 + n]))
                i += n
            else:
                stack.append(every)
            i += 1
        return sorted(stack[0]) if len(stack) == 1 else sorted(every)

    def set_op(self, key: str) -> None:
        """Push the members of ``key``; the first ``FIXED_KEYS`` are fixed, and Lua counts
        from 1."""
        if key not in self.keys:
            self.keys.append(key)
        self.ops.append(f"{OP_SET}{self.keys.index(key) + FIXED_KEYS + 1}")


T = TypeVar("T")


def fold(
    sel: list[str],
    operand: Callable[[str], T | None],
    among: Callable[[list[str]], T],
    both: Callable[[T, T], T],
    either: Callable[[T, T], T],
) -> T | None:
    """Evaluate canonical postfix ops (``signing.canonical``) received on the wire:
    ``operand`` for each operand (``None``: unreadable), ``among`` for the ids of an
    ``M<n>`` op, ``both`` and ``either`` for ``&`` and ``|``. ``None`` when ``sel``
    cannot be read: an unknown operand, a bad count, or not one value left."""
    stack: list[T] = []
    i = 0
    while i < len(sel):
        op = sel[i]
        if op[:1] == OP_IDS:
            digits = op[1:]  # ASCII digits only: str.isdigit also holds for "²"
            count = int(digits) if digits.isascii() and digits.isdigit() and len(op) < 12 else -1
            if count < 0 or i + count >= len(sel):
                return None
            stack.append(among(sel[i + 1 : i + 1 + count]))
            i += count
        elif op in (OP_AND, OP_OR) and len(stack) >= 2:
            right, left = stack.pop(), stack.pop()
            stack.append(both(left, right) if op == OP_AND else either(left, right))
        else:
            value = operand(op)
            if value is None:
                return None
            stack.append(value)
        i += 1
    return stack[0] if len(stack) == 1 else None


#: Where streaming starts: ``("set", key)`` to scan a set, ``("id", id)`` for one id,
#: ``("user", name)`` for one user's connections, ``("all", "")`` for every connection.
Driver = tuple[str, str]
EVERY: Driver = ("all", "")


def _text(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a str, not {type(value).__name__}")
    if not value:
        raise ValueError(f"{what} must not be empty")
    return value


class Selector(ABC):
    """Base class of every selector; combine them with ``&`` and ``|``."""

    __slots__ = ()

    def __and__(self, other: Selector) -> Selector:
        if not isinstance(other, Selector):
            return NotImplemented
        return AndSelector(self, other)

    def __or__(self, other: Selector) -> Selector:
        if not isinstance(other, Selector):
            return NotImplemented
        return OrSelector(self, other)

    @property
    def indexed(self) -> bool:
        """Whether Redis resolves it from its indexes alone (every built-in selector)."""
        return True

    def cover(self) -> Selector | None:
        """An indexed selector matching at least what this one does; ``None``: everyone."""
        return self

    @abstractmethod
    def drivers(self, keys: Keys) -> list[Driver]:
        """The sets whose members include every match, for paged streaming."""

    def _breadth(self) -> int:
        """How many connections it tends to match, as a rank: one (0) to everyone (9).

        A query of ``a & b`` scans the narrower side's sets and filters by the other.
        """
        return 9 if not self.indexed else 5

    @abstractmethod
    def emit(self, program: Program, keys: Keys) -> None:
        """Append this selector's ops (and the keys they read) to ``program``."""

    @abstractmethod
    def matches(self, connection: ConnectionInfo) -> bool:
        """Whether one connection record matches, evaluated locally."""

    def compile(self, keys: Keys) -> Program:
        """The program that ``send.lua`` runs for this selector."""
        program = Program()
        self.emit(program, keys)
        return program


class _IndexSelector(Selector):
    """A selector served by one index set."""

    __slots__ = ()

    @abstractmethod
    def key(self, keys: Keys) -> str:
        """The index set of its connections."""

    def drivers(self, keys: Keys) -> list[Driver]:
        return [("set", self.key(keys))]

    def emit(self, program: Program, keys: Keys) -> None:
        program.set_op(self.key(keys))


@dataclass(frozen=True, slots=True)
class UserSelector(Selector):
    """Every connection of one user, on whatever instance."""

    user: str

    def __post_init__(self) -> None:
        _text(self.user, "user")

    def drivers(self, keys: Keys) -> list[Driver]:
        return [("user", self.user)]

    def emit(self, program: Program, keys: Keys) -> None:
        program.ops.append(OP_USER + self.user)

    def _breadth(self) -> int:
        return 1

    def matches(self, connection: ConnectionInfo) -> bool:
        return connection.user == self.user


@dataclass(frozen=True, slots=True)
class PathSelector(_IndexSelector):
    """Every connection on one concrete websocket path, such as ``/ws/red``."""

    path: str

    def __post_init__(self) -> None:
        _text(self.path, "path")

    def key(self, keys: Keys) -> str:
        return keys.path(self.path)

    def matches(self, connection: ConnectionInfo) -> bool:
        return connection.path == self.path


@dataclass(frozen=True, slots=True)
class ConnectionSelector(Selector):
    """One connection, by the cluster-unique id of ``current_connection.id``."""

    id: str

    def __post_init__(self) -> None:
        _text(self.id, "connection id")

    def drivers(self, keys: Keys) -> list[Driver]:
        return [("id", self.id)]

    def _breadth(self) -> int:
        return 0

    def emit(self, program: Program, keys: Keys) -> None:
        program.ops.append(OP_CONNECTION + self.id)

    def matches(self, connection: ConnectionInfo) -> bool:
        return connection.id == self.id


class MetadataSelector(Selector):
    """Connections whose metadata has every given ``name=value`` pair."""

    __slots__ = ("pairs",)

    def __init__(self, **pairs: str) -> None:
        if not pairs:
            raise ValueError("MetadataSelector needs at least one name=value pair")
        for name, value in pairs.items():
            _text(name, "metadata name")
            if not isinstance(value, str):
                raise TypeError(f"metadata value of {name!r} must be a str")
        self.pairs: Mapping[str, str] = dict(sorted(pairs.items()))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.pairs.items())
        return f"MetadataSelector({args})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, MetadataSelector) and self.pairs == other.pairs

    def __hash__(self) -> int:
        return hash(tuple(self.pairs.items()))

    def drivers(self, keys: Keys) -> list[Driver]:
        name, value = next(iter(self.pairs.items()))
        return [("set", keys.metadata(name, value))]

    def emit(self, program: Program, keys: Keys) -> None:
        for i, (name, value) in enumerate(self.pairs.items()):
            program.set_op(keys.metadata(name, value))
            if i:
                program.ops.append(OP_AND)

    def matches(self, connection: ConnectionInfo) -> bool:
        return all(connection.metadata.get(k) == v for k, v in self.pairs.items())


@dataclass(frozen=True, slots=True)
class GroupSelector(_IndexSelector):
    """Every connection that joined group ``name`` (a room), on whatever instance."""

    name: str

    def __post_init__(self) -> None:
        _text(self.name, "group name")

    def key(self, keys: Keys) -> str:
        return keys.group(self.name)

    def matches(self, connection: ConnectionInfo) -> bool:
        return self.name in connection.groups


class CustomSelector(Selector):
    """Base class for your own selectors: implement :meth:`matches` over a record.

    No index serves it, so every use reads the records of every candidate connection
    (every connection in the cluster, or those of the indexed selector it is combined
    with by ``&``) in bounded pages, and evaluates :meth:`matches` in this process.
    Prefer metadata and groups, which are indexed, for anything sent often.
    """

    __slots__ = ()

    @property
    def indexed(self) -> bool:
        return False

    def cover(self) -> Selector | None:
        return None

    def drivers(self, keys: Keys) -> list[Driver]:
        return [EVERY]

    def emit(self, program: Program, keys: Keys) -> None:
        raise TypeError(f"{type(self).__name__} has no index; it is matched record by record")


@dataclass(frozen=True, slots=True)
class AllSelector(Selector):
    """Every connection in the cluster; alone, it is one broadcast publish."""

    def drivers(self, keys: Keys) -> list[Driver]:
        return [EVERY]

    def _breadth(self) -> int:
        return 9

    def emit(self, program: Program, keys: Keys) -> None:
        program.ops.append(OP_ALL)

    def matches(self, connection: ConnectionInfo) -> bool:
        return True

    def compile(self, keys: Keys) -> Program:
        return Program(ops=[OP_BROADCAST])


def _operands(left: object, right: object) -> None:
    for operand in (left, right):
        if not isinstance(operand, Selector):
            raise TypeError(f"selectors combine only with selectors, not {operand!r}")


@dataclass(frozen=True, slots=True)
class AndSelector(Selector):
    """Connections that both selectors match (``a & b``)."""

    left: Selector
    right: Selector

    def __post_init__(self) -> None:
        _operands(self.left, self.right)

    @property
    def indexed(self) -> bool:
        return self.left.indexed and self.right.indexed

    def cover(self) -> Selector | None:
        left, right = self.left.cover(), self.right.cover()
        if left is None or right is None:
            return left or right
        return AndSelector(left, right)

    def drivers(self, keys: Keys) -> list[Driver]:
        sides = [side for side in (self.left, self.right) if side.indexed]
        return min(sides or [self.left], key=lambda side: side._breadth()).drivers(keys)

    def _breadth(self) -> int:
        return min(self.left._breadth(), self.right._breadth())

    def compile(self, keys: Keys) -> Program:
        if isinstance(self.right, AllSelector):  # x & everyone is x: no member list
            return self.left.compile(keys)
        if isinstance(self.left, AllSelector):
            return self.right.compile(keys)
        return Selector.compile(self, keys)

    def emit(self, program: Program, keys: Keys) -> None:
        if isinstance(self.right, AllSelector):
            self.left.emit(program, keys)
        elif isinstance(self.left, AllSelector):
            self.right.emit(program, keys)
        else:
            self.left.emit(program, keys)
            self.right.emit(program, keys)
            program.ops.append(OP_AND)

    def matches(self, connection: ConnectionInfo) -> bool:
        return self.left.matches(connection) and self.right.matches(connection)


@dataclass(frozen=True, slots=True)
class OrSelector(Selector):
    """Connections that either selector matches (``a | b``)."""

    left: Selector
    right: Selector

    def __post_init__(self) -> None:
        _operands(self.left, self.right)

    @property
    def indexed(self) -> bool:
        return self.left.indexed and self.right.indexed

    def cover(self) -> Selector | None:
        left, right = self.left.cover(), self.right.cover()
        return None if left is None or right is None else OrSelector(left, right)

    def drivers(self, keys: Keys) -> list[Driver]:
        return self.left.drivers(keys) + self.right.drivers(keys)

    def _breadth(self) -> int:
        return max(self.left._breadth(), self.right._breadth())

    def compile(self, keys: Keys) -> Program:
        if isinstance(self.left, AllSelector) or isinstance(self.right, AllSelector):
            return AllSelector().compile(keys)  # x | everyone is everyone: a broadcast
        return Selector.compile(self, keys)

    def emit(self, program: Program, keys: Keys) -> None:
        if isinstance(self.left, AllSelector) or isinstance(self.right, AllSelector):
            program.ops.append(OP_ALL)
            return
        self.left.emit(program, keys)
        self.right.emit(program, keys)
        program.ops.append(OP_OR)

    def matches(self, connection: ConnectionInfo) -> bool:
        return self.left.matches(connection) or self.right.matches(connection)
