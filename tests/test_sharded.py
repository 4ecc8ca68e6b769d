"""Merged sharded subscriptions: every master's messages handed out, a loss raised only
once what came before it is out, the other masters' parts stopped without losing a
batch, and parked (see ``tests/test_cluster_transport.py`` for real clusters)."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from quart_wslb.sharded import MergedSubscription, Part, ShardedSubscriptions

pytestmark = pytest.mark.timeout(30)
QUIET = 0.05
SOON = 3.0


class ScriptedSubscription:
    """Hands out ``batches`` (an exception raises), then waits."""

    def __init__(self, *batches: list[bytes] | Exception) -> None:
        self._batches = list(batches)

    async def read(self, timeout: float) -> list[bytes]:
        if not self._batches:
            await asyncio.sleep(timeout)
            return []
        batch = self._batches.pop(0)
        if isinstance(batch, Exception):
            raise batch
        return batch


def part(port: int, *batches: list[bytes] | Exception, channel: str = "c") -> Part:
    unused: Any = None  # never closed here
    subscription = cast(Any, ScriptedSubscription(*batches))
    return Part(("127.0.0.1", port), frozenset({f"{channel}{port}"}), subscription, unused, unused)


async def read_all(merged: MergedSubscription, rounds: int = 20) -> list[bytes]:
    got: list[bytes] = []
    for _ in range(rounds):
        got += await merged.read(SOON)
    return got


async def test_merged_subscription_hands_out_every_master_then_raises_the_loss() -> None:
    lost = RedisConnectionError("node 2 lost")
    first = part(1, [b"a1"], [b"a2"], [b"a3"])
    merged = MergedSubscription([first, part(2, [b"b1"], lost)])
    got: list[bytes] = []
    with pytest.raises(RedisConnectionError, match="node 2 lost"):
        for _ in range(10):
            got += await merged.read(SOON)
    assert b"b1" in got
    fine, bad, leftover = await merged.stop()
    assert [p.node[1] for p in fine] == [1] and [p.node[1] for p in bad] == [2]
    assert merged.failure is lost and merged.keeps_parts(lost)
    # Node 1's messages: handed out, left over for the next subscription, or unread in
    # its part (parked): each exactly once, in order.
    unread = [m for batch in cast(Any, first.subscription)._batches for m in batch]
    rest = [m for batch in leftover for m in batch]
    assert [m for m in got if m.startswith(b"a")] + rest + unread == [b"a1", b"a2", b"a3"]


async def test_merged_subscription_silence_returns_nothing() -> None:
    merged = MergedSubscription([part(1), part(2)])
    assert await merged.read(QUIET) == []
    fine, bad, leftover = await merged.stop()
    assert len(fine) == 2 and bad == [] and leftover == []
    assert not merged.keeps_parts(None)
    assert not merged.keeps_parts(asyncio.CancelledError())


async def test_merged_subscription_hands_out_leftovers_first() -> None:
    merged = MergedSubscription([part(1)], leftover=[[b"old1", b"old2"]])
    assert await merged.read(QUIET) == [b"old1", b"old2"]
    await merged.stop()


async def test_merged_subscription_abandon_drops_the_deaf_channels_part() -> None:
    merged = MergedSubscription([part(1), part(2)])
    merged.abandon(["c2"])
    deaf = RuntimeError("deaf")
    assert merged.keeps_parts(deaf)
    fine, bad, _ = await merged.stop()
    assert [p.node[1] for p in fine] == [1] and [p.node[1] for p in bad] == [2]


async def test_merged_subscription_callers_error_closes_everything_unless_abandoned() -> None:
    merged = MergedSubscription([part(1)])
    assert not merged.keeps_parts(RuntimeError("the caller's own"))
    await merged.stop()


# -- on a real Redis 7 (sharded channels need no cluster) -------------------------------


@pytest.mark.integration
async def test_sharded_subscriptions_drain_a_part_they_drop(redis_url: str, prefix: str) -> None:
    """A parked part whose channels moved to another master is drained before it is
    closed: what was published to it while parked comes first in the next subscription,
    ahead of what the new part reads; and a deaf part's messages are not lost either."""
    client = Redis.from_url(redis_url)
    if int((await client.info("server"))["redis_version"].split(".")[0]) < 7:
        await client.aclose()
        pytest.skip("sharded channels need Redis 7")
    a, b = ("127.0.0.1", 1), ("127.0.0.1", 2)  # two "masters": one server
    x, y = f"{{{prefix}|0}}:x", f"{{{prefix}|1}}:y"
    subscriptions = ShardedSubscriptions(lambda node: client, SOON)
    try:
        with pytest.raises(RuntimeError):
            async with subscriptions.subscribe({a: [x], b: [y]}) as merged:
                assert await client.spublish(y, b"y1") == 1
                assert await read_all(merged, rounds=1) == [b"y1"]
                merged.abandon([y])  # deaf: drained and closed; a's part parked
                raise RuntimeError("restart")
        assert await client.spublish(x, b"x1") == 1  # into the parked part's socket
        assert await client.spublish(y, b"y2") == 0  # b's part is gone
        async with subscriptions.subscribe({b: [x, y]}) as merged:  # x moved to b
            assert await client.spublish(x, b"x2") == 1  # only the new part listens
            got: list[bytes] = []
            async with asyncio.timeout(SOON):
                while len(got) < 2:
                    got += await merged.read(QUIET)
        assert got == [b"x1", b"x2"]
    finally:
        await subscriptions.aclose()
        await client.aclose()
