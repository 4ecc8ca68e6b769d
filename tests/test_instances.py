"""The instance list: the record each instance writes of itself and how it is read back
(through the emitter, over fakeredis; the extension's path is tests/test_liveness.py)."""

from __future__ import annotations

import pytest
from redis.asyncio import Redis

from quart_wslb import AsyncEmitter, InstanceInfo
from quart_wslb.instances import record
from quart_wslb.keys import Keys


async def test_read_adds_up_connections_over_shards_and_skips_dead_instances(
    fake_redis: Redis,
) -> None:
    keys = Keys("inst", shards=2)
    for view in keys.views:
        await view_instance(fake_redis, view, "a", record(100.0, 7), alive=True)
        await view_instance(fake_redis, view, "b", record(50.0, 3), alive=False)
        await fake_redis.hset(view.records("a"), f"t{view.shard}", "{}")
    await fake_redis.hset(keys.view(1).records("a"), "t9", "{}")
    emitter = AsyncEmitter(fake_redis, prefix="inst", shards=2)
    assert await emitter.instances() == [InstanceInfo("a", 100.0, 3, 7)]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b'{"started_at": 1.5}', (1.5, 0)),  # an instance of a version that did not count
        (b'{"started_at": 1.5, "received": -1}', (1.5, 0)),
        (b'{"started_at": 1.5, "received": true}', (1.5, 0)),
        (b"[1]", (0.0, 0)),
        (b"not json", (0.0, 0)),
    ],
)
async def test_read_takes_what_is_not_a_record_of_ours_as_zero(
    fake_redis: Redis, raw: bytes, expected: tuple[float, int]
) -> None:
    keys = Keys("inst")
    await view_instance(fake_redis, keys, "a", raw, alive=True)
    (info,) = await AsyncEmitter(fake_redis, prefix="inst").instances()
    assert (info.started_at, info.received) == expected


async def test_read_of_no_instance_is_empty_not_an_error(fake_redis: Redis) -> None:
    assert await AsyncEmitter(fake_redis, prefix="nobody").instances() == []


async def view_instance(
    redis: Redis, view: Keys, name: str, raw: str | bytes, *, alive: bool
) -> None:
    """List ``name`` in ``view``'s shard with record ``raw``, its heartbeat alive or not."""
    await redis.hset(view.instances, name, raw)
    if alive:
        await redis.set(view.heartbeat(name), "1")
