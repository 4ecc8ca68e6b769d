"""Selectors: what they compile to, how they combine, and exact matching in Redis."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import fakeredis
import pytest
from redis.asyncio import Redis

from quart_wslb import (
    AllSelector,
    AndSelector,
    ConnectionInfo,
    ConnectionSelector,
    CustomSelector,
    GroupSelector,
    MetadataSelector,
    OrSelector,
    PathSelector,
    Selector,
    UserSelector,
)
from quart_wslb.emitter import AsyncEmitter
from quart_wslb.keys import Keys, shard_of
from quart_wslb.registry import Registry
from quart_wslb.selectors import Program
from tests.support import KEYS, PREFIX, fake_client, make_connection

#: (connection id, user, path, room): values a glob or a key parser would confuse.
PEOPLE = [
    ("i1:ab", "ab", "/ws/ab", "ab"),
    ("i1:star", "a*", "/ws/a*", "a*"),
    ("i2:colon", "x:y", "x:y", "x:y"),
    ("i2:brace", "{z}", "/ws/{z}", "{z}"),
    ("i2:z", "z", "/ws/z", "z"),
    ("i3:anon", None, "/ws/ab", "ab"),
]


@dataclass
class Info:
    """A connection record, as ``matches`` sees it."""

    id: str = "i1:c1"
    user: str | None = "alice"
    path: str = "/ws/red"
    instance: str = "i1"
    metadata: Mapping[str, str] = field(default_factory=dict)
    connected_at: float = 0.0
    groups: frozenset[str] = frozenset()


class LongUserName(CustomSelector):
    """A predicate no index serves: users whose name has more than two characters."""

    def matches(self, connection: ConnectionInfo) -> bool:
        return len(connection.user or "") > 2


@pytest.fixture(name="emitter")
async def fixture_emitter(fake_server: fakeredis.FakeServer) -> AsyncIterator[AsyncEmitter]:
    """An emitter over a registry that holds ``PEOPLE``."""
    redis: Redis = fake_client(fake_server)
    registry = Registry(redis, KEYS)
    for id_, user, path, room in PEOPLE:
        connection = make_connection(id=id_, user=user, path=path, metadata={"room": room})
        if id_ in ("i1:ab", "i2:brace"):
            connection.groups.add("g*")
        await registry.register(connection)
    await redis.hset(KEYS.instances, "i1", "{}")  # a cluster that has announced itself
    yield AsyncEmitter(redis, prefix=PREFIX)
    await redis.aclose()


async def matched(emitter: AsyncEmitter, selector: Selector) -> set[str]:
    """The ids Redis resolves ``selector`` to."""
    return {id_ for ids in (await emitter.resolve(selector)).values() for id_ in ids}


def test_compile_user_reads_its_field_of_users() -> None:
    program = UserSelector("alice").compile(KEYS)
    assert program.keys == []
    assert program.ops == ["Ualice"]


def test_compile_path_reads_one_index_set() -> None:
    program = PathSelector("/ws/red").compile(KEYS)
    assert program.keys == [KEYS.path("/ws/red")]
    assert program.ops == ["S3"]


def test_compile_group_reads_one_index_set() -> None:
    program = GroupSelector("red team").compile(KEYS)
    assert program.keys == [KEYS.group("red team")]
    assert program.ops == ["S3"]


def test_compile_custom_selector_has_no_program() -> None:
    with pytest.raises(TypeError, match="no index"):
        LongUserName().compile(KEYS)
    with pytest.raises(TypeError, match="no index"):
        (UserSelector("a") & LongUserName()).compile(KEYS)


@pytest.mark.parametrize(
    ("selector", "indexed", "cover"),
    [
        (UserSelector("a"), True, UserSelector("a")),
        (AllSelector(), True, AllSelector()),
        (LongUserName(), False, None),
        (UserSelector("a") & LongUserName(), False, UserSelector("a")),
        (LongUserName() & PathSelector("/p"), False, PathSelector("/p")),
        (UserSelector("a") | LongUserName(), False, None),
        (UserSelector("a") | GroupSelector("g"), True, UserSelector("a") | GroupSelector("g")),
    ],
)
def test_indexed_and_cover(selector: Selector, indexed: bool, cover: Selector | None) -> None:
    """A selector that no index serves is read through the narrowest indexed cover."""
    assert selector.indexed is indexed
    assert selector.cover() == cover


def test_compile_connection_reads_no_set() -> None:
    program = ConnectionSelector("i1:abc").compile(KEYS)
    assert program.keys == []
    assert program.ops == ["Ci1:abc"]


def test_compile_metadata_intersects_pairs_in_name_order() -> None:
    program = MetadataSelector(team="b", room="a").compile(KEYS)
    assert program.keys == [KEYS.metadata("room", "a"), KEYS.metadata("team", "b")]
    assert program.ops == ["S3", "S4", "&"]


def test_compile_all_alone_is_a_broadcast() -> None:
    program = AllSelector().compile(KEYS)
    assert program.keys == []
    assert program.ops == ["B"]


def test_compile_all_in_a_combination_is_simplified_away() -> None:
    assert (AllSelector() & UserSelector("a")).compile(KEYS).ops == ["Ua"]
    assert (UserSelector("a") & AllSelector()).compile(KEYS).ops == ["Ua"]
    assert (UserSelector("a") | AllSelector()).compile(KEYS).ops == ["B"]
    nested = PathSelector("/p") & (UserSelector("a") | AllSelector())
    assert nested.compile(KEYS).ops == ["S3", "A", "&"]


def test_compile_and_or_are_postfix() -> None:
    selector = GroupSelector("a") | (PathSelector("/p") & UserSelector("b"))
    program = selector.compile(KEYS)
    assert program.keys == [KEYS.group("a"), KEYS.path("/p")]
    assert program.ops == ["S3", "S4", "Ub", "&", "|"]


def test_compile_repeated_key_is_passed_once() -> None:
    program = (GroupSelector("a") | (PathSelector("/p") & GroupSelector("a"))).compile(KEYS)
    assert program.keys == [KEYS.group("a"), KEYS.path("/p")]
    assert program.ops == ["S3", "S4", "S3", "&", "|"]


def test_operators_build_and_or_selectors() -> None:
    user, path = UserSelector("a"), PathSelector("/p")
    assert user & path == AndSelector(user, path)
    assert user | path == OrSelector(user, path)


@pytest.mark.parametrize("other", ["alice", 1, None])
def test_operators_reject_non_selectors(other: object) -> None:
    with pytest.raises(TypeError):
        UserSelector("a") & other  # type: ignore[operator]
    with pytest.raises(TypeError):
        UserSelector("a") | other  # type: ignore[operator]


@pytest.mark.parametrize("make", [UserSelector, PathSelector, ConnectionSelector, GroupSelector])
@pytest.mark.parametrize("value", [1, None, b"alice"])
def test_validation_single_value_must_be_str(
    make: Callable[[str], Selector], value: object
) -> None:
    with pytest.raises(TypeError, match="must be a str"):
        make(cast(Any, value))


@pytest.mark.parametrize("make", [UserSelector, PathSelector, ConnectionSelector, GroupSelector])
def test_validation_single_value_must_not_be_empty(make: Callable[[str], Selector]) -> None:
    with pytest.raises(ValueError, match="must not be empty"):
        make(cast(Any, ""))


def test_validation_metadata_needs_a_pair() -> None:
    with pytest.raises(ValueError, match="at least one"):
        MetadataSelector()


def test_validation_metadata_value_must_be_str() -> None:
    with pytest.raises(TypeError, match="'room'"):
        MetadataSelector(room=cast(Any, 5))


def test_metadata_empty_value_is_a_value() -> None:
    """Connections may carry empty metadata values, so a selector may ask for one."""
    selector = MetadataSelector(room="")
    assert selector.matches(Info(metadata={"room": ""}))
    assert not selector.matches(Info(metadata={"room": "x"}))
    assert not selector.matches(Info(metadata={}))


def test_validation_combination_operands_must_be_selectors() -> None:
    with pytest.raises(TypeError):
        AndSelector(UserSelector("a"), cast(Any, "b"))


def test_validation_metadata_name_must_not_be_empty() -> None:
    with pytest.raises(ValueError):
        MetadataSelector(**{"": "x"})


def test_metadata_equality_ignores_argument_order() -> None:
    one, two = MetadataSelector(a="1", b="2"), MetadataSelector(b="2", a="1")
    assert one == two
    assert hash(one) == hash(two)
    assert one != MetadataSelector(a="1")
    assert repr(one) == "MetadataSelector(a='1', b='2')"


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        (UserSelector("alice"), True),
        (UserSelector("alic"), False),
        (PathSelector("/ws/red"), True),
        (PathSelector("/ws/re"), False),
        (ConnectionSelector("i1:c1"), True),
        (ConnectionSelector("i1:c2"), False),
        (MetadataSelector(room="red"), True),
        (MetadataSelector(room="red", team="x"), False),
        (MetadataSelector(room="re*"), False),
        (AllSelector(), True),
        (UserSelector("alice") & PathSelector("/ws/blue"), False),
        (UserSelector("bob") | PathSelector("/ws/red"), True),
        (UserSelector("bob") | PathSelector("/ws/blue"), False),
        (GroupSelector("g"), True),
        (GroupSelector("h"), False),
        (LongUserName(), True),
        (LongUserName() & UserSelector("bob"), False),
    ],
)
def test_matches_evaluates_locally(selector: Selector, expected: bool) -> None:
    assert selector.matches(Info(metadata={"room": "red"}, groups=frozenset({"g"}))) is expected


def test_matches_user_selector_never_matches_anonymous() -> None:
    assert not UserSelector("None").matches(Info(user=None))


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        (UserSelector("ab"), {"i1:ab"}),
        (UserSelector("a*"), {"i1:star"}),
        (UserSelector("a?"), set()),
        (UserSelector("[a]b"), set()),
        (UserSelector("x:y"), {"i2:colon"}),
        (UserSelector("x"), set()),
        (UserSelector("y"), set()),
        (UserSelector("{z}"), {"i2:brace"}),
        (UserSelector("z"), {"i2:z"}),
        (PathSelector("/ws/a*"), {"i1:star"}),
        (PathSelector("/ws/ab"), {"i1:ab", "i3:anon"}),
        (PathSelector("/ws/{z}"), {"i2:brace"}),
        (PathSelector("x:y"), {"i2:colon"}),
        (MetadataSelector(room="a*"), {"i1:star"}),
        (MetadataSelector(room="x:y"), {"i2:colon"}),
        (MetadataSelector(room="{z}"), {"i2:brace"}),
        (MetadataSelector(room="*"), set()),
    ],
)
async def test_resolve_matches_values_exactly(
    emitter: AsyncEmitter, selector: Selector, expected: set[str]
) -> None:
    assert await matched(emitter, selector) == expected


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        (ConnectionSelector("i1:star"), {"i1:star"}),
        (ConnectionSelector("i1:gone"), set()),
        (AllSelector(), {p[0] for p in PEOPLE}),
        (UserSelector("ab") | UserSelector("z"), {"i1:ab", "i2:z"}),
        (PathSelector("/ws/ab") & UserSelector("ab"), {"i1:ab"}),
        (PathSelector("/ws/ab") & UserSelector("z"), set()),
        (AllSelector() & MetadataSelector(room="ab"), {"i1:ab", "i3:anon"}),
        ((UserSelector("a*") | UserSelector("{z}")) & PathSelector("/ws/{z}"), {"i2:brace"}),
        (ConnectionSelector("i2:z") | ConnectionSelector("i3:anon"), {"i2:z", "i3:anon"}),
        (GroupSelector("g*"), {"i1:ab", "i2:brace"}),
        (GroupSelector("g"), set()),
        (GroupSelector("g*") & PathSelector("/ws/ab"), {"i1:ab"}),
        (LongUserName(), {"i2:colon", "i2:brace"}),
        (LongUserName() & PathSelector("x:y"), {"i2:colon"}),
        (LongUserName() | UserSelector("z"), {"i2:colon", "i2:brace", "i2:z"}),
    ],
)
async def test_resolve_combinations(
    emitter: AsyncEmitter, selector: Selector, expected: set[str]
) -> None:
    assert await matched(emitter, selector) == expected


async def test_resolve_groups_ids_by_owning_instance(emitter: AsyncEmitter) -> None:
    result = await emitter.resolve(PathSelector("/ws/ab") | UserSelector("x:y"))
    assert result == {"i1": ["i1:ab"], "i2": ["i2:colon"], "i3": ["i3:anon"]}


def test_drivers_of_an_and_scan_the_narrower_side() -> None:
    narrow = GroupSelector("lobby") & UserSelector("bob")
    assert narrow.drivers(KEYS) == [("user", "bob")]
    one = PathSelector("/p") & ConnectionSelector("i1:c")
    assert one.drivers(KEYS) == [("id", "i1:c")]
    either = UserSelector("a") | GroupSelector("g")
    assert either.drivers(KEYS) == [("user", "a"), ("set", KEYS.group("g"))]


@pytest.mark.parametrize(
    ("selector", "exact"),
    [
        (UserSelector("u"), True),
        (ConnectionSelector("i:c"), True),
        (GroupSelector("g"), False),
        (PathSelector("/p"), False),
        (MetadataSelector(a="1", b="2"), False),
        (AllSelector(), False),
        (UserSelector("u") & GroupSelector("g"), True),
        (GroupSelector("g") & UserSelector("u"), True),
        (UserSelector("u") | GroupSelector("g"), False),
        (UserSelector("u") | ConnectionSelector("i:c"), True),
        ((GroupSelector("g") | PathSelector("/p")) & ConnectionSelector("i:c"), True),
    ],
)
def test_program_exact_when_redis_resolves_it_to_ids(selector: Selector, exact: bool) -> None:
    assert selector.compile(KEYS).exact is exact


def _shard(value: str) -> set[int]:
    return {shard_of(value, 4)}


@pytest.mark.parametrize(
    ("selector", "shards"),
    [
        (UserSelector("u"), _shard("u")),
        (ConnectionSelector("i:c"), _shard("i:c")),
        (GroupSelector("g"), {0, 1, 2, 3}),
        (AllSelector(), {0, 1, 2, 3}),
        (UserSelector("u") & GroupSelector("g"), _shard("u")),
        (UserSelector("u") | UserSelector("v"), _shard("u") | _shard("v")),
        (UserSelector("u") | GroupSelector("g"), {0, 1, 2, 3}),
        (UserSelector("u") & UserSelector("v"), _shard("u") & _shard("v")),
    ],
)
def test_program_shards_are_those_that_may_hold_a_match(
    selector: Selector, shards: set[int]
) -> None:
    keys = Keys("t", shards=4)
    assert selector.compile(keys).shards(4) == sorted(shards)
    assert selector.compile(KEYS).shards(1) == [0]


def test_program_shards_of_a_list_of_ids() -> None:
    ids = ["i1:a", "i1:b", "i2:c"]
    program = Program(ops=[f"M{len(ids)}", *ids])
    assert program.shards(4) == sorted({shard_of(id, 4) for id in ids})
