"""The registry: records and index sets written, removed and reaped in Lua scripts."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import fakeredis
import pytest
from redis.asyncio import Redis

from quart_wslb.connection import Connection
from quart_wslb.registry import REAP_BATCH, Registry, Removal, Repair
from tests.support import (
    KEYS,
    make_connection,
    record_ids,
    registry_keys,
    set_members,
    stored_record,
    user_ids,
)


@pytest.fixture(name="registry")
def fixture_registry(fake_redis: Redis) -> Registry:
    return Registry(fake_redis, KEYS)


def alice() -> Connection:
    return make_connection(
        id="i1:alice", user="alice", path="/ws/red", metadata={"team": "b", "room": "red"}
    )


def bob() -> Connection:
    return make_connection(id="i1:bob", user="bob", path="/ws/red", metadata={"room": "red"})


async def register_all(registry: Registry, connections: Sequence[Connection]) -> None:
    for connection in connections:
        await registry.register(connection)


async def test_index_keys_lists_every_set() -> None:
    registry = Registry(fakeredis.FakeAsyncRedis(), KEYS)
    assert registry.index_keys(alice()) == [
        KEYS.path("/ws/red"),
        KEYS.metadata("room", "red"),
        KEYS.metadata("team", "b"),
    ]


async def test_record_leaves_out_empty_parts() -> None:
    registry = Registry(fakeredis.FakeAsyncRedis(), KEYS)
    connection = make_connection(user=None, metadata={})
    assert json.loads(registry.record(connection)) == {
        "p": "/ws/red",
        "t": repr(connection.connected_at),
    }


async def test_register_writes_record_and_every_index(
    fake_redis: Redis, registry: Registry
) -> None:
    connection = alice()
    await registry.register(connection)
    index_keys = registry.index_keys(connection)
    record = await stored_record(fake_redis, connection.id)
    assert record == {
        "u": "alice",
        "p": "/ws/red",
        "m": {"team": "b", "room": "red"},
        "t": repr(connection.connected_at),
    }
    for key in index_keys:
        assert await set_members(fake_redis, key) == {connection.id}, key
    assert await user_ids(fake_redis, "alice") == [connection.id]
    assert await registry_keys(fake_redis) == {
        KEYS.records("i1"),
        KEYS.users,
        *index_keys,
        *map(KEYS.holders, index_keys),
    }
    for key in index_keys:  # each set's holders: the instance, with one member
        assert await fake_redis.hgetall(KEYS.holders(key)) == {b"i1": b"1"}, key
    # The owner is listed (queries of everyone walk the list), but never overwritten.
    assert await fake_redis.hget(KEYS.instances, "i1") == b"{}"
    await fake_redis.hset(KEYS.instances, "i1", '{"started_at": 1.0}')
    await registry.register(bob())
    assert await fake_redis.hget(KEYS.instances, "i1") == b'{"started_at": 1.0}'


async def test_register_is_one_script_call_per_connection(
    registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every key and the record go to the register script together (so it is atomic)."""
    calls: list[dict[str, Any]] = []
    script = registry._register

    async def spy(**kwargs: Any) -> Any:
        calls.append(kwargs)
        return await script(**kwargs)

    monkeypatch.setattr(registry, "_register", spy)
    connection = alice()
    await registry.register(connection)
    assert len(calls) == 1
    assert calls[0]["keys"] == [KEYS.users, KEYS.records("i1"), *registry.index_keys(connection)]
    assert calls[0]["args"][:2] == [connection.id, "alice"]


async def test_register_twice_keeps_one_record(fake_redis: Redis, registry: Registry) -> None:
    assert await registry.register(alice()) == ["alice"]
    assert await registry.register(alice()) == []
    assert await record_ids(fake_redis) == {"i1:alice"}
    assert await user_ids(fake_redis, "alice") == ["i1:alice"]


async def test_unregister_removes_record_and_every_index(
    fake_redis: Redis, registry: Registry
) -> None:
    await register_all(registry, [alice(), bob()])
    assert await registry.unregister(["i1:alice"]) == Removal(1, ["alice"])
    assert await record_ids(fake_redis) == {"i1:bob"}
    for key in registry.index_keys(alice()):
        assert "i1:alice" not in await set_members(fake_redis, key), key
    assert await set_members(fake_redis, KEYS.metadata("room", "red")) == {"i1:bob"}
    assert await fake_redis.exists(KEYS.metadata("team", "b")) == 0
    assert await user_ids(fake_redis, "alice") == []


async def test_unregister_last_connection_leaves_no_keys(
    fake_redis: Redis, registry: Registry
) -> None:
    await register_all(registry, [alice(), bob()])
    assert await registry.unregister(["i1:alice", "i1:bob"]) == Removal(2, ["alice", "bob"])
    assert await registry_keys(fake_redis) == set()


async def test_unregister_twice_is_harmless(fake_redis: Redis, registry: Registry) -> None:
    await register_all(registry, [alice(), bob()])
    assert await registry.unregister(["i1:alice"]) == Removal(1, ["alice"])
    assert await registry.unregister(["i1:alice"]) == Removal(0, [])
    assert await record_ids(fake_redis) == {"i1:bob"}
    assert await set_members(fake_redis, KEYS.path("/ws/red")) == {"i1:bob"}


async def test_unregister_nothing_is_zero(registry: Registry) -> None:
    assert await registry.unregister([]) == Removal(0, [])


async def test_unregister_unknown_ids_counts_none(registry: Registry) -> None:
    await registry.register(bob())
    assert await registry.unregister(["i1:nobody", "i9:x", "no-colon"]) == Removal(0, [])


async def test_unregister_corrupt_record_is_removed(fake_redis: Redis, registry: Registry) -> None:
    await fake_redis.hset(KEYS.records("i1"), "bad", "not json")
    assert await registry.unregister(["i1:bad"]) == Removal(1, [])
    assert await registry_keys(fake_redis) == set()


async def test_unregister_instance_removes_only_its_connections(
    fake_redis: Redis, registry: Registry
) -> None:
    other = make_connection(id="i2:carol", user="carol", metadata={"room": "red"})
    await register_all(registry, [alice(), bob(), other])
    removal = await registry.unregister_instance("i1")
    assert (removal.removed, sorted(removal.offline)) == (2, ["alice", "bob"])
    assert await record_ids(fake_redis) == {"i2:carol"}
    assert await set_members(fake_redis, KEYS.metadata("room", "red")) == {"i2:carol"}
    assert await registry_keys(fake_redis) == {
        KEYS.records("i2"),
        KEYS.users,
        *registry.index_keys(other),
        *map(KEYS.holders, registry.index_keys(other)),
    }
    assert await fake_redis.hgetall(KEYS.holders(KEYS.metadata("room", "red"))) == {b"i2": b"1"}


async def test_unregister_instance_in_batches(
    fake_redis: Redis, registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    count = 2 * REAP_BATCH + 7
    connections = [
        make_connection(id=f"i1:{n}", user=f"u{n % 7}", metadata={"n": str(n % 3)})
        for n in range(count)
    ]
    await registry.register(*connections)
    batches: list[int] = []
    unregister = registry.unregister

    async def spy(ids: Sequence[str]) -> Removal:
        batches.append(len(ids))
        return await unregister(ids)

    monkeypatch.setattr(registry, "unregister", spy)
    removal = await registry.unregister_instance("i1")
    assert removal.removed == count
    assert sorted(removal.offline) == [f"u{n}" for n in range(7)]
    assert len(batches) >= 3
    assert max(batches) <= REAP_BATCH
    assert await registry_keys(fake_redis) == set()


async def test_unregister_instance_with_nothing_is_zero(
    fake_redis: Redis, registry: Registry
) -> None:
    await registry.register(bob())
    assert await registry.unregister_instance("i9") == Removal(0, [])
    assert await record_ids(fake_redis) == {"i1:bob"}


async def test_reconcile_restores_missing_and_removes_extra(
    fake_redis: Redis, registry: Registry
) -> None:
    kept, lost = alice(), bob()
    stray = make_connection(id="i1:stray", user="zed")
    other = make_connection(id="i2:other", user="zed")
    await register_all(registry, [kept, stray, other])
    kept.registering = lost.registering = False
    local = {kept.id: kept, lost.id: lost}
    assert await registry.reconcile("i1", local) == Repair(1, 1, ["bob"], [])
    assert await record_ids(fake_redis) == {"i1:alice", "i1:bob", "i2:other"}
    assert await user_ids(fake_redis, "zed") == ["i2:other"]
    assert await user_ids(fake_redis, "bob") == ["i1:bob"]
    assert await registry.reconcile("i1", local) == Repair(0, 0, [], [])


async def test_reconcile_drops_a_connection_that_closed_meanwhile(
    fake_redis: Redis, registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    closing = bob()
    closing.registering = False
    local = {closing.id: closing}
    register = registry.register

    async def register_then_close(*connections: Connection) -> list[str]:
        online = await register(*connections)
        local.pop(closing.id)
        return online

    monkeypatch.setattr(registry, "register", register_then_close)
    repair = await registry.reconcile("i1", local)
    assert (repair.restored, repair.removed) == (0, 0)
    assert await registry_keys(fake_redis) == set()


async def test_reconcile_leaves_connections_still_registering(
    fake_redis: Redis, registry: Registry
) -> None:
    """A connection between ``_local`` and its own register call is not "repaired"."""
    opening, opened = alice(), bob()
    await registry.register(opened)
    opened.registering = False
    local = {opening.id: opening, opened.id: opened}
    assert opening.registering
    assert await registry.reconcile("i1", local) == Repair(0, 0, [], [])
    assert await record_ids(fake_redis) == {"i1:bob"}
    await registry.register(opening)
    assert await registry.reconcile("i1", local) == Repair(0, 0, [], [])


async def test_index_keys_include_groups() -> None:
    registry = Registry(fakeredis.FakeAsyncRedis(), KEYS)
    connection = bob()
    connection.groups.update({"b", "a"})
    assert registry.index_keys(connection)[-2:] == [KEYS.group("a"), KEYS.group("b")]


async def test_presence_counts_connections_per_user(fake_redis: Redis, registry: Registry) -> None:
    """``register`` reports users it made present, ``unregister`` those it made absent."""
    first = make_connection(id="i1:a", user="ann")
    second = make_connection(id="i2:b", user="ann")
    anonymous = make_connection(id="i1:c", user=None)
    assert await registry.register(first, anonymous) == ["ann"]
    assert await registry.register(second) == []
    assert await fake_redis.hgetall(KEYS.users) == {b"ann": b"i1:a i2:b"}
    assert await registry.unregister([first.id, anonymous.id]) == Removal(2, [])
    assert await fake_redis.hgetall(KEYS.users) == {b"ann": b"i2:b"}
    assert await registry.unregister([second.id]) == Removal(1, ["ann"])
    assert await fake_redis.exists(KEYS.users) == 0


async def test_register_again_as_another_user_moves_the_user(
    fake_redis: Redis, registry: Registry
) -> None:
    """A repair that finds a record under another user takes it from the old one."""
    await registry.register(make_connection(id="i1:a", user="ann"))
    assert await registry.register(make_connection(id="i1:a", user="bea")) == ["bea"]
    assert await fake_redis.hgetall(KEYS.users) == {b"bea": b"i1:a"}
