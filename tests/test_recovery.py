"""Recovery mode (``quart_wslb.recovery``): the protocol's pieces, and sessions resumed
on one instance against a real Redis (several instances: ``test_recovery_cluster.py``)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import redis.asyncio as aioredis
from quart import Quart, websocket
from quart.testing.connections import WebsocketDisconnectError

from quart_wslb import (
    GroupSelector,
    UserSelector,
    WsLoadBalance,
    current_connection,
    ws_route,
)
from quart_wslb import positions as positions_module
from quart_wslb.exceptions import WsLoadBalanceError
from quart_wslb.keys import Keys
from quart_wslb.outgoing import Outgoing
from quart_wslb.positions import Recovery, seq_of
from quart_wslb.recovery import (
    HISTORY_LOST,
    RESUMED_ELSEWHERE,
    Resume,
    Sessions,
    _Candidates,
    matches,
    parse_resume,
    release,
)
from quart_wslb.testing import RedisServer
from tests.support import FakeWebsocket, eventually, make_connection

pytestmark = pytest.mark.timeout(60)


def test_parse_resume_reads_a_new_or_a_named_session() -> None:
    assert parse_resume('{"t":"resume"}') == Resume()
    frame = '{"t":"resume","session":"s","token":"k","epoch":"e","pos":"12-3"}'
    assert parse_resume(frame) == Resume("s", "k", "e", "12-3")


@pytest.mark.parametrize(
    "frame",
    ["hello", b"\xff", "[]", '{"t":"msg"}', '{"t":"resume","session":"s","pos":"x"}',
     '{"t":"resume","session":5}'],
)  # fmt: skip
def test_parse_resume_refuses_anything_else(frame: str | bytes) -> None:
    assert parse_resume(frame) is None


def test_matches_evaluates_the_program_against_the_session() -> None:
    names = {"g:room", "p:/ws/a"}
    ids = frozenset({"i1:t1"})
    assert matches(["Uann"], "ann", ids, names)
    assert not matches(["Ubob"], "ann", ids, names)
    assert matches(["Sg:room"], None, ids, names)
    assert not matches(["Sg:other"], None, ids, names)
    assert matches(["Sg:room", "Ubob", "|"], "ann", ids, names)
    assert not matches(["Sg:room", "Ubob", "&"], "ann", ids, names)
    assert matches(["M2", "x:y", "i1:t1"], None, ids, names)
    assert matches(["Ci1:t1"], None, ids, names)
    assert matches(["B"], None, frozenset(), set())
    assert not matches(["?"], "ann", ids, names)


async def test_release_closes_a_connection_that_held_too_many(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A client that does not read its replay cannot make the instance hold its live
    messages without bound: past MAX_HELD it is closed (1013) and resumes later."""
    monkeypatch.setattr(positions_module, "MAX_HELD", 3)
    socket = FakeWebsocket()
    connection = make_connection(socket)
    connection.recovery = Recovery(Keys("p"), "s")
    for seq in range(1, 6):
        connection.recovery.admit(f"1-{seq}", Outgoing(f"m{seq}"), f"id{seq}")
    assert len(connection.recovery.held) == 3 and connection.recovery.overflowed
    connection.start()
    await release(connection)
    await eventually(lambda: bool(socket.closed))
    assert socket.closed[0][0] == 1013
    await connection.stop()


def test_candidates_are_a_superset_of_the_matches() -> None:
    """The catch-up's index: every connection an entry selects is among its candidates,
    and a connection it names nowhere is not."""
    ann, bob, cat = make_connection(id="i:a"), make_connection(id="i:b"), make_connection(id="i:c")
    checks = {
        ann: ("ann", frozenset({"i:a"}), {"g:room", "p:/ws"}),
        bob: ("bob", frozenset({"i:b"}), {"p:/ws"}),
        cat: (None, frozenset({"i:c"}), {"p:/other"}),
    }
    candidates = _Candidates(checks)
    programs = [["Uann"], ["Sg:room"], ["Sp:/ws", "Ubob", "&"], ["M2", "i:c", "x:y"], ["Ci:b"],
                ["Sg:room", "Sp:/other", "|"], ["A"], ["B"], ["Unobody"]]  # fmt: skip
    for ops in programs:
        found = candidates.of(ops)
        assert {c for c in checks if matches(ops, *checks[c])} <= set(found), ops
        if ops[0] not in ("A", "B"):
            named = "".join(ops)
            for connection in set(checks) - set(found):
                assert connection.id not in named
    assert candidates.of(["Unobody"]) == []
    assert candidates.of(["Uann"]) == [ann]


# --- one instance, real Redis -------------------------------------------------------


def recovery_app(redis_url: str, prefix: str, **options: Any) -> tuple[Quart, WsLoadBalance]:
    """``/ws?user=<name>``, a recovery route that joins ``room`` on ``"join"`` and
    echoes everything else."""
    app = Quart(__name__)
    wslb = WsLoadBalance(app, redis_url=redis_url, prefix=prefix, **options)

    @app.websocket("/ws")
    @ws_route(user=lambda: websocket.args.get("user"), recovery=True)
    async def handler() -> None:
        while True:
            text = await websocket.receive()
            if text == "join":
                await current_connection.join("room")
            await current_connection.send(f"echo:{text!s}")

    return app, wslb


@asynccontextmanager
async def serving(redis_url: str, prefix: str, **options: Any) -> AsyncIterator[Any]:
    app, wslb = recovery_app(redis_url, prefix, **options)
    async with app.test_app() as test_app:
        yield test_app.test_client(), wslb


async def frames(ws: Any, n: int) -> list[dict[str, Any]]:
    out = []
    for _ in range(n):
        out.append(json.loads(await asyncio.wait_for(ws.receive(), 10)))
    return out


@asynccontextmanager
async def session(
    client: Any, user: str, resume: dict[str, Any] | None = None
) -> AsyncIterator[tuple[Any, dict[str, Any]]]:
    async with client.websocket(f"/ws?user={user}") as ws:
        await ws.send(json.dumps({"t": "resume", **(resume or {})}))
        (welcome,) = await frames(ws, 1)
        assert welcome["t"] == "welcome", welcome
        yield ws, welcome


def resume_of(welcome: dict[str, Any], pos: str) -> dict[str, Any]:
    return {k: welcome[k] for k in ("session", "token", "epoch")} | {"pos": pos}


@pytest.mark.integration
async def test_recovery_new_session_then_live_messages_carry_positions(
    redis_url: str, prefix: str
) -> None:
    async with serving(redis_url, prefix) as (client, wslb):
        async with session(client, "ann") as (ws, welcome):
            assert welcome["recovered"] is True
            assert welcome["session"] and welcome["token"] and welcome["epoch"]
            assert await wslb.send(UserSelector("ann"), "one") == 1
            await wslb.send(UserSelector("ann"), {"n": 2})
            one, two = await frames(ws, 2)
            assert one["d"] == "one" and two["j"] == {"n": 2}
            assert seq_of(two["pos"]) == seq_of(one["pos"]) + 1  # type: ignore[operator]
            await ws.send("hi")
            (echo,) = await frames(ws, 1)
            assert echo == {"t": "msg", "d": "echo:hi"}, "a local reply has no position"


@pytest.mark.integration
async def test_recovery_resume_after_a_clean_disconnect_replays_in_order(
    redis_url: str, prefix: str
) -> None:
    async with serving(redis_url, prefix) as (client, wslb):
        async with session(client, "ann") as (ws, welcome):
            await ws.send("join")
            await frames(ws, 1)
            await wslb.send(UserSelector("ann"), "m0")
            (first,) = await frames(ws, 1)
        sent = []
        for n in range(1, 40):
            selector = UserSelector("ann") if n % 2 else GroupSelector("room")
            await wslb.send(selector, f"m{n}")
            sent.append(f"m{n}")
        await wslb.send(UserSelector("bob"), "not ann's")
        async with session(client, "ann", resume_of(welcome, first["pos"])) as (ws, again):
            assert again["recovered"] is True, again
            assert again["session"] == welcome["session"]
            got = await frames(ws, len(sent))
            assert [f["d"] for f in got] == sent
            await wslb.send(UserSelector("ann"), "live")
            (live,) = await frames(ws, 1)
            assert live["d"] == "live"
            seqs = [int(f["pos"].split("-")[1]) for f in [*got, live]]
            assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)


@pytest.mark.integration
async def test_recovery_bad_token_is_a_new_session_not_recovered(
    redis_url: str, prefix: str
) -> None:
    async with serving(redis_url, prefix) as (client, wslb):
        async with session(client, "ann") as (_, welcome):
            pass
        await wslb.send(UserSelector("ann"), "missed")
        forged = resume_of(welcome, welcome["pos"]) | {"token": "wrong"}
        async with session(client, "ann", forged) as (ws, again):
            assert again["recovered"] is False
            assert again["session"] != welcome["session"]
        other = resume_of(welcome, welcome["pos"])
        async with session(client, "bob", other) as (ws, again):
            assert again["recovered"] is False, "another user took ann's session"


@pytest.mark.integration
async def test_recovery_first_frame_must_be_a_resume_frame(redis_url: str, prefix: str) -> None:
    async with serving(redis_url, prefix) as (client, _):
        async with client.websocket("/ws?user=ann") as ws:
            await ws.send("hello")
            with pytest.raises(WebsocketDisconnectError) as raised:
                await asyncio.wait_for(ws.receive(), 10)
            assert raised.value.args[0] == 1008


@pytest.mark.integration
async def test_recovery_lost_history_is_told(
    redis_url: str, admin_redis_url: str, prefix: str
) -> None:
    """Another epoch (Redis lost the history) and trimmed entries: recovered false."""
    async with serving(redis_url, prefix, recovery_length=20) as (client, wslb):
        async with session(client, "ann") as (_, welcome):
            pass
        for n in range(300):  # far past the length kept
            await wslb.send(UserSelector("ann"), f"m{n}")
        async with session(client, "ann", resume_of(welcome, welcome["pos"])) as (_, again):
            assert again["recovered"] is False, "trimmed history replayed as whole"
        async with session(client, "ann") as (_, fresh):
            pass
        keys = Keys(prefix)
        async with aioredis.Redis.from_url(admin_redis_url) as admin:
            await admin.delete(keys.history_meta, keys.history)
        async with session(client, "ann", resume_of(fresh, fresh["pos"])) as (_, again):
            assert again["recovered"] is False, "a new epoch replayed as whole"
            assert again["epoch"] != fresh["epoch"]


@pytest.mark.integration
async def test_recovery_resume_closes_the_previous_owner(redis_url: str, prefix: str) -> None:
    async with serving(redis_url, prefix) as (client, wslb):
        async with session(client, "ann") as (old, welcome):
            async with session(client, "ann", resume_of(welcome, welcome["pos"])) as (ws, again):
                assert again["recovered"] is True
                with pytest.raises(WebsocketDisconnectError) as raised:
                    await asyncio.wait_for(old.receive(), 10)
                assert raised.value.args[0] == RESUMED_ELSEWHERE
                async with asyncio.timeout(10):  # the old one unregisters as it ends
                    while await wslb.count(UserSelector("ann")) != 1:
                        await asyncio.sleep(0.01)
                assert await wslb.send(UserSelector("ann"), "x") == 1
                (got,) = await frames(ws, 1)
                assert got["d"] == "x"


@pytest.mark.integration
async def test_recovery_session_follows_group_changes_at_once(
    redis_url: str, admin_redis_url: str, prefix: str
) -> None:
    """A join is in the session within a moment, not at the next periodic refresh: an
    instance killed right after would otherwise replay without the group's messages."""
    async with serving(redis_url, prefix) as (client, _):
        async with session(client, "ann") as (ws, welcome):
            await ws.send("join")
            await frames(ws, 1)
            key = Keys(prefix).session(welcome["session"])
            async with aioredis.Redis.from_url(admin_redis_url) as admin:
                async with asyncio.timeout(5):
                    while True:
                        record = json.loads(await admin.hget(key, "r") or b"{}")
                        if record.get("g") == ["room"]:
                            break
                        await asyncio.sleep(0.01)
                ttl = await admin.pttl(key)
                # Resumed elsewhere meanwhile: a change here must leave the session be.
                await admin.hset(key, mapping={"c": "another:owner", "r": "{}"})
                await ws.send("join")
                await frames(ws, 1)
                await asyncio.sleep(0.3)
                assert await admin.hget(key, "r") == b"{}", "a lost owner rewrote the session"
            assert 120_000 < ttl <= 151_000, ttl  # TTL, a refresh period and a second


@pytest.mark.integration
async def test_recovery_catch_up_fills_what_the_subscriber_missed(
    private_redis: RedisServer,
) -> None:
    """Messages published while the instance's subscriber was cut (CLIENT KILL) reach
    the connected client from history, once each, in order, before newer ones."""
    async with serving(private_redis.url, "cu", heartbeat_interval=0.2, instance_ttl=2) as (
        client,
        wslb,
    ):
        async with session(client, "ann") as (ws, _):
            await wslb.send(UserSelector("ann"), "m0")
            await frames(ws, 1)
            async with aioredis.Redis.from_url(private_redis.url) as admin:
                killed = await admin.client_kill_filter(_type="pubsub")
            assert killed >= 1
            sent = [f"m{n}" for n in range(1, 51)]
            routed = [await wslb.send(UserSelector("ann"), text) for text in sent]
            got = await frames(ws, len(sent))
            assert [f["d"] for f in got] == sent, f"routed counts {routed}"
            await wslb.send(UserSelector("ann"), "after")
            (after,) = await frames(ws, 1)
            assert after["d"] == "after"
            assert 0 in routed, f"the cut lost no live message: nothing was caught up {routed}"


async def history_ids(redis_url: str, prefix: str) -> list[bytes]:
    async with aioredis.Redis.from_url(redis_url) as admin:
        entries: list[tuple[bytes, Any]] = await admin.xrange(Keys(prefix).history)  # type: ignore[assignment]
        return [entry_id for entry_id, _ in entries]


@pytest.mark.integration
async def test_recovery_a_hole_in_the_history_is_told(
    redis_url: str, admin_redis_url: str, prefix: str
) -> None:
    """seq has no gaps: an entry missing after the client's position (trimmed while
    the session was claimed, say) makes the resume say recovered false."""
    async with serving(redis_url, prefix) as (client, wslb):
        async with session(client, "ann") as (_, welcome):
            pass
        for n in range(10):
            await wslb.send(UserSelector("ann" if n % 2 else "bob"), f"m{n}")
        ids = await history_ids(admin_redis_url, prefix)
        async with aioredis.Redis.from_url(admin_redis_url) as admin:
            await admin.xdel(Keys(prefix).history, ids[4])
        async with session(client, "ann", resume_of(welcome, welcome["pos"])) as (_, again):
            assert again["recovered"] is False, again


@pytest.mark.integration
async def test_recovery_renumbered_history_closes_a_connected_client(
    redis_url: str, admin_redis_url: str, prefix: str
) -> None:
    """Redis lost the history's meta (evicted, say) and another session began a new
    epoch: a connected client whose messages now come numbered again from 1 is closed
    (4410), so that it resumes and is told, rather than dropping them as duplicates."""
    async with serving(redis_url, prefix) as (client, wslb):
        async with session(client, "ann") as (ws, _):
            for n in range(5):
                await wslb.send(UserSelector("ann"), f"m{n}")
            await frames(ws, 5)
            async with aioredis.Redis.from_url(admin_redis_url) as admin:
                await admin.delete(Keys(prefix).history_meta)
            async with session(client, "bob") as _:
                await wslb.send(UserSelector("ann"), "renumbered")
                with pytest.raises(WebsocketDisconnectError) as raised:
                    await asyncio.wait_for(ws.receive(), 10)
                assert raised.value.args[0] == HISTORY_LOST


@pytest.mark.integration
async def test_recovery_a_quiet_client_is_marked_forward(redis_url: str, prefix: str) -> None:
    """A client that receives nothing while its shard's history moves on past what it
    keeps is told where it is ({"t":"pos"}), so its resume is whole, not "lost"."""
    options = {"recovery_ttl": 2.0, "recovery_length": 20}  # marks every 0.5 s
    async with serving(redis_url, prefix, **options) as (client, wslb):
        async with session(client, "ann") as (ws, welcome):
            await wslb.send_many([(UserSelector("bob"), f"m{n}") for n in range(200)])
            (mark,) = await frames(ws, 1)
            assert mark["t"] == "pos", mark
            assert seq_of(mark["pos"]) == 200, mark
        await wslb.send(UserSelector("ann"), "while away")
        async with session(client, "ann", resume_of(welcome, mark["pos"])) as (ws, again):
            assert again["recovered"] is True, again
            (missed,) = await frames(ws, 1)
            assert missed["d"] == "while away"


@pytest.mark.integration
async def test_recovery_a_message_redis_would_not_record_ends_the_history(
    private_redis: RedisServer,
) -> None:
    """Sent live but refused by the stream (maxmemory): the history must not pass for
    whole, so a later resume is told."""
    async with aioredis.Redis.from_url(private_redis.url) as admin:
        async with serving(private_redis.url, "oom") as (client, wslb):
            async with session(client, "ann") as (_, welcome):
                pass
            await admin.config_set("maxmemory", "1")
            try:
                await wslb.send(UserSelector("ann"), "not recorded")
            finally:
                await admin.config_set("maxmemory", "0")
            await wslb.send(UserSelector("ann"), "recorded")
            async with session(client, "ann", resume_of(welcome, welcome["pos"])) as (_, again):
                assert again["recovered"] is False, again


@pytest.mark.integration
async def test_recovery_history_ends_with_the_last_session(
    redis_url: str, admin_redis_url: str, prefix: str
) -> None:
    """Sends record only while a session may ask for them: the history and its meta
    expire after the last session, and then sends cost no stream."""
    async with serving(redis_url, prefix, recovery_ttl=0.5) as (client, wslb):
        async with session(client, "ann"):
            await wslb.send(UserSelector("ann"), "kept")
        keys = Keys(prefix)
        async with aioredis.Redis.from_url(admin_redis_url) as admin:
            async with asyncio.timeout(20):
                while await admin.exists(keys.history_meta):
                    await wslb.send(UserSelector("bob"), "traffic")  # must not keep it
                    await asyncio.sleep(0.1)
            await wslb.send(UserSelector("bob"), "after")
            assert await admin.exists(keys.history) == 0


@pytest.mark.integration
async def test_recovery_catch_up_that_fails_closes_so_the_client_resumes(
    private_redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An error reply while catching up (MASTERDOWN, say) must not leave the connection
    holding its live messages for good: it is closed (1013), and its client resumes."""

    async def fails(*_: object) -> list[object]:
        raise WsLoadBalanceError("catch up: Redis answered with an error: MASTERDOWN")

    async with serving(private_redis.url, "cf") as (client, wslb):
        async with session(client, "ann") as (ws, _):
            monkeypatch.setattr(Sessions, "_catch_up_shard", fails)
            async with aioredis.Redis.from_url(private_redis.url) as admin:
                assert await admin.client_kill_filter(_type="pubsub") >= 1
            with pytest.raises(WebsocketDisconnectError) as raised:
                await asyncio.wait_for(ws.receive(), 10)
            assert raised.value.args[0] == 1013


async def test_release_waits_for_room_and_keeps_the_order() -> None:
    """More held messages than the queue takes (a long replay): none dropped, no close,
    and a live message that comes meanwhile waits behind them."""
    socket = FakeWebsocket()
    connection = make_connection(socket, queue_size=2)
    recovery = connection.recovery = Recovery(Keys("p"), "s", epoch="e")
    for seq in range(1, 7):
        recovery.admit(f"1-{seq}", Outgoing(f"m{seq}"), f"id{seq}")
    releasing = asyncio.create_task(release(connection))
    await asyncio.sleep(0.02)
    assert not releasing.done() and recovery.holding
    assert not recovery.admit("1-7", Outgoing("m7"), "id7"), "a live one jumped the queue"
    connection.start()
    await asyncio.wait_for(releasing, 5)
    assert await socket.wait_sent(7) == [f"m{n}" for n in range(1, 8)]
    assert socket.closed == [] and not recovery.holding
    await connection.stop()
