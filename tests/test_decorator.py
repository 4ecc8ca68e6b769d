"""``ws_route``: registering the handler's connection, its user and metadata getters."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any, cast

import pytest
from quart import Quart, abort, websocket
from quart.signals import got_websocket_exception
from quart.testing.connections import WebsocketDisconnectError, WebsocketResponseError
from redis.asyncio import Redis

from quart_wslb import UserSelector, WsLoadBalance, current_connection, ws_route
from tests.support import (
    PREFIX,
    SOON,
    eventually,
    record_ids,
    recording,
    stored_record,
)


def tracked_app(
    redis: Redis,
    *,
    route_user: Callable[[], Any] | None = None,
    metadata: Callable[[], Any] | None = None,
    fail: bool = False,
    **options: Any,
) -> tuple[Quart, WsLoadBalance]:
    """An app whose one route, ``ws_route(user=route_user, metadata=metadata)``, greets
    with the connection record, then ends on any frame (raising if ``fail``); ``options``
    go to the extension."""
    app = Quart(__name__)
    wslb = WsLoadBalance(app, redis=redis, instance_id="i1", prefix=PREFIX, **options)

    @app.websocket("/ws")
    @ws_route(user=route_user, metadata=metadata)
    async def handler() -> None:
        connection = current_connection
        await connection.send({"id": connection.id, "user": connection.user,
                               "metadata": dict(connection.metadata)})  # fmt: skip
        await websocket.receive()
        if fail:
            raise RuntimeError("handler broke")

    return app, wslb


async def record_of(app: Quart, redis: Redis, path: str = "/ws") -> dict[str, Any]:
    """What a client of ``app`` is greeted with, checked against its Redis record."""
    async with app.test_app() as test_app:
        async with test_app.test_client().websocket(path) as ws:
            async with asyncio.timeout(SOON):
                hello: dict[str, Any] = json.loads(await ws.receive())
            stored = await stored_record(redis, hello["id"])
            assert (stored.get("u"), stored.get("m", {})) == (hello["user"], hello["metadata"])
            return hello


async def test_ws_route_sync_getters(fake_redis: Redis) -> None:
    app, _ = tracked_app(
        fake_redis,
        route_user=lambda: websocket.args.get("u"),
        metadata=lambda: {"q": websocket.args["q"]},
    )
    hello = await record_of(app, fake_redis, "/ws?u=ann&q=1")
    assert (hello["user"], hello["metadata"]) == ("ann", {"q": "1"})


async def test_ws_route_async_getters(fake_redis: Redis) -> None:
    async def user() -> str:
        await asyncio.sleep(0)
        return "async-user"

    async def metadata() -> dict[str, str]:
        return {"k": "v", "k:2": "v=2"}

    app, _ = tracked_app(fake_redis, route_user=user, metadata=metadata)
    hello = await record_of(app, fake_redis)
    assert (hello["user"], hello["metadata"]) == ("async-user", {"k": "v", "k:2": "v=2"})


async def test_ws_route_user_defaults_to_extension_option(fake_redis: Redis) -> None:
    app, _ = tracked_app(fake_redis, user=lambda: "from-option")
    assert (await record_of(app, fake_redis))["user"] == "from-option"


async def test_ws_route_user_overrides_extension_option(fake_redis: Redis) -> None:
    app, _ = tracked_app(fake_redis, route_user=lambda: "from-route", user=lambda: "from-option")
    assert (await record_of(app, fake_redis))["user"] == "from-route"


async def test_ws_route_without_any_user_is_anonymous(fake_redis: Redis) -> None:
    app, _ = tracked_app(fake_redis)
    assert (await record_of(app, fake_redis))["user"] is None


@pytest.mark.parametrize("name", [None, ""])
async def test_ws_route_no_user_is_anonymous(fake_redis: Redis, name: str | None) -> None:
    app, _ = tracked_app(fake_redis, route_user=lambda: name)
    assert (await record_of(app, fake_redis))["user"] is None


@pytest.mark.parametrize(
    ("getter", "match"),
    [
        ({"route_user": lambda: 5}, "user callable must return str or None"),
        ({"route_user": lambda: b"ann"}, "user callable must return str or None"),
        ({"metadata": lambda: [("a", "b")]}, "must return a mapping"),
        ({"metadata": lambda: {"a": 1}}, "non-empty str to str"),
        ({"metadata": lambda: {"": "b"}}, "non-empty str to str"),
        ({"metadata": lambda: {1: "b"}}, "non-empty str to str"),
    ],
)
async def test_ws_route_bad_getter_result_raises_and_registers_nothing(
    fake_redis: Redis, getter: dict[str, Any], match: str
) -> None:
    app, wslb = tracked_app(fake_redis, **getter)
    with recording(got_websocket_exception, app) as errors:
        async with app.test_app() as test_app:
            async with test_app.test_client().websocket("/ws") as ws:
                with pytest.raises(WebsocketResponseError) as response:
                    async with asyncio.timeout(SOON):
                        await ws.receive()
            assert response.value.response.status_code == 500
            assert len(await record_ids(fake_redis)) == 0
            assert wslb.local_connections == {}
    [error] = [call["exception"] for call in errors.calls]
    assert isinstance(error, TypeError)
    assert match in str(error)


async def test_ws_route_failing_handler_still_unregisters(fake_redis: Redis) -> None:
    app, wslb = tracked_app(fake_redis, route_user=lambda: "ann", fail=True)
    with recording(got_websocket_exception, app) as errors:
        async with app.test_app() as test_app:
            async with test_app.test_client().websocket("/ws") as ws:
                async with asyncio.timeout(SOON):
                    await ws.receive()
                    assert len(await record_ids(fake_redis)) == 1
                    await ws.send("boom")
                    with pytest.raises(WebsocketDisconnectError):
                        await ws.receive()
            assert len(await record_ids(fake_redis)) == 0
            assert wslb.local_connections == {}
            assert await wslb.send(UserSelector("ann"), "late") == 0
    assert [str(call["exception"]) for call in errors.calls] == ["handler broke"]


async def test_ws_route_needs_the_extension() -> None:
    app = Quart(__name__)

    @ws_route()
    async def handler() -> str:
        return "ran"

    async with app.app_context():
        with pytest.raises(RuntimeError, match="needs WsLoadBalance"):
            await handler()


def test_ws_route_keeps_the_handler_signature() -> None:
    async def handler(room: str) -> str:
        """Doc."""
        return room

    wrapped = ws_route()(handler)
    assert wrapped.__name__ == "handler"
    assert wrapped.__doc__ == "Doc."
    assert wrapped.__wrapped__ is handler  # type: ignore[attr-defined]


async def test_ws_route_getter_may_reject_before_the_handshake(fake_redis: Redis) -> None:
    def deny() -> str:
        abort(401)

    app, wslb = tracked_app(fake_redis, route_user=deny)
    async with app.test_app() as test_app:
        async with test_app.test_client().websocket("/ws") as ws:
            with pytest.raises(WebsocketResponseError) as response:
                async with asyncio.timeout(SOON):
                    await ws.receive()
            assert not cast(Any, ws).accepted
        assert response.value.response.status_code == 401
        assert len(await record_ids(fake_redis)) == 0
        assert wslb.local_connections == {}


async def test_ws_route_accepts_by_default(fake_redis: Redis) -> None:
    app, wslb = tracked_app(fake_redis)
    async with app.test_app() as test_app:
        async with test_app.test_client().websocket("/ws") as ws:
            async with asyncio.timeout(SOON):
                await ws.receive()
            assert cast(Any, ws).accepted


async def test_ws_route_accept_false_holds_frames_until_the_handler_accepts(
    fake_redis: Redis,
) -> None:
    app = Quart(__name__)
    wslb = WsLoadBalance(app, redis=fake_redis, instance_id="i1", prefix=PREFIX)
    opened: list[str] = []
    gate = asyncio.Event()

    @app.websocket("/ws")
    @ws_route(user=lambda: "ann", accept=False)
    async def handler() -> None:
        opened.append(current_connection.id)
        await gate.wait()
        await websocket.accept(headers={"x-chosen": "yes"})
        await websocket.receive()

    async with app.test_app() as test_app:
        async with test_app.test_client().websocket("/ws") as ws:
            await eventually(lambda: bool(opened))
            assert opened[0] in await record_ids(fake_redis)
            assert await wslb.send(UserSelector("ann"), "early") == 1
            await asyncio.sleep(0.02)
            assert not cast(Any, ws).accepted
            gate.set()
            async with asyncio.timeout(SOON):
                assert await ws.receive() == "early"
            assert cast(Any, ws).accepted
