"""AsyncEmitter: publish and its Receipt (one envelope per owning instance) over fakeredis;
against a real Redis, paged queries, custom selectors, membership, disconnect, and the
errors a misconfigured emitter gives."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any, cast

import pytest
import redis.asyncio as aioredis
from redis.asyncio.client import PubSub

from quart_wslb import (
    AllSelector,
    AsyncEmitter,
    ConnectionInfo,
    ConnectionSelector,
    CustomSelector,
    GroupSelector,
    MetadataSelector,
    NoInstancesError,
    PathSelector,
    RedisUnavailableError,
    Selector,
    UserSelector,
    WsLoadBalanceError,
)
from quart_wslb.batch import MAX_PIPELINE, Args
from quart_wslb.emitter import Receipt
from quart_wslb.envelope import Envelope, decode
from quart_wslb.keys import LAYOUT, Keys
from quart_wslb.queries import PAGE
from quart_wslb.registry import Registry
from quart_wslb.signing import canonical
from quart_wslb.testing import RedisServer, free_port
from tests.support import (
    KEYS,
    PEOPLE,
    PREFIX,
    eventually,
    heartbeat,
    make_connection,
    people_sender,
    received,
    round_trips,
    sends_of,
)

MANY = PAGE * 2 + 37  # more than two pages


class EvenNumbered(CustomSelector):
    """Connections whose ``n`` metadata is even: no index serves it."""

    def matches(self, connection: ConnectionInfo) -> bool:
        return int(connection.metadata.get("n", "1")) % 2 == 0


@pytest.fixture(name="redis")
async def fixture_redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture(name="emitter")
async def fixture_emitter(redis: aioredis.Redis, prefix: str) -> AsyncIterator[AsyncEmitter]:
    emitter = AsyncEmitter(redis, prefix=prefix)
    yield emitter
    await emitter.aclose()


@pytest.fixture(name="populated")
async def fixture_populated(redis: aioredis.Redis, prefix: str) -> int:
    """MANY connections on instance i1: users u0..u9, rooms r0..r2, every fifth in "g"."""
    registry = Registry(redis, Keys(prefix))
    connections = []
    for n in range(MANY):
        connection = make_connection(
            id=f"i1:c{n}", user=f"u{n % 10}", metadata={"room": f"r{n % 3}", "n": str(n)}
        )
        if n % 5 == 0:
            connection.groups.add("g")
        connections.append(connection)
    await registry.register(*connections)
    await redis.hset(Keys(prefix).instances, "i1", json.dumps({"started_at": 1.0}))
    return MANY


@pytest.fixture(name="sender")
async def fixture_sender(fake_redis: aioredis.Redis) -> AsyncEmitter:
    """What publishes for an instance that owns no connection, to ``PEOPLE``, on fakeredis."""
    return await people_sender(fake_redis)


@asynccontextmanager
async def listening(redis: aioredis.Redis, *channels: str) -> AsyncIterator[PubSub]:
    async with redis.pubsub() as pubsub:
        await pubsub.subscribe(*channels)
        yield pubsub


@asynccontextmanager
async def instances(redis: aioredis.Redis, *names: str) -> AsyncIterator[dict[str, PubSub]]:
    """One subscriber per instance channel, as if those instances were alive."""
    async with AsyncExitStack() as stack:
        pubsubs = {name: await stack.enter_async_context(redis.pubsub()) for name in names}
        for name, pubsub in pubsubs.items():
            await pubsub.subscribe(KEYS.channel(name))
        yield pubsubs


async def envelopes(pubsubs: dict[str, PubSub]) -> dict[str, list[Envelope]]:
    return {
        name: [e for raw in await received(p) for e in decode(raw)] for name, p in pubsubs.items()
    }


async def test_publish_sends_one_envelope_per_owning_instance(
    fake_redis: aioredis.Redis, sender: AsyncEmitter
) -> None:
    async with instances(fake_redis, "i1", "i2", "i3") as pubsubs:
        receipt = await sender.publish(UserSelector("alice"), "text", "héllo".encode())
        got = await envelopes(pubsubs)
    assert receipt == Receipt(receipt.message_id, routed=3, instances=2, unheard=())
    assert [sorted(e.targets or ()) for e in got["i1"]] == [["i1:a1", "i1:a2"]]
    assert [e.targets for e in got["i2"]] == [["i2:a3"]]
    assert got["i3"] == []
    envelope = got["i1"][0]
    assert (envelope.id, envelope.origin, envelope.kind, envelope.frame) == (
        receipt.message_id,
        "i0",
        "text",
        "héllo",
    )


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        (UserSelector("bob"), {"i1": ["i1:b1"]}),
        (ConnectionSelector("i2:c1"), {"i2": ["i2:c1"]}),
        (ConnectionSelector("i2:gone"), {}),
        (UserSelector("alice") & PathSelector("/ws/red"), {"i1": ["i1:a1"], "i2": ["i2:a3"]}),
        (UserSelector("bob") | UserSelector("carol"), {"i1": ["i1:b1"], "i2": ["i2:c1"]}),
        (AllSelector() & UserSelector("dave"), {"i3": ["i3:d1"]}),
        (UserSelector("nobody"), {}),
    ],
)
async def test_publish_exact_selectors_list_their_targets(
    fake_redis: aioredis.Redis,
    sender: AsyncEmitter,
    selector: Selector,
    expected: dict[str, list[str]],
) -> None:
    async with instances(fake_redis, "i1", "i2", "i3") as pubsubs:
        receipt = await sender.publish(selector, "json", b'{"a":1}')
        got = await envelopes(pubsubs)
    assert {name: sorted(e.targets or ["?"]) for name, es in got.items() for e in es} == expected
    assert all(e.sel is None for es in got.values() for e in es)
    assert all(len(es) <= 1 for es in got.values())
    assert receipt.routed == sum(len(ids) for ids in expected.values())
    assert receipt.instances == len(expected)
    assert receipt.unheard == ()


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        (PathSelector("/ws/red"), {"i1": 2, "i2": 1, "i3": 1}),
        (MetadataSelector(room="green"), {"i2": 1}),
        (MetadataSelector(room="nowhere"), {}),
        # Compound: per instance, the smaller count (&) or the sum (|), an upper bound.
        (PathSelector("/ws/red") & MetadataSelector(room="blue"), {"i1": 1}),
        (PathSelector("/ws/green") | MetadataSelector(room="green"), {"i2": 2}),
        (UserSelector("dave") | PathSelector("/ws/blue"), {"i1": 1, "i3": 1}),
        (AllSelector() & PathSelector("/ws/blue"), {"i1": 1}),
    ],
)
async def test_publish_index_selectors_name_the_selector_not_the_members(
    fake_redis: aioredis.Redis, sender: AsyncEmitter, selector: Selector, expected: dict[str, int]
) -> None:
    async with instances(fake_redis, "i1", "i2", "i3") as pubsubs:
        receipt = await sender.publish(selector, "json", b'{"a":1}')
        got = await envelopes(pubsubs)
    sel = canonical(selector.compile(KEYS))
    assert {name: [(e.targets, e.sel) for e in es] for name, es in got.items() if es} == {
        name: [(None, sel)] for name in expected
    }
    assert receipt.routed == sum(expected.values())
    assert receipt.instances == len(expected)


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        (UserSelector("alice"), {"i1": ["i1:a1", "i1:a2"], "i2": ["i2:a3"]}),
        (PathSelector("/ws/green") | UserSelector("dave"), {"i2": ["i2:c1"], "i3": ["i3:d1"]}),
        (
            AllSelector(),
            {"i1": ["i1:a1", "i1:a2", "i1:b1"], "i2": ["i2:a3", "i2:c1"], "i3": ["i3:d1"]},
        ),  # fmt: skip
        (MetadataSelector(room="nowhere"), {}),
    ],
)
async def test_resolve_groups_by_instance_and_publishes_nothing(
    fake_redis: aioredis.Redis,
    sender: AsyncEmitter,
    selector: Selector,
    expected: dict[str, list[str]],
) -> None:
    async with instances(fake_redis, "i1", "i2", "i3") as pubsubs:
        async with listening(fake_redis, KEYS.broadcast) as broadcast:
            assert await sender.resolve(selector) == expected
            assert await received(broadcast) == []
        assert await envelopes(pubsubs) == {"i1": [], "i2": [], "i3": []}


async def test_publish_unheard_instance_is_reported_and_not_counted(
    fake_redis: aioredis.Redis, sender: AsyncEmitter
) -> None:
    async with instances(fake_redis, "i1") as pubsubs:
        receipt = await sender.publish(PathSelector("/ws/red"), "text", b"hi")
        got = await envelopes(pubsubs)
    assert receipt.routed == 2
    assert receipt.instances == 1
    assert sorted(receipt.unheard) == ["i2", "i3"]
    assert [(e.targets, e.sel) for e in got["i1"]] == [(None, ["S" + KEYS.path("/ws/red")])]


async def test_publish_all_is_one_broadcast(
    fake_redis: aioredis.Redis, sender: AsyncEmitter
) -> None:
    async with instances(fake_redis, "i1", "i2") as pubsubs:
        async with (
            listening(fake_redis, KEYS.broadcast) as one,
            listening(fake_redis, KEYS.broadcast) as two,
        ):
            receipt = await sender.publish(AllSelector(), "binary", b"\x00\n\xff")
            got_one, got_two = await received(one), await received(two)
        assert await envelopes(pubsubs) == {"i1": [], "i2": []}
    assert receipt.routed == len(PEOPLE)
    assert receipt.instances == 2
    assert got_one == got_two
    [envelope] = [e for raw in got_one for e in decode(raw)]
    assert (envelope.targets, envelope.sel) == (None, ["B"])
    assert envelope.frame == b"\x00\n\xff"
    assert envelope.id == receipt.message_id


async def test_publish_with_timestamps_carries_each_send_time(
    fake_redis: aioredis.Redis, sender: AsyncEmitter
) -> None:
    """Off by default; on, each message carries its send time (Unix µs), by ids or by
    selector alike."""
    async with instances(fake_redis, "i1", "i2") as pubsubs:
        await sender.publish(UserSelector("alice"), "text", b"untimed")
        sender.timestamps = True
        before = time.time_ns() // 1000
        await sender.publish(UserSelector("alice"), "text", b"by ids")
        await sender.publish(MetadataSelector(room="red"), "text", b"by selector")
        after = time.time_ns() // 1000
        got = await envelopes(pubsubs)
    sent = {e.frame: e.sent for e in got["i1"]}
    assert sent.keys() == {"untimed", "by ids", "by selector"}
    assert sent.pop("untimed") is None
    for frame, time_sent in sent.items():
        assert time_sent is not None and before <= time_sent <= after, (frame, time_sent)


async def test_publish_all_counts_only_live_instances(
    fake_redis: aioredis.Redis, sender: AsyncEmitter
) -> None:
    await fake_redis.delete(KEYS.heartbeat("i3"))  # i3 died; its records are not reaped yet
    async with listening(fake_redis, KEYS.broadcast) as broadcast:
        receipt = await sender.publish(AllSelector(), "text", b"hi")
        assert len(await received(broadcast)) == 1
    assert receipt.routed == len(PEOPLE) - 1


async def test_publish_all_with_no_listener_routes_nothing(sender: AsyncEmitter) -> None:
    receipt = await sender.publish(AllSelector(), "text", b"hi")
    assert (receipt.routed, receipt.instances) == (0, 0)


async def test_publish_all_with_no_connection_routes_nothing(fake_redis: aioredis.Redis) -> None:
    await heartbeat(fake_redis, "i1")
    emitter = AsyncEmitter(fake_redis, prefix=PREFIX, origin="i0")
    async with listening(fake_redis, KEYS.broadcast) as broadcast:
        receipt = await emitter.publish(AllSelector(), "text", b"hi")
        assert await received(broadcast) == []
    assert (receipt.routed, receipt.instances) == (0, 0)


@pytest.mark.parametrize("selector", [AllSelector(), UserSelector("alice")])
async def test_publish_under_a_prefix_without_instances_raises(
    fake_redis: aioredis.Redis, selector: Selector
) -> None:
    emitter = AsyncEmitter(fake_redis, prefix="other")
    with pytest.raises(NoInstancesError, match="other"):
        await emitter.publish(selector, "text", b"hi")


async def test_publish_message_ids_differ(sender: AsyncEmitter) -> None:
    one = await sender.publish(UserSelector("alice"), "text", b"x")
    two = await sender.publish(UserSelector("alice"), "text", b"x")
    assert one.message_id != two.message_id


@pytest.mark.integration
async def test_join_keeps_the_record_exact(redis: aioredis.Redis, prefix: str) -> None:
    keys = Keys(prefix)
    connection = make_connection(id="i1:x", user="ann", metadata={"n": "1"})
    connection.connected_at = 1795938967.3960772
    await Registry(redis, keys).register(connection)
    await redis.hset(keys.instances, "i1", "{}")
    before = json.loads(await redis.hget(keys.records("i1"), "x") or b"")
    emitter = AsyncEmitter(redis, prefix=prefix)
    assert await emitter.join(UserSelector("ann"), "vip") == 1
    after = json.loads(await redis.hget(keys.records("i1"), "x") or b"")
    assert after["g"] == ["vip"]
    assert {k: after[k] for k in "upmt"} == {k: before[k] for k in "upmt"}


@pytest.mark.integration
async def test_connections_stream_every_record_in_pages(
    emitter: AsyncEmitter, populated: int
) -> None:
    records = [r async for r in emitter.connections()]
    assert len(records) == populated == len({r.id for r in records})
    first = next(r for r in records if r.id == "i1:c5")
    assert (first.user, first.instance, first.path) == ("u5", "i1", "/ws/red")
    assert first.metadata == {"room": "r2", "n": "5"} and first.groups == {"g"}
    assert await emitter.count() == populated
    assert sorted([u async for u in emitter.users()]) == [f"u{n}" for n in range(10)]


@pytest.mark.integration
async def test_connections_union_lists_each_connection_once(
    emitter: AsyncEmitter, populated: int
) -> None:
    selector = GroupSelector("g") | UserSelector("u0")
    ids = [r.id async for r in emitter.connections(selector)]
    expected = {f"i1:c{n}" for n in range(populated) if n % 5 == 0 or n % 10 == 0}
    assert len(ids) == len(set(ids)) and set(ids) == expected
    assert await emitter.count(selector) == len(expected)


@pytest.mark.integration
async def test_count_of_a_compound_selector_is_exact_and_paged(
    emitter: AsyncEmitter, populated: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A compound count reads matches in pages (as ``connections`` does), never in one
    script call over whole sets; a single operand is one call."""
    calls: list[Any] = []
    count_script = emitter._count

    async def spy(**kwargs: Any) -> Any:
        calls.append(kwargs["args"])
        return await count_script(**kwargs)

    monkeypatch.setattr(emitter, "_count", spy)
    both = MetadataSelector(room="r0") & GroupSelector("g")
    expected = [n for n in range(populated) if n % 3 == 0 and n % 5 == 0]
    assert await emitter.count(both) == len(expected)
    assert await emitter.count(GroupSelector("g") | MetadataSelector(room="r1")) == len(
        [n for n in range(populated) if n % 5 == 0 or n % 3 == 1]
    )
    assert calls == []
    assert await emitter.count(GroupSelector("g")) == len(range(0, populated, 5))
    assert len(calls) == 1


@pytest.mark.integration
async def test_custom_selector_is_matched_record_by_record(
    emitter: AsyncEmitter, populated: int
) -> None:
    evens = {f"i1:c{n}" for n in range(populated) if n % 2 == 0}
    assert {r.id async for r in emitter.connections(EvenNumbered())} == evens
    assert await emitter.count(EvenNumbered()) == len(evens)
    narrowed = EvenNumbered() & MetadataSelector(room="r0")
    expected = {f"i1:c{n}" for n in range(populated) if n % 6 == 0}
    assert {r.id async for r in emitter.connections(narrowed)} == expected
    assert sorted([u async for u in emitter.users(narrowed)]) == ["u0", "u2", "u4", "u6", "u8"]


@pytest.mark.integration
async def test_send_routes_custom_matches_to_their_owner(
    emitter: AsyncEmitter, redis: aioredis.Redis, prefix: str, populated: int
) -> None:
    async with redis.pubsub() as pubsub:
        await pubsub.subscribe(Keys(prefix).channel("i1"))
        await pubsub.get_message(timeout=1)
        routed = await emitter.send(EvenNumbered(), "even")
        targets: list[str] = []
        deadline = time.monotonic() + 5
        while len(targets) < routed and time.monotonic() < deadline:
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1)
            if message:
                header = json.loads(message["data"].partition(b"\n")[0])
                targets.extend(t for m in header["messages"] for t in m["targets"])
    assert routed == (populated + 1) // 2
    assert sorted(targets) == sorted(f"i1:c{n}" for n in range(0, populated, 2))


@pytest.mark.integration
async def test_join_and_leave_change_records_and_survive_unregister(
    emitter: AsyncEmitter, redis: aioredis.Redis, prefix: str, populated: int
) -> None:
    keys = Keys(prefix)
    assert await emitter.join(UserSelector("u1"), "club") == populated // 10 + 1
    assert await emitter.count(GroupSelector("club")) == populated // 10 + 1
    record = json.loads(await redis.hget(keys.records("i1"), "c1") or b"{}")
    assert "club" in record["g"]
    assert await emitter.leave(MetadataSelector(room="r1") & UserSelector("u1"), "club") > 0
    remaining = {r.id async for r in emitter.connections(GroupSelector("club"))}
    assert remaining == {f"i1:c{n}" for n in range(populated) if n % 10 == 1 and n % 3 != 1}
    await Registry(redis, keys).unregister_instance("i1")
    assert not await redis.exists(keys.group("club"), keys.group("g"), keys.users)


@pytest.mark.integration
async def test_send_to_a_prefix_without_instances_raises(
    redis: aioredis.Redis, prefix: str
) -> None:
    emitter = AsyncEmitter(redis, prefix=prefix + "-typo")
    with pytest.raises(NoInstancesError, match="typo"):
        await emitter.send(AllSelector(), "x")
    with pytest.raises(NoInstancesError):
        await emitter.count(UserSelector("x"))
    with pytest.raises(NoInstancesError):
        await emitter.connections()
    with pytest.raises(NoInstancesError):
        await emitter.users()
    lenient = AsyncEmitter(redis, prefix=prefix + "-typo", strict=False)
    assert await lenient.send(AllSelector(), "x") == 0
    assert await lenient.count() == 0
    assert await lenient.connections() == []


async def test_unreachable_redis_fails_within_the_timeout() -> None:
    emitter = AsyncEmitter(redis_url=f"redis://127.0.0.1:{free_port()}/0", timeout=0.5)
    started = time.monotonic()
    with pytest.raises(RedisUnavailableError):
        await emitter.send(UserSelector("x"), "x")
    took = time.monotonic() - started
    await emitter.aclose()
    assert took < 0.5 + 3.0, f"an unreachable Redis took {took:.2f}s to fail, timeout 0.5s"


@pytest.mark.integration
async def test_constructor_reads_exported_options(
    monkeypatch: pytest.MonkeyPatch, redis_url: str, prefix: str
) -> None:
    """Like the extension: what is not given comes from ``WSLB_*``, then the defaults."""
    monkeypatch.setenv("WSLB_REDIS_URL", redis_url)
    monkeypatch.setenv("WSLB_PREFIX", prefix)
    monkeypatch.setenv("WSLB_REDIS_TIMEOUT", "0.75")
    emitter = AsyncEmitter(strict=False)
    try:
        # Checked before any call, so that a regression never reaches another Redis.
        assert (emitter.keys.prefix, emitter.timeout) == (prefix, 0.75)
        assert await emitter.count() == 0
        assert await emitter.join(UserSelector("nobody"), "g") == 0
    finally:
        await emitter.aclose()
    emitter = AsyncEmitter(redis_url=redis_url, prefix="arg", timeout=1)
    assert (emitter.keys.prefix, emitter.timeout) == ("arg", 1.0)
    await emitter.aclose()


@pytest.mark.integration
async def test_constructor_rejects_bad_arguments(redis: aioredis.Redis) -> None:
    with pytest.raises(TypeError):
        AsyncEmitter(redis, redis_url="redis://127.0.0.1:1/0")
    with pytest.raises(ValueError, match="PREFIX"):
        AsyncEmitter(redis, prefix="bad prefix{")
    decoding = aioredis.Redis(decode_responses=True)
    with pytest.raises(ValueError, match="decode_responses"):
        AsyncEmitter(decoding)
    await decoding.aclose()
    empties: tuple[object, ...] = ("", {})
    for empty in empties:  # as the sync Emitter and the extensions
        with pytest.raises(ValueError):
            AsyncEmitter(redis, secret=empty)


@pytest.mark.integration
async def test_disconnect_rejects_reserved_close_codes(emitter: AsyncEmitter) -> None:
    for code in (1001, 1011, 2999, 5000):
        with pytest.raises(ValueError):
            await emitter.disconnect(UserSelector("x"), code)


@pytest.mark.integration
async def test_emitter_client_from_url_packs_like_redis_py(redis_url: str, prefix: str) -> None:
    from redis.asyncio import Connection

    from quart_wslb.redis_client import make_client

    client = make_client(redis_url, 1.0)
    try:
        args = ("EVALSHA", "abc", 2, b"k\x00", "k\u00e9", 3.5, -7, "x y")
        connection = client.connection_pool.make_connection()  # type: ignore[no-untyped-call]
        packed = b"".join(connection.pack_command(*args))
        assert packed == b"".join(Connection().pack_command(*args))
        await client.set("{" + prefix + "}:probe", "v", px=1000)
        assert await client.get("{" + prefix + "}:probe") == b"v"
    finally:
        await client.aclose()


@pytest.mark.integration
async def test_send_to_a_one_connection_user_publishes_what_the_general_path_does(
    emitter: AsyncEmitter, redis: aioredis.Redis, prefix: str
) -> None:
    """send.lua's shortcut for a user with one connection writes the same envelope as
    its general path (here forced by ``u | u``), down to the byte; unheard is reported."""
    keys = Keys(prefix)
    await Registry(redis, keys).register(make_connection(id="i1:Ab-_9", user="solo"))
    async with redis.pubsub() as pubsub:
        await pubsub.subscribe(keys.channel("i1"))
        await pubsub.get_message(timeout=1)
        one = await emitter.publish(UserSelector("solo"), "text", b"hi")
        both = await emitter.publish(UserSelector("solo") | UserSelector("solo"), "text", b"hi")
        envelopes: list[bytes] = []
        for _ in range(10):  # bounded: each read waits at most a second
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1)
            if message:
                envelopes.append(message["data"])
            if len(envelopes) == 2:
                break
    assert (one.routed, one.instances, both.routed) == (1, 1, 1)
    first, second = (
        e.replace(r.message_id.encode(), b"ID")
        for e, r in zip(envelopes, (one, both), strict=True)
    )
    assert first == second
    assert first.endswith(b'"targets":["i1:Ab-_9"],"size":2}]}\nhi')
    await redis.hset(keys.users, "ghost", "i9:x")  # an owner nobody hears
    assert (await emitter.publish(UserSelector("ghost"), "text", b"x")).unheard == ("i9",)


@pytest.mark.integration
async def test_concurrent_sends_share_one_publish_per_instance(
    emitter: AsyncEmitter, redis: aioredis.Redis, prefix: str
) -> None:
    """Sends made while another is in flight go out together: one script call, and one
    publish per owning instance that carries their messages in the order they were sent."""
    keys = Keys(prefix)
    people = [make_connection(id=f"i{n % 2 + 1}:c{n}", user=f"u{n}") for n in range(20)]
    await Registry(redis, keys).register(*people)
    await emitter.publish(UserSelector("u0"), "text", b"warm-up")  # the layout is read once
    async with redis.pubsub() as pubsub:
        await pubsub.subscribe(keys.channel("i1"), keys.channel("i2"))
        for _ in range(2):
            await pubsub.get_message(timeout=1)
        routes = await asyncio.gather(
            *(emitter.publish(UserSelector(f"u{n}"), "text", str(n).encode()) for n in range(20))
        )
        publishes: dict[str, list[bytes]] = {"i1": [], "i2": []}
        for _ in range(50):  # bounded: each read waits at most a second
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1)
            if message:
                publishes[message["channel"].decode().rpartition(":")[2]].append(message["data"])
            if sum(len(decode(m)) for p in publishes.values() for m in p) == 20:
                break
    assert [r.routed for r in routes] == [1] * 20
    # The first send (to u0, on i1) goes alone, as nothing was in flight; the other 19
    # share one script call, hence one publish to each instance.
    assert [len(publishes["i1"]), len(publishes["i2"])] == [2, 1]
    for instance, first in (("i1", 0), ("i2", 1)):
        messages = [e for raw in publishes[instance] for e in decode(raw)]
        assert [e.frame for e in messages] == [str(n) for n in range(first, 20, 2)]
        assert [e.id for e in messages] == [r.message_id for r in routes[first::2]]


@pytest.mark.integration
async def test_a_batch_of_mixed_sends_routes_each_its_own(
    emitter: AsyncEmitter, redis: aioredis.Redis, prefix: str
) -> None:
    """Sends in flight together: each gets its own result, index keys are read at each
    call's offset, and an error (a key of the wrong type) reaches only its caller. Index
    sends read holders, not members, so they share the script call too."""
    keys = Keys(prefix)
    people = [make_connection(id=f"i1:c{n}", user=f"u{n}", path=f"/p{n % 2}") for n in range(6)]
    await Registry(redis, keys).register(*people)
    await redis.set(keys.heartbeat("i1"), "1")
    await redis.set(keys.holders(keys.path("/bad")), "not a hash")
    await emitter.publish(UserSelector("u0"), "text", b"warm-up")
    trips = round_trips(await sends_of(emitter))
    async with redis.pubsub() as pubsub:
        await pubsub.subscribe(keys.channel("i1"), keys.broadcast)
        results = await asyncio.gather(
            emitter.publish(PathSelector("/p0"), "text", b"a"),
            emitter.publish(UserSelector("u1"), "text", b"b"),
            emitter.publish(AllSelector(), "text", b"c"),
            emitter.publish(PathSelector("/bad"), "text", b"d"),
            emitter.publish(PathSelector("/p1") & UserSelector("u3"), "text", b"e"),
            return_exceptions=True,
        )
    routed = [r.routed if isinstance(r, Receipt) else type(r) for r in results]
    assert routed == [3, 1, 6, WsLoadBalanceError, 1]
    assert "WRONGTYPE" in str(results[3])
    # The first goes alone; the others, queued behind it, share one script call.
    assert [trip.count("EVALSHA") for trip in trips] == [1, 1]


@pytest.mark.integration
async def test_publish_refuses_what_receivers_could_not_decode(emitter: AsyncEmitter) -> None:
    """One bad message would cost the others of its envelope theirs: refused up front."""
    with pytest.raises(ValueError, match="unknown kind"):
        await emitter.publish(UserSelector("u"), cast(Any, 'te"xt'), b"x")
    with pytest.raises(ValueError, match="UTF-8"):
        await emitter.publish(UserSelector("u"), "text", b"\xff\xfe")
    with pytest.raises(ValueError, match="UTF-8"):
        await emitter.publish(UserSelector("u"), "json", cast(Any, "not bytes"))


@pytest.mark.integration
async def test_send_to_a_user_with_many_connections_reaches_them_all(
    emitter: AsyncEmitter, redis: aioredis.Redis, prefix: str
) -> None:
    keys = Keys(prefix)
    crowd = [make_connection(id=f"i{n % 2}:c{n}", user="crowd") for n in range(20)]
    await Registry(redis, keys).register(*crowd)
    assert await redis.hget(keys.users, "crowd") == b"*"
    assert await emitter.count(UserSelector("crowd")) == 20
    records = await emitter.connections(UserSelector("crowd"))
    assert {r.id for r in records} == {c.id for c in crowd}
    route = await emitter.publish(UserSelector("crowd"), "text", b"x")
    assert (route.routed, sorted(route.unheard)) == (0, ["i0", "i1"])  # nobody subscribed


@pytest.mark.integration
async def test_publish_of_a_custom_selector_counts_each_instance_once(
    emitter: AsyncEmitter, redis: aioredis.Redis, prefix: str
) -> None:
    """Matches of a custom selector are routed page by page; an instance that owns
    connections on several pages is one instance reached, not one per page."""
    keys = Keys(prefix)
    connections = [
        make_connection(id=f"i{n % 2 + 1}:c{n}", user=f"u{n}", metadata={"n": str(n)})
        for n in range(MANY * 2)
    ]
    await Registry(redis, keys).register(*connections)
    async with redis.pubsub() as pubsub:
        await pubsub.subscribe(keys.channel("i1"), keys.channel("i2"))
        evens = await emitter.publish(EvenNumbered(), "text", b"x")
        either = await emitter.publish(MetadataSelector(n="1") | EvenNumbered(), "text", b"x")
    # Even n are all on i1 (n % 2 + 1): MANY matches, over three pages or more.
    assert (evens.routed, evens.instances, evens.unheard) == (MANY, 1, ())
    assert (either.routed, either.instances) == (MANY + 1, 2)


@pytest.mark.integration
async def test_emitter_refuses_a_prefix_of_another_layout(
    redis: aioredis.Redis, prefix: str
) -> None:
    """Keys of another version would be misread: every kind of call says so instead."""
    keys = Keys(prefix)
    await redis.set(keys.layout, "1")
    await redis.hset(keys.instances, "i1", "{}")
    emitter = AsyncEmitter(redis, prefix=prefix)
    with pytest.raises(WsLoadBalanceError, match="layout b'1'"):
        await emitter.send(UserSelector("ann"), "x")
    with pytest.raises(WsLoadBalanceError, match="layout b'1'"):
        await emitter.count()
    with pytest.raises(WsLoadBalanceError, match="layout b'1'"):
        await emitter.connections()
    await redis.set(keys.layout, LAYOUT)
    assert await emitter.count() == 0
    await emitter.aclose()
    await redis.delete(keys.layout, keys.instances)


@pytest.mark.integration
async def test_send_queued_behind_a_stalled_send_fails_within_its_own_timeout(
    private_redis: RedisServer,
) -> None:
    emitter = AsyncEmitter(redis_url=private_redis.url, timeout=2.0, strict=False)
    admin = aioredis.Redis.from_url(private_redis.url)
    try:
        assert await emitter.send(UserSelector("x"), "warm") == 0
        await admin.client_pause(5000)
        first = asyncio.create_task(emitter.send(UserSelector("x"), "1"))
        sends = await sends_of(emitter)
        await eventually(lambda: sends._busy)  # in flight
        started = time.monotonic()
        second = asyncio.create_task(emitter.send(UserSelector("x"), "2"))
        await eventually(lambda: len(sends._queue) == 1)  # queued behind it
        with pytest.raises(RedisUnavailableError, match="in time"):
            await second
        took = time.monotonic() - started
        assert took < 2.0 + 1.0, f"a queued send blocked {took:.2f}s with a 2s timeout"
        with pytest.raises(RedisUnavailableError):
            await first
    finally:  # the private server goes with the test: no need to unpause it
        await admin.aclose()
        await emitter.aclose()


@pytest.mark.integration
@pytest.mark.parametrize("call", ["send", "disconnect", "count"])
async def test_emitter_first_call_raises_within_its_timeout_of_its_start(
    private_redis: RedisServer, call: str
) -> None:
    """An emitter's first call reads the layout marker, then runs its script: both
    within one deadline. Redis answers the marker late (all commands paused), then
    stalls the script (writes paused: Redis takes up that pause, queued first, before
    it answers the marker), so two deadlines in a row would take nearly twice it."""
    timeout = 3.0
    # A handshake that waits for Redis whatever the redis-py release: the marker's GET
    # is sent only once the first pause is over, after the second pause was queued.
    url = private_redis.url + "?client_name=first"
    emitter = AsyncEmitter(redis_url=url, timeout=timeout, strict=False)
    admin = aioredis.Redis.from_url(private_redis.url)
    writes = aioredis.Redis.from_url(private_redis.url)
    try:
        await writes.ping()  # connected before the pause
        await admin.client_pause(int((timeout - 0.2) * 1000))
        pause_writes = asyncio.ensure_future(writes.client_pause(10_000, all=False))
        started = time.monotonic()
        with pytest.raises(RedisUnavailableError, match="in time"):
            if call == "send":
                await emitter.send(UserSelector("x"), "hi")
            elif call == "disconnect":
                await emitter.disconnect(UserSelector("x"))
            else:
                await emitter.count(UserSelector("x"))
        took = time.monotonic() - started
        assert took < timeout + 1.0, f"the first {call} took {took:.2f}s with a {timeout}s timeout"
        assert await pause_writes  # the stall really came after the marker's answer
    finally:  # the private server goes with the test: no need to unpause it
        await writes.aclose()
        await admin.aclose()
        await emitter.aclose()


@pytest.mark.integration
async def test_emitter_from_url_waits_for_a_free_connection(
    private_redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """More concurrent calls than the pool holds: they wait their turn, none fails."""
    emitter = AsyncEmitter(
        redis_url=private_redis.url, timeout=5.0, strict=False, max_connections=4
    )
    admin = aioredis.Redis.from_url(private_redis.url)
    try:
        counts = await asyncio.gather(*(emitter.count(UserSelector("x")) for _ in range(300)))
        assert counts == [0] * 300
        clients = (await admin.info("clients"))["connected_clients"]
        assert clients <= 4 + 1, f"{clients} connections with max_connections=4"
    finally:
        await admin.aclose()
        await emitter.aclose()
    with pytest.raises(ValueError, match="MAX_CONNECTIONS"):
        AsyncEmitter(redis_url=private_redis.url, max_connections=1)
    monkeypatch.setenv("WSLB_REDIS_MAX_CONNECTIONS", "2")  # read like the other options
    with pytest.raises(ValueError, match="MAX_CONNECTIONS"):
        AsyncEmitter(redis_url=private_redis.url)


class UserB(CustomSelector):
    """The connections of user ``b``, matched here rather than by an index."""

    def matches(self, connection: ConnectionInfo) -> bool:
        return connection.user == "b"


async def heard_ids(pubsub: Any, count: int) -> list[str]:
    """The ids of the first ``count`` distinct messages heard, in the order heard."""
    ids: list[str] = []
    deadline = time.monotonic() + 20
    while len(ids) < count and time.monotonic() < deadline:
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1)
        for envelope in decode(message["data"]) if message else ():
            if envelope.id not in ids[-2:]:  # a custom selector's pages repeat its id
                ids.append(envelope.id)
    return ids


@pytest.mark.integration
async def test_send_many_routes_mixed_selectors_in_order_in_few_round_trips(
    emitter: AsyncEmitter, redis: aioredis.Redis, prefix: str
) -> None:
    """Counts come back in order, per selector kind; the messages reach the instance's
    channel in the order given, custom selectors included; each round trip carries at
    most MAX_PIPELINE script calls."""
    keys = Keys(prefix)
    people = [make_connection(id="i1:c0", user="a"), make_connection(id="i1:c1", user="b")]
    people.append(make_connection(id="i1:c2", user="b"))
    people[1].groups.add("g")
    await Registry(redis, keys).register(*people)
    await redis.hset(keys.instances, "i1", json.dumps({"started_at": 1.0}))
    await redis.set(keys.heartbeat("i1"), "1")  # a broadcast counts live instances' records
    messages: list[tuple[Any, object]] = [(UserSelector("ab"[n % 2]), str(n)) for n in range(2100)]
    extra: dict[int, tuple[Any, object]] = {700: (UserB(), "custom")}
    extra[1500] = (GroupSelector("g"), b"group")
    extra |= {1800: (AllSelector(), {"all": 1}), 1900: (UserSelector("nobody"), "x")}
    for at, item in sorted(extra.items()):  # each at its final index
        messages.insert(at, item)
    expected = [1 + (s == UserSelector("b")) for s, _ in messages]
    for at, count in zip(sorted(extra), (2, 1, 3, 0), strict=True):
        expected[at] = count
    await emitter.send(UserSelector("a"), "warm-up")
    trips = round_trips(await sends_of(emitter))
    async with redis.pubsub() as pubsub:
        await pubsub.subscribe(keys.channel("i1"), keys.broadcast)
        for _ in range(2):
            await pubsub.get_message(timeout=1)
        routes = await emitter.publish_many(
            [
                (s, "text", m if isinstance(m, bytes) else json.dumps(m).encode())
                for s, m in messages
            ]
        )
        wanted = [r.message_id for r in routes if r.routed]
        heard = await heard_ids(pubsub, len(wanted))
        assert await emitter.send_many([(UserSelector("b"), "x"), (UserB(), b"y")]) == [2, 2]
    # The broadcast has a channel of its own: only the order on i1's is defined.
    heard.remove(routes[1800].message_id)
    wanted.remove(routes[1800].message_id)
    assert [r.routed for r in routes] == expected
    assert heard == wanted
    pipelines = [trip.count("EVALSHA") for trip in trips]
    assert max(pipelines) <= MAX_PIPELINE, pipelines
    # 2104 sends in 17 script calls, and the custom one routed alone between them.
    assert len(pipelines) <= 6, pipelines
    assert await emitter.send_many([]) == []


@pytest.mark.integration
@pytest.mark.parametrize(
    "bad",
    [
        (UserSelector("a"), object()),
        ("a", "x"),
        (UserSelector("a"),),
        [UserSelector("a"), "x"],
    ],
)
async def test_send_many_refuses_bad_pairs_before_publishing_any(
    emitter: AsyncEmitter, redis: aioredis.Redis, prefix: str, bad: Any
) -> None:
    keys = Keys(prefix)
    await Registry(redis, keys).register(make_connection(id="i1:c0", user="a"))
    async with redis.pubsub() as pubsub:
        await pubsub.subscribe(keys.channel("i1"))
        await pubsub.get_message(timeout=1)
        with pytest.raises(TypeError):
            await emitter.send_many([(UserSelector("a"), "first"), bad])
        with pytest.raises(ValueError, match="UTF-8"):
            await emitter.publish_many(
                [(UserSelector("a"), "text", b"ok"), (UserSelector("a"), "text", b"\xff")]
            )
        assert await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.3) is None


@pytest.mark.integration
async def test_send_many_to_an_unreachable_redis_raises_within_its_timeout() -> None:
    emitter = AsyncEmitter(redis_url=f"redis://127.0.0.1:{free_port()}", prefix="p", timeout=0.5)
    start = time.monotonic()
    with pytest.raises(RedisUnavailableError):
        await emitter.send_many([(UserSelector("a"), str(n)) for n in range(3000)])
    took = time.monotonic() - start
    await emitter.aclose()
    assert took < 5, f"took {took:.2f} s"


async def holders_and_members(
    redis: aioredis.Redis, keys: Keys
) -> tuple[dict[str, dict[str, int]], dict[str, dict[str, int]]]:
    """Every holders hash under the prefix, and what it should hold: per index set, the
    count of its members on each instance."""
    root = "{" + keys.prefix + "}:"
    held: dict[str, dict[str, int]] = {}
    counted: dict[str, dict[str, int]] = {}
    async for raw in redis.scan_iter(match=root + "*", count=1000):
        key = raw.decode() if isinstance(raw, bytes) else raw
        word = key[len(root) :].partition(":")[0]
        if word in ("ip", "im", "ig"):
            pairs = cast(dict[bytes, bytes], await redis.hgetall(key))
            held[key] = {k.decode(): int(v) for k, v in pairs.items()}
        elif word in ("p", "m", "g"):
            counts: dict[str, int] = {}
            for member in await redis.smembers(key):
                instance = cast(bytes, member).decode().partition(":")[0]
                counts[instance] = counts.get(instance, 0) + 1
            counted[keys.holders(key)] = counts
    return held, counted


@pytest.mark.integration
async def test_holders_count_each_instances_members_through_every_change(
    redis: aioredis.Redis, emitter: AsyncEmitter, prefix: str, admin_redis_url: str
) -> None:
    """Register, register again with other indexes (a repair), join, leave, unregister
    and reap each keep every holders hash equal to the members it counts."""
    admin = aioredis.Redis.from_url(admin_redis_url)  # SCAN: not the library's ACL user's
    keys = Keys(prefix)
    registry = Registry(redis, keys)
    await redis.hset(keys.instances, "i1", "{}")
    people = [
        make_connection(
            id=f"i{1 + n % 3}:c{n}",
            user=f"u{n % 4}",
            path=f"/p{n % 2}",
            metadata={"m": str(n % 5)},
        )
        for n in range(30)
    ]

    async def step(name: str) -> None:
        held, counted = await holders_and_members(admin, keys)
        assert held == counted, name

    await registry.register(*people)
    await step("register")
    moved = people[:6]
    for connection in moved:
        connection.path = "/elsewhere"
        connection.groups.add("re")
    await registry.register(*moved)
    await step("register again")
    assert await emitter.join(PathSelector("/p0"), "g") == 12
    assert await emitter.join(UserSelector("u1"), "g") == 8  # some were in g already
    await step("join")
    assert await emitter.leave(MetadataSelector(m="2"), "g") == 6
    await step("leave")
    await registry.unregister([c.id for c in people[10:15]])
    await step("unregister")
    await registry.unregister_instance("i2")
    await step("reap")
    held, _ = await holders_and_members(admin, keys)
    assert held and all("i2" not in counts for counts in held.values())
    for instance in ("i1", "i3"):
        await registry.unregister_instance(instance)
    await step("every instance gone")
    assert await holders_and_members(admin, keys) == ({}, {})
    await admin.aclose()


@pytest.mark.integration
@pytest.mark.parametrize("op", ["S9", "Sx", "S", "Zzz"])
async def test_a_bad_op_fails_only_its_own_send_of_a_batch(
    emitter: AsyncEmitter, redis: aioredis.Redis, prefix: str, op: str
) -> None:
    """One script call routes a batch; an op that cannot be read fails its own call,
    never its neighbours (the one-set short path included)."""
    keys = Keys(prefix)
    await Registry(redis, keys).register(make_connection(id="i1:c", user="u", path="/p"))
    await redis.set(keys.heartbeat("i1"), "1")
    good: Args = ([], ["m1", "text", b"a", b"", "Uu"], False)
    by_set: Args = ([keys.path("/p")], ["m2", "text", b"b", b'"sel":["x"],', "S3"], False)
    bad: Args = ([], ["m3", "text", b"c", b'"sel":["x"],', op], False)
    async with redis.pubsub() as pubsub:
        await pubsub.subscribe(keys.channel("i1"))
        replies = await (await sends_of(emitter)).many([good, bad, by_set])
    assert isinstance(replies[1], Exception), replies
    assert replies[0][0] == 1 and replies[2][0] == 1, replies


@pytest.mark.integration
async def test_stream_pages_are_bounded_and_hold_every_record(
    emitter: AsyncEmitter, populated: int
) -> None:
    pages = [page async for page in emitter.connections().pages()]
    assert len(pages) >= 2, f"{populated} records in {len(pages)} page(s)"
    assert all(len(page) <= 2 * PAGE for page in pages), [len(page) for page in pages]
    assert sum(len(page) for page in pages) == populated
    users = [page async for page in emitter.users(UserSelector("u3")).pages()]
    assert [user for page in users for user in page] == ["u3"]
