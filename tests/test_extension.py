"""The extension: wiring into an app, and ``send`` across two apps sharing one Redis."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any, cast

import fakeredis
import pytest
from quart import Quart, websocket
from quart import typing as quart_typing
from quart.testing.app import LifespanError
from quart.testing.connections import WebsocketDisconnectError
from redis.asyncio import Redis

from quart_wslb import (
    AllSelector,
    ConnectionSelector,
    GroupSelector,
    MetadataSelector,
    NotStartedError,
    PathSelector,
    RedisAuthenticationError,
    RedisUnavailableError,
    UserSelector,
    WsLoadBalance,
    signals,
)
from quart_wslb.config import DEFAULTS
from quart_wslb.envelope import decode
from quart_wslb.keys import LAYOUT
from quart_wslb.testing import RedisServer, free_port
from tests.support import (
    KEYS,
    PREFIX,
    SOON,
    Served,
    eventually,
    fake_client,
    make_app,
    received,
    record_ids,
    recording,
    registry_keys,
    serving,
    stored_record,
)

Socket = quart_typing.TestWebsocketConnectionProtocol


async def frame(ws: Socket) -> str | bytes:
    """The next frame a test client receives (within ``SOON``)."""
    async with asyncio.timeout(SOON):
        return await ws.receive()


async def greeting(ws: Socket) -> str:
    """The connection id the app greets a new client with (it is registered by then)."""
    hello = json.loads(await frame(ws))
    assert isinstance(hello["hello"], str)
    return hello["hello"]


async def silent(ws: Socket, wait: float = 0.05) -> bool:
    """Whether nothing arrives on ``ws`` for ``wait`` seconds."""
    try:
        async with asyncio.timeout(wait):
            await ws.receive()
    except TimeoutError:
        return True
    return False


@pytest.fixture(name="two")
async def fixture_two(fake_server: fakeredis.FakeServer) -> AsyncIterator[tuple[Served, Served]]:
    """Two app instances, ``i1`` and ``i2``, serving on one fakeredis server."""
    async with serving(fake_server, "i1") as one, serving(fake_server, "i2") as two:
        yield one, two


def test_init_app_registers_the_extension(fake_redis: Redis) -> None:
    app, wslb = make_app(fake_redis, "i1")
    assert app.extensions["wslb"] is wslb
    assert cast(Any, app).wslb is wslb
    assert wslb.instance_id == "i1"
    assert wslb.keys.prefix == PREFIX
    assert wslb.local_connections == {}


def test_init_app_later(fake_redis: Redis) -> None:
    app = Quart(__name__)
    wslb = WsLoadBalance(redis=fake_redis)
    with pytest.raises(RuntimeError, match="init_app"):
        wslb.settings  # noqa: B018
    wslb.init_app(app)
    assert app.extensions["wslb"] is wslb
    assert wslb.settings.prefix == DEFAULTS["prefix"]


async def test_init_app_refuses_a_client_that_decodes_responses() -> None:
    decoding = Redis(decode_responses=True)  # as the emitters do (checked_client)
    with pytest.raises(ValueError, match="decode_responses"):
        WsLoadBalance(Quart(__name__), redis=decoding)
    await decoding.aclose()


def test_init_app_twice_raises(fake_redis: Redis) -> None:
    app, wslb = make_app(fake_redis, "i1")
    with pytest.raises(RuntimeError, match="already bound"):
        wslb.init_app(app)
    with pytest.raises(RuntimeError, match="already bound"):
        wslb.init_app(Quart(__name__))


def test_init_app_second_extension_raises(fake_redis: Redis) -> None:
    app, wslb = make_app(fake_redis, "i1")
    with pytest.raises(RuntimeError, match="already has"):
        WsLoadBalance(app, redis=fake_redis)
    assert app.extensions["wslb"] is wslb


def test_init_app_argument_beats_config(fake_redis: Redis) -> None:
    app = Quart(__name__)
    app.config.update(WSLB_PREFIX="cfg", WSLB_SEND_QUEUE_SIZE=5, WSLB_QUEUE_FULL="drop")
    wslb = WsLoadBalance(app, redis=fake_redis, send_queue_size=7)
    settings = wslb.settings
    assert (settings.prefix, settings.send_queue_size, settings.queue_full) == ("cfg", 7, "drop")


def test_init_app_plain_app_reads_exported_options(monkeypatch: pytest.MonkeyPatch) -> None:
    """``WsLoadBalance(app)`` and nothing else: the environment sets what the app left open,
    and the app's config, then an argument, win over it."""
    monkeypatch.setenv("WSLB_INSTANCE_ID", "exported-1")
    monkeypatch.setenv("WSLB_REDIS_URL", "redis://exported:6390/2")
    monkeypatch.setenv("WSLB_SEND_QUEUE_SIZE", "9")
    monkeypatch.setenv("WSLB_PREFIX", "env")
    settings = WsLoadBalance(Quart(__name__)).settings
    assert (settings.instance_id, settings.redis_url) == ("exported-1", "redis://exported:6390/2")
    assert (settings.send_queue_size, settings.prefix) == (9, "env")
    app = Quart(__name__)
    app.config["WSLB_PREFIX"] = "cfg"
    settings = WsLoadBalance(app, send_queue_size=3).settings
    assert (settings.prefix, settings.send_queue_size) == ("cfg", 3)


async def test_start_logs_the_redis_it_uses(caplog: pytest.LogCaptureFixture) -> None:
    """An instance names at start the Redis it uses, credentials masked: a plain
    ``WsLoadBalance(app)`` otherwise quietly means 127.0.0.1:6379."""
    caplog.set_level(logging.INFO, logger="quart_wslb")
    port = free_port()  # nothing listens: the instance starts anyway, retrying
    url = f"redis://ann:secret-pass@127.0.0.1:{port}/3"
    app, _ = make_app(None, "i1", redis_url=url, redis_timeout=0.5)
    async with app.test_app():
        pass
    client = fake_client(fakeredis.FakeServer())
    app, _ = make_app(client, "i2")
    async with app.test_app():
        pass
    await client.aclose()
    starts = [record.getMessage() for record in caplog.records if "starts on" in record.msg]
    assert starts == [
        f"instance i1 starts on redis://***@127.0.0.1:{port}/3, prefix '{PREFIX}'",
        f"instance i2 starts on the Redis client passed in, prefix '{PREFIX}'",
    ]


def test_init_app_bad_config_raises(fake_redis: Redis) -> None:
    app = Quart(__name__)
    app.config["WSLB_INSTANCE_ID"] = "has:colon"
    with pytest.raises(ValueError, match="WSLB_INSTANCE_ID"):
        WsLoadBalance(app, redis=fake_redis)
    assert "wslb" not in app.extensions


async def test_serving_emitter_takes_the_settings_not_the_environment(
    fake_server: fakeredis.FakeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The instance's own emitter uses the options the app resolved (config over the
    environment), rather than reading the environment again."""
    monkeypatch.setenv("WSLB_REDIS_MAX_CONNECTIONS", "2")  # refused, but the argument wins
    async with serving(fake_server, "i1", redis_max_connections=8, redis_timeout=3) as one:
        emitter = one.wslb.emitter
        assert (emitter.keys.prefix, emitter.timeout) == (PREFIX, 3.0)


async def test_send_before_serving_raises(fake_redis: Redis) -> None:
    _, wslb = make_app(fake_redis, "i1")
    with pytest.raises(NotStartedError, match="not serving"):
        await wslb.send(UserSelector("alice"), "hi")
    with pytest.raises(RuntimeError):
        await wslb.resolve(UserSelector("alice"))


async def test_send_after_stopping_raises(fake_server: fakeredis.FakeServer) -> None:
    async with serving(fake_server, "i1") as one:
        assert await one.wslb.send(UserSelector("alice"), "hi") == 0
    with pytest.raises(NotStartedError):
        await one.wslb.send(UserSelector("alice"), "hi")


@pytest.mark.parametrize("message", [1, None, {"a"}, {"a": object()}, ("t",)])
async def test_send_bad_message_raises_before_publishing(
    fake_server: fakeredis.FakeServer, fake_redis: Redis, message: object
) -> None:
    async with fake_redis.pubsub() as pubsub, serving(fake_server, "i1") as one:
        await pubsub.psubscribe("{" + PREFIX + "}:*")
        async with one.client.websocket("/ws/red?user=alice") as ws:
            await greeting(ws)
            with pytest.raises(TypeError):
                await one.wslb.send(UserSelector("alice"), message)
            with pytest.raises(TypeError, match="Selector"):
                await one.wslb.send(cast(Any, "alice"), "hi")
            assert await one.wslb.send(UserSelector("alice"), "ok") == 1
            assert await frame(ws) == "ok"
        envelopes = [raw for raw in await received(pubsub) if raw.startswith(b"{")]
    assert [e.frame for raw in envelopes for e in decode(raw)] == ["ok"]


async def test_send_crosses_instances(two: tuple[Served, Served]) -> None:
    one, two_ = two
    async with (
        one.client.websocket("/ws/red?user=alice") as alice,
        two_.client.websocket("/ws/red?user=bob") as bob,
        two_.client.websocket("/ws/blue?user=alice") as alice2,
    ):
        alice_id, bob_id, alice2_id = (
            await greeting(alice),
            await greeting(bob),
            await greeting(alice2),
        )
        assert alice_id.startswith("i1:") and bob_id.startswith("i2:")

        assert await two_.wslb.send(UserSelector("bob"), {"to": "bob"}) == 1
        assert json.loads(await frame(bob)) == {"to": "bob"}

        assert await two_.wslb.send(ConnectionSelector(alice_id), "only you") == 1
        assert await frame(alice) == "only you"

        assert await one.wslb.send(UserSelector("alice"), b"\x00\x01") == 2
        assert await frame(alice) == b"\x00\x01"
        assert await frame(alice2) == b"\x00\x01"

        assert await one.wslb.send(MetadataSelector(room="red"), "red room") == 2
        assert await frame(alice) == "red room"
        assert await frame(bob) == "red room"

        assert await two_.wslb.send(PathSelector("/ws/blue") | UserSelector("bob"), "x") == 2
        assert await frame(alice2) == "x"
        assert await frame(bob) == "x"

        assert await one.wslb.send(AllSelector(), ["all"]) == 3
        for ws in (alice, bob, alice2):
            assert await frame(ws) == '["all"]'

        assert await one.wslb.send(UserSelector("carol"), "nobody") == 0
        assert await one.wslb.resolve(UserSelector("alice")) == {
            "i1": [alice_id],
            "i2": [alice2_id],
        }
        for ws in (alice, bob, alice2):
            assert await silent(ws)


async def test_send_only_owning_instances_receive(two: tuple[Served, Served]) -> None:
    one, two_ = two
    async with one.client.websocket("/ws/red?user=alice") as alice:
        await greeting(alice)
        with (
            recording(signals.message_received, one.wslb) as got_one,
            recording(signals.message_received, two_.wslb) as got_two,
            recording(signals.message_routed, two_.wslb) as routed,
        ):
            assert await two_.wslb.send(UserSelector("alice"), "hi") == 1
            assert await frame(alice) == "hi"
    assert len(got_one.calls) == 1
    assert got_two.calls == []
    [call] = routed.calls
    assert (call["routed"], call["instances"]) == (1, 1)
    assert call["selector"] == UserSelector("alice")


async def test_closed_websocket_leaves_no_record(two: tuple[Served, Served]) -> None:
    one, two_ = two
    with (
        recording(signals.connection_opened, one.wslb) as opened,
        recording(signals.connection_closed, one.wslb) as closed,
    ):
        async with one.client.websocket("/ws/red?user=alice") as ws:
            conn_id = await greeting(ws)
            assert list(one.wslb.local_connections) == [conn_id]
            keys = await registry_keys(one.redis)
            assert {KEYS.users, KEYS.path("/ws/red"), KEYS.metadata("room", "red")} <= keys
            assert conn_id in await record_ids(one.redis)
    assert [c["connection"].id for c in opened.calls] == [conn_id]
    assert [c["connection"].id for c in closed.calls] == [conn_id]
    assert one.wslb.local_connections == {}
    assert len(await record_ids(one.redis)) == 0
    assert not await one.redis.exists(
        KEYS.users, KEYS.path("/ws/red"), KEYS.metadata("room", "red")
    )
    assert await two_.wslb.send(UserSelector("alice"), "late") == 0


async def test_handler_return_leaves_no_record(two: tuple[Served, Served]) -> None:
    one, _ = two
    async with one.client.websocket("/ws/red?user=alice") as ws:
        await greeting(ws)
        await ws.send("close")
        with pytest.raises(WebsocketDisconnectError):
            await frame(ws)
    assert len(await record_ids(one.redis)) == 0
    assert one.wslb.local_connections == {}


async def test_anonymous_connection_has_no_user_index(two: tuple[Served, Served]) -> None:
    one, two_ = two
    async with one.client.websocket("/ws/red") as ws:
        conn_id = await greeting(ws)
        record = await stored_record(one.redis, conn_id)
        assert "u" not in record
        assert await one.redis.hlen(KEYS.users) == 0
        assert await two_.wslb.send(PathSelector("/ws/red"), "hi") == 1
        assert await frame(ws) == "hi"


async def test_stop_closes_clients_and_removes_the_instance(
    fake_server: fakeredis.FakeServer,
) -> None:
    redis = fake_client(fake_server)
    app, wslb = make_app(redis, "i1")
    test_app = app.test_app()
    await test_app.startup()
    async with app.test_client().websocket("/ws/red?user=alice") as ws:
        await greeting(ws)
        assert len(await record_ids(redis)) == 1
        await test_app.shutdown()
        with pytest.raises(WebsocketDisconnectError) as closed:
            await frame(ws)
    assert closed.value.args == (1001,)
    assert len(await record_ids(redis)) == 0
    assert not await redis.exists(KEYS.records("i1"), KEYS.heartbeat("i1"))
    assert not await redis.exists(KEYS.instances, KEYS.layout)  # it was the last one
    await redis.aclose()


async def test_start_refuses_a_prefix_of_another_layout(
    fake_server: fakeredis.FakeServer,
) -> None:
    """Two versions whose keys differ cannot share a prefix: each would miss the other's
    records. The instance says so at start and announces nothing."""
    redis = fake_client(fake_server)
    await redis.set(KEYS.layout, "1")
    app, _ = make_app(redis, "i1")
    with pytest.raises(LifespanError, match="layout b'1'.*a prefix of its own"):
        await app.test_app().startup()  # Quart's test app reports the startup failure
    assert not await redis.exists(KEYS.instances, KEYS.heartbeat("i1"))
    await redis.delete(KEYS.layout)
    test_app = app.test_app()
    await test_app.startup()
    assert await redis.get(KEYS.layout) == LAYOUT.encode()
    await test_app.shutdown()
    await redis.aclose()


async def test_serving_twice_works(fake_server: fakeredis.FakeServer) -> None:
    redis = fake_client(fake_server)
    app, wslb = make_app(redis, "i1")
    for _ in range(2):
        async with app.test_app() as test_app:
            async with test_app.test_client().websocket("/ws/red?user=a") as ws:
                await greeting(ws)
                assert await wslb.send(UserSelector("a"), "again") == 1
                assert await frame(ws) == "again"
    await redis.aclose()


async def test_client_leaving_during_open_leaves_nothing(
    fake_server: fakeredis.FakeServer,
) -> None:
    entered = asyncio.Event()

    async def slow_receiver(sender: object, connection: object) -> None:
        entered.set()
        await asyncio.sleep(SOON * 10)  # e.g. announcing the user with wslb.send

    async with serving(fake_server, "i1") as one:
        with (
            signals.connection_opened.connected_to(slow_receiver, one.wslb),
            recording(signals.connection_closed, one.wslb) as closed,
        ):
            async with one.client.websocket("/ws/red?user=alice"):
                async with asyncio.timeout(SOON):
                    await entered.wait()
            await eventually(lambda: bool(closed.calls))  # sent once it is unregistered
        assert one.wslb.local_connections == {}
        assert len(await record_ids(one.redis)) == 0


async def test_presence_signals_fire_once_per_user(two: tuple[Served, Served]) -> None:
    one, two_ = two
    with (
        recording(signals.user_online) as online,
        recording(signals.user_offline) as offline,
    ):
        async with one.client.websocket("/ws/red?user=alice") as first:
            await greeting(first)
            async with two_.client.websocket("/ws/blue?user=alice") as second:
                await greeting(second)
                assert [u async for u in two_.wslb.users()] == ["alice"]
            assert offline.calls == []
        await eventually(lambda: bool(offline.calls))
    assert [(c["sender"], c["user"]) for c in online.calls] == [(one.wslb, "alice")]
    assert [(c["sender"], c["user"]) for c in offline.calls] == [(one.wslb, "alice")]


async def test_queries_span_instances(two: tuple[Served, Served]) -> None:
    one, two_ = two
    async with (
        one.client.websocket("/ws/red?user=alice") as alice,
        two_.client.websocket("/ws/red?user=bob") as bob,
    ):
        alice_id, bob_id = await greeting(alice), await greeting(bob)
        assert await one.wslb.count() == 2
        assert await one.wslb.count(MetadataSelector(room="red") & UserSelector("bob")) == 1
        records = {r.id: r async for r in two_.wslb.connections(PathSelector("/ws/red"))}
        assert set(records) == {alice_id, bob_id}
        assert (records[bob_id].instance, records[bob_id].metadata) == ("i2", {"room": "red"})
        assert sorted([u async for u in one.wslb.users()]) == ["alice", "bob"]
        instances = {i.id: i.connections for i in await one.wslb.instances()}
        assert instances == {"i1": 1, "i2": 1}


async def test_disconnect_closes_a_client_on_another_instance(
    two: tuple[Served, Served],
) -> None:
    one, two_ = two
    async with one.client.websocket("/ws/red?user=alice") as alice:
        await greeting(alice)
        assert await two_.wslb.disconnect(UserSelector("alice"), 4003, "kicked") == 1
        with pytest.raises(WebsocketDisconnectError) as closed:
            await frame(alice)
        assert closed.value.args == (4003,)
        await eventually(lambda: not one.wslb.local_connections)
    assert len(await record_ids(one.redis)) == 0


async def test_join_makes_a_group_addressable(two: tuple[Served, Served]) -> None:
    one, two_ = two
    async with (
        one.client.websocket("/ws/red?user=alice") as alice,
        two_.client.websocket("/ws/red?user=bob") as bob,
    ):
        await greeting(alice)
        await greeting(bob)
        assert await one.wslb.join(UserSelector("alice") | UserSelector("bob"), "vip") == 2
        assert await two_.wslb.send(GroupSelector("vip"), "for vips") == 2
        assert await frame(alice) == "for vips"
        assert await frame(bob) == "for vips"
        assert await two_.wslb.leave(UserSelector("bob"), "vip") == 1
        assert await one.wslb.send(GroupSelector("vip"), "alice only") == 1
        assert await frame(alice) == "alice only"
        assert await silent(bob)


@pytest.fixture(name="locked_redis")
async def fixture_locked_redis(private_redis: RedisServer) -> AsyncIterator[str]:
    """A private Redis that requires the password ``right-pass``; yields its address."""
    async with Redis.from_url(private_redis.url) as admin:
        await admin.config_set("requirepass", "right-pass")
    yield f"127.0.0.1:{private_redis.port}"


@pytest.mark.integration
@pytest.mark.parametrize("credentials", [":wrong-pass@", "", "nobody:right-pass@"])
async def test_start_fails_when_redis_refuses_the_credentials(
    locked_redis: str, credentials: str
) -> None:
    app = Quart(__name__)
    WsLoadBalance(app, redis_url=f"redis://{credentials}{locked_redis}/0", redis_timeout=2)
    with pytest.raises(LifespanError, match="refused the credentials") as raised:
        await app.test_app().startup()
    assert "right-pass" not in str(raised.value)
    assert "wrong-pass" not in str(raised.value)


@pytest.mark.integration
async def test_send_after_a_password_change_says_the_credentials_were_refused(
    locked_redis: str,
) -> None:
    app = Quart(__name__)
    wslb = WsLoadBalance(app, redis_url=f"redis://:right-pass@{locked_redis}/0", redis_timeout=2)
    test_app = app.test_app()
    await test_app.startup()
    try:
        assert await wslb.send(UserSelector("nobody"), "x") == 0
        async with Redis.from_url(f"redis://:right-pass@{locked_redis}/0") as admin:
            await admin.config_set("requirepass", "rotated-pass")
            await admin.client_kill_filter(_type="normal", skipme=True)
        with pytest.raises(RedisUnavailableError):  # the killed connection, or the password
            await wslb.send(UserSelector("nobody"), "x")
        for call in (wslb.send(UserSelector("nobody"), "x"), wslb.count()):
            with pytest.raises(RedisAuthenticationError, match="refused the") as raised:
                await call
            assert isinstance(raised.value, RedisUnavailableError)  # Redis is out of reach
            assert "right-pass" not in str(raised.value)
            assert "did not answer" not in str(raised.value)
    finally:
        await test_app.shutdown()


@pytest.mark.integration
async def test_password_appears_in_no_log_line_error_or_record(
    locked_redis: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The password of the Redis URL, through a start, a registered connection, a
    rotated password (failing sends, ticks, subscriptions) and a stop."""
    caplog.set_level(logging.DEBUG)
    url = f"redis://:right-pass@{locked_redis}/0"
    app, wslb = make_app(None, "i1", redis_url=url, heartbeat_interval=0.2, instance_ttl=1.0)
    seen: list[str] = [repr(wslb.settings), str(wslb.settings)]
    async with app.test_app() as test_app:
        async with test_app.test_client().websocket("/ws/red?user=ann") as ws:
            await greeting(ws)
            async with Redis.from_url(url) as admin:
                for key in await admin.keys("*"):
                    seen.append(repr(await admin.dump(key)))
                await admin.config_set("requirepass", "rotated-pass")
                await admin.client_kill_filter(_type="normal", skipme=True)
            for _ in range(2):
                try:
                    await wslb.send(UserSelector("ann"), "x")
                except RedisUnavailableError as error:
                    seen.append(str(error))
            await asyncio.sleep(1.0)  # failing liveness ticks and subscriptions
    assert len(seen) > 5
    seen += [record.getMessage() for record in caplog.records]
    leaks = [text for text in seen if "right-pass" in text or "rotated-pass" in text]
    assert not leaks, leaks[:3]
    refused = [text for text in seen if "refused the credentials" in text]
    unclear = [text for text in seen if "auth:AuthenticationError" in text]
    assert refused and not unclear, unclear[:3]


async def test_send_many_arrives_in_order_with_a_signal_per_message(
    two: tuple[Served, Served],
) -> None:
    one, two_ = two
    async with (
        one.client.websocket("/ws/red?user=alice") as alice,
        two_.client.websocket("/ws/blue?user=bob") as bob,
    ):
        await greeting(alice)
        await greeting(bob)
        messages: list[tuple[Any, object]] = [(UserSelector("alice"), str(n)) for n in range(6)]
        messages += [(UserSelector("carol"), "nobody"), (MetadataSelector(room="blue"), [1])]
        with recording(signals.message_routed, two_.wslb) as routed:
            counts = await two_.wslb.send_many(messages)
        assert counts == [1] * 6 + [0, 1]  # (the test app queues 8 frames)
        assert [await frame(alice) for _ in range(6)] == [str(n) for n in range(6)]
        assert await frame(bob) == "[1]"
        with pytest.raises(TypeError):
            await two_.wslb.send_many([(UserSelector("alice"), "x"), (UserSelector("bob"), 1.5)])
        assert await silent(alice) and await silent(bob)
    assert [call["routed"] for call in routed.calls] == counts
    assert [call["selector"] for call in routed.calls] == [s for s, _ in messages]
    assert len({call["message_id"] for call in routed.calls}) == len(messages)


async def test_track_registers_an_undecorated_handler(fake_server: fakeredis.FakeServer) -> None:
    redis = fake_client(fake_server)
    app = Quart(__name__)
    wslb = WsLoadBalance(app, redis=redis, instance_id="i1", prefix=PREFIX)

    @app.websocket("/plain")
    async def plain() -> None:
        async with wslb.track(user=lambda: "ann", metadata=lambda: {"room": "r"}) as connection:
            await connection.send(connection.id)
            await websocket.receive()  # until the client leaves

    try:
        async with app.test_app() as test_app, test_app.test_client().websocket("/plain") as ws:
            conn_id = await frame(ws)
            assert await wslb.send(UserSelector("ann"), "hi") == 1
            assert await frame(ws) == "hi"
            record = await stored_record(redis, str(conn_id))
            assert (record["u"], record["p"], record["m"]) == ("ann", "/plain", {"room": "r"})
        await eventually(lambda: not wslb.local_connections)
        assert await record_ids(redis) == set()
    finally:
        await redis.aclose()
