"""Helpers shared by the unit tests: a fake websocket, connections, signal recorders, and
Quart apps wired to a fakeredis server."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit, urlunsplit

import fakeredis
import redis
import trustme
from blinker import ANY, NamedSignal
from quart import Quart, websocket
from quart import typing as quart_typing
from quart.wrappers import Websocket
from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.client import PubSub

from quart_wslb import WsLoadBalance, current_connection, ws_route
from quart_wslb.batch import GroupCommit
from quart_wslb.config import QueueFullPolicy
from quart_wslb.connection import Connection, Membership
from quart_wslb.emitter import AsyncEmitter
from quart_wslb.envelope import Frame
from quart_wslb.keys import Keys
from quart_wslb.local_index import LocalIndex
from quart_wslb.registry import Registry
from quart_wslb.selectors import Selector
from quart_wslb.signal_sender import SignalSender
from quart_wslb.testing import TLSFiles

#: The key prefix of every unit test (each test has its own fakeredis server).
PREFIX = "t"
KEYS = Keys(PREFIX)
#: How long a test waits for something that should happen at once.
SOON = 2.0


class FakeWebsocket:
    """What a ``Connection`` needs of a Quart websocket; ``block=True`` makes it a client
    whose every send hangs until ``release`` is set."""

    def __init__(self, *, block: bool = False, fail: bool = False) -> None:
        self.sent: list[Frame] = []
        self.closed: list[tuple[int, str]] = []
        self.release = asyncio.Event()
        if not block:
            self.release.set()
        self.fail = fail
        self._changed = asyncio.Event()

    async def send(self, frame: Frame) -> None:
        if self.fail:
            raise ConnectionResetError("client gone")
        await self.release.wait()
        self.sent.append(frame)
        self._changed.set()

    async def close(self, code: int, reason: str = "") -> None:
        self.closed.append((code, reason))

    async def wait_sent(self, count: int) -> list[Frame]:
        """Wait (at most ``SOON``) until ``count`` frames were sent; return them all."""
        async with asyncio.timeout(SOON):
            while len(self.sent) < count:
                self._changed.clear()
                await self._changed.wait()
        return self.sent


async def eventually(condition: Callable[[], bool]) -> None:
    """Wait (at most ``SOON``) until ``condition()`` holds."""
    async with asyncio.timeout(SOON):
        while not condition():
            await asyncio.sleep(0.005)


def make_connection(
    socket: FakeWebsocket | None = None,
    *,
    id: str = "i1:c1",
    user: str | None = "alice",
    path: str = "/ws/red",
    metadata: Mapping[str, str] | None = None,
    queue_size: int = 8,
    policy: QueueFullPolicy = "close",
    owner: SignalSender | None = None,
    membership: Membership | None = None,
    index: LocalIndex | None = None,
) -> Connection:
    """A ``Connection`` on the instance named by its id, over a fake websocket, sending
    its signals through ``owner`` (from ``None`` by default) and changing its groups
    through ``membership`` (Redis untouched by default)."""
    return Connection(
        id=id,
        user=user,
        path=path,
        instance=id.partition(":")[0],
        metadata=metadata or {},
        websocket=cast(Websocket, socket or FakeWebsocket()),
        queue_size=queue_size,
        policy=policy,
        sender=owner or SignalSender(None),
        membership=membership or NO_MEMBERSHIP,
        index=index,
    )


class _NoMembership:
    """The membership of a connection no cluster holds: nothing to record."""

    async def join(self, selector: Selector, group: str) -> int:
        return 1

    async def leave(self, selector: Selector, group: str) -> int:
        return 1


NO_MEMBERSHIP: Membership = _NoMembership()


#: id -> (user, path, room), on instances i1, i2 and i3 (see ``people_sender``).
PEOPLE = {
    "i1:a1": ("alice", "/ws/red", "red"),
    "i1:a2": ("alice", "/ws/blue", "blue"),
    "i1:b1": ("bob", "/ws/red", "red"),
    "i2:a3": ("alice", "/ws/red", "red"),
    "i2:c1": ("carol", "/ws/green", "green"),
    "i3:d1": ("dave", "/ws/red", "red"),
}


async def heartbeat(redis: Redis, *names: str) -> None:
    """Announce instances as alive, the way their heartbeat does."""
    for name in names:
        await redis.set(KEYS.heartbeat(name), "1")
        await redis.hset(KEYS.instances, name, '{"started_at":0}')


async def people_sender(redis: Redis) -> AsyncEmitter:
    """Register ``PEOPLE`` on instances with a live heartbeat; return what publishes for
    an instance, ``i0``, that owns no connection."""
    registry = Registry(redis, KEYS)
    for id_, (user, path, room) in PEOPLE.items():
        await registry.register(
            make_connection(id=id_, user=user, path=path, metadata={"room": room})
        )
    await heartbeat(redis, "i1", "i2", "i3")
    return AsyncEmitter(redis, prefix=PREFIX, origin="i0")


def held(*connections: Connection, keys: Keys = KEYS) -> LocalIndex:
    """An instance's index of ``connections`` (what its receiver resolves selectors over)."""
    local = LocalIndex(keys)
    for connection in connections:
        local.add(connection)
    return local


@dataclass
class Recorder:
    """A signal receiver that keeps the keyword arguments of every call."""

    calls: list[dict[str, Any]] = field(default_factory=list)

    def __call__(self, sender: object, **kwargs: Any) -> None:
        self.calls.append({"sender": sender, **kwargs})

    def reasons(self) -> list[str]:
        return [call["reason"] for call in self.calls]


@contextmanager
def recording(signal: NamedSignal, sender: object = ANY) -> Iterator[Recorder]:
    """Record what ``signal`` sends while the block runs (for ``sender``: an object, or
    the sender of a :class:`SignalSender`)."""
    recorder = Recorder()
    if isinstance(sender, SignalSender):
        sender = sender.sender
    with signal.connected_to(recorder, sender=sender):
        yield recorder


def fake_client(server: fakeredis.FakeServer) -> Redis:
    """An asyncio client of a fakeredis server."""
    client: Redis = fakeredis.FakeAsyncRedis(server=server)
    return client


def room_metadata() -> dict[str, str]:
    return {"room": (websocket.view_args or {})["room"]}


def make_app(redis: Redis | None, instance: str, **options: Any) -> tuple[Quart, WsLoadBalance]:
    """A Quart app with one tracked route, ``/ws/<room>?user=<name>``, that greets the
    client with ``{"hello": <connection id>}``, echoes ``"echo:<text>"`` and ends on
    ``"close"``."""
    app = Quart(__name__)
    wslb = WsLoadBalance(app, redis=redis, instance_id=instance, prefix=PREFIX, **options)

    @app.websocket("/ws/<room>")
    @ws_route(user=lambda: websocket.args.get("user"), metadata=room_metadata)
    async def chat(room: str) -> None:
        await current_connection.send({"hello": current_connection.id, "room": room})
        while True:
            text = await websocket.receive()
            if text == "close":
                return
            await current_connection.send(f"echo:{text!s}")

    return app, wslb


@dataclass
class Served:
    """One app instance, serving, and a test client of it."""

    app: Quart
    wslb: WsLoadBalance
    redis: Redis
    client: quart_typing.TestClientProtocol


@asynccontextmanager
async def serving(
    server: fakeredis.FakeServer, instance: str, **options: Any
) -> AsyncIterator[Served]:
    """Serve a ``make_app`` app on ``server`` until the block ends."""
    redis = fake_client(server)
    app, wslb = make_app(redis, instance, **options)
    try:
        async with app.test_app() as test_app:
            yield Served(app, wslb, redis, test_app.test_client())
    finally:
        await redis.aclose()


async def received(pubsub: PubSub, wait: float = 0.02) -> list[bytes]:
    """Every message that arrives on ``pubsub`` within ``wait`` seconds (fakeredis delivers
    a publish before the publishing call returns)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    out: list[bytes] = []
    while (left := deadline - loop.time()) > 0:
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=left)
        if message is not None and message["type"] in ("message", "pmessage"):
            out.append(message["data"])
    return out


async def stored_record(redis: Redis, connection_id: str) -> dict[str, Any]:
    """The JSON record Redis holds for a connection."""
    instance, _, token = connection_id.partition(":")
    raw = await redis.hget(KEYS.records(instance), token)
    if raw is None:
        raise AssertionError(f"no record for {connection_id}")
    record: dict[str, Any] = json.loads(raw)
    return record


async def record_ids(redis: Redis, keys: Keys = KEYS) -> set[str]:
    """The id of every record in Redis, whatever instance hash holds it."""
    ids: set[str] = set()
    async for key in redis.scan_iter(match=keys.records("*")):
        instance = cast(bytes, key).decode().rpartition(":")[2]
        tokens = cast(list[bytes], await redis.hkeys(key))
        ids.update(f"{instance}:{token.decode()}" for token in tokens)
    return ids


async def user_ids(redis: Redis, user: str, keys: Keys = KEYS) -> list[str]:
    """The connection ids that the ``users`` hash lists for ``user``."""
    raw = await redis.hget(keys.users, user)
    return raw.decode().split() if isinstance(raw, bytes) else []


async def set_members(redis: Redis, key: str) -> set[str]:
    """The members of a set, as text."""
    return {m.decode() if isinstance(m, bytes) else m for m in await redis.smembers(key)}


async def registry_keys(redis: Redis) -> set[str]:
    """Every key under ``PREFIX`` but the list of instances (registering lists one)."""
    names = {key.decode() async for key in redis.scan_iter(match="{" + PREFIX + "}*")}
    return names - {KEYS.instances}


def acl_url(url: str, user: str, password: str) -> str:
    """``url`` with ``user:password@`` in place of any credentials it had."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}:{password}@{host}"))


def acl_refusals(admin: redis.Redis, user: str) -> list[str]:
    """What Redis refused ``user`` (its ACL LOG), less redis-py's ``CLIENT SETINFO`` on
    connect, which redis-py sends unasked and ignores a refusal of (Redis 7.2 or later
    names it ``client|setinfo``; 7.0 has no such subcommand, so nothing is logged; 6.2
    logs only ``client``, the command, so there every refused ``CLIENT`` is left out)."""
    version = str(admin.info("server")["redis_version"])
    unnamed = {"client"} if int(version.partition(".")[0]) < 7 else set()
    entries = cast(list[dict[str, Any]], admin.acl_log(count=128))
    return [
        f"{entry['reason']} {entry['object']}"
        for entry in entries
        if entry["username"] == user and entry["object"] not in {"client|setinfo", *unnamed}
    ]


def in_use(pool: ConnectionPool) -> int:
    """How many of ``pool``'s connections are taken (not idle in it).

    redis-py has no public count across its releases, so this is the one place the tests
    read its private ``_in_use_connections``; ``tests/test_compat.py`` checks it, and it
    fails loudly rather than answer 0 on a redis-py that drops the name."""
    taken = getattr(pool, "_in_use_connections", None)
    if not isinstance(taken, set):
        raise AssertionError("redis-py's pool has no _in_use_connections set: update in_use")
    return len(taken)


def round_trips(commit: GroupCommit) -> list[list[str]]:
    """The command names of each round trip that ``commit`` makes from now on (through
    its transport, whose ``run`` this wraps)."""
    trips: list[list[str]] = []
    transport = commit._transport
    run = transport.run

    async def spy(commands: Sequence[Sequence[Any]]) -> list[Any]:
        trips.append([str(command[0]) for command in commands])
        return await run(commands)

    transport.run = spy  # type: ignore[method-assign]
    return trips


async def sends_of(emitter: AsyncEmitter) -> GroupCommit:
    """The group commit of ``emitter``'s sends (made at its first send, or now), of its
    first shard (its only one unless it has several)."""
    return (await emitter._first_sends()).commits[0]


def tls_files(directory: Path) -> TLSFiles:
    """A certificate for 127.0.0.1 and its key, signed by a CA made for the caller, written
    to ``directory``: for redis-servers that speak TLS."""
    ca = trustme.CA()
    issued = ca.issue_cert("127.0.0.1", "localhost")
    files = TLSFiles(
        cert=str(directory / "server.pem"),
        key=str(directory / "server.key"),
        ca=str(directory / "ca.pem"),
    )
    issued.cert_chain_pems[0].write_to_path(files.cert)
    issued.private_key_pem.write_to_path(files.key)
    ca.cert_pem.write_to_path(files.ca)
    return files
