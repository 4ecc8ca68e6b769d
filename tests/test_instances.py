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
        await view_instance(fake_redis, view, "a", record(100.0, 7, 110.0), alive=True)
        await view_instance(fake_redis, view, "b", record(50.0, 3, 60.0), alive=False)
        await fake_redis.hset(view.records("a"), f"t{view.shard}", "{}")
    await fake_redis.hset(keys.view(1).records("a"), "t9", "{}")
    emitter = AsyncEmitter(fake_redis, prefix="inst", shards=2)
    assert await emitter.instances() == [InstanceInfo("a", 100.0, 3, 7, 110.0)]


async def test_read_pairs_the_newest_count_with_its_own_time(fake_redis: Redis) -> None:
    """A shard whose last beat failed holds an older record: the newest one wins, its
    count with its time (a count must not be paired with another beat's time)."""
    keys = Keys("inst", shards=3)
    records = [record(100.0, 9, 120.0), record(100.0, 4, 110.0), record(100.0, 7, 115.0)]
    for view, raw in zip(keys.views, records, strict=True):
        await view_instance(fake_redis, view, "a", raw, alive=True)
    (info,) = await AsyncEmitter(fake_redis, prefix="inst", shards=3).instances()
    assert (info.received, info.counted_at) == (9, 120.0)


@pytest.mark.parametrize("order", [(0, 1), (1, 0)])
async def test_read_pairs_the_newest_count_with_its_own_run(
    fake_redis: Redis, order: tuple[int, int]
) -> None:
    """Restarted under the same id, an instance whose beat failed in one shard leaves its
    last run's record there: the start shown is the run the count is of, whatever the
    order of the shards."""
    keys = Keys("inst", shards=2)
    old, new = record(1000.0, 50, 1990.0), record(2000.0, 10, 2010.0)
    for shard, raw in zip(order, (old, new), strict=True):
        await view_instance(fake_redis, keys.view(shard), "a", raw, alive=True)
    (info,) = await AsyncEmitter(fake_redis, prefix="inst", shards=2).instances()
    assert (info.started_at, info.received, info.counted_at) == (2000.0, 10, 2010.0)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b'{"started_at": 1.5}', (1.5, 0, 0.0)),  # a version that did not count
        (b'{"started_at": 1.5, "received": 4}', (1.5, 4, 0.0)),  # nor write its time
        (b'{"started_at": 1.5, "received": -1, "counted_at": 2.0}', (1.5, 0, 0.0)),
        (b'{"started_at": 1.5, "received": true}', (1.5, 0, 0.0)),
        (b'{"started_at": 1.5, "received": 4, "counted_at": "2"}', (1.5, 4, 0.0)),
        (b'{"started_at": 1.5, "received": 4, "counted_at": false}', (1.5, 4, 0.0)),
        (b'{"started_at": 1.5, "received": 4, "counted_at": 2}', (1.5, 4, 2.0)),
        (b'{"started_at": 1.5, "received": 4, "counted_at": 1' + b"0" * 400 + b"}", (1.5, 4, 0.0)),
        (b'{"started_at": 1.5, "received": 4, "counted_at": 1e999}', (1.5, 4, 0.0)),  # inf
        (b'{"started_at": 1' + b"0" * 400 + b', "received": 4}', (0.0, 0, 0.0)),
        (b'{"started_at": -1e999, "received": 4}', (0.0, 0, 0.0)),
        (b'{"started_at": "1.5", "received": 4}', (0.0, 0, 0.0)),
        (b"[1]", (0.0, 0, 0.0)),
        (b"not json", (0.0, 0, 0.0)),
    ],
)
async def test_read_takes_what_is_not_a_record_of_ours_as_zero(
    fake_redis: Redis, raw: bytes, expected: tuple[float, int, float]
) -> None:
    keys = Keys("inst")
    await view_instance(fake_redis, keys, "a", raw, alive=True)
    (info,) = await AsyncEmitter(fake_redis, prefix="inst").instances()
    assert (info.started_at, info.received, info.counted_at) == expected


async def test_read_of_no_instance_is_empty_not_an_error(fake_redis: Redis) -> None:
    assert await AsyncEmitter(fake_redis, prefix="nobody").instances() == []


async def view_instance(
    redis: Redis, view: Keys, name: str, raw: str | bytes, *, alive: bool
) -> None:
    """List ``name`` in ``view``'s shard with record ``raw``, its heartbeat alive or not."""
    await redis.hset(view.instances, name, raw)
    if alive:
        await redis.set(view.heartbeat(name), "1")
