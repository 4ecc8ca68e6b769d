"""The contract between Python and the Lua scripts (``quart_wslb.contract``), on a real
Redis: the names the scripts build are ``Keys``' names, the envelope a send publishes is
the version ``envelope.decode`` reads, ``SPILL`` moves a user to its set and back, the
reply framing carries each call's error or reply, and every script that reads selector
programs rejects one it cannot read."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from importlib.resources import files
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.exceptions import ResponseError

from quart_wslb import AllSelector, UserSelector
from quart_wslb._lua import header, source
from quart_wslb.batch import Args, GroupCommit
from quart_wslb.connection import Connection
from quart_wslb.contract import LAYOUT, LUA, SPILL, SPILLED, VERSION, check_layout
from quart_wslb.emitter import AsyncEmitter
from quart_wslb.envelope import decode
from quart_wslb.exceptions import WsLoadBalanceError
from quart_wslb.keys import Keys
from quart_wslb.registry import Registry, Removal
from quart_wslb.transport import pick
from tests.support import SOON, make_connection

pytestmark = pytest.mark.integration

#: The scripts that read selector programs.
READERS = ("send", "match", "count")


@pytest.fixture(name="redis")
async def fixture_redis(redis_url: str) -> AsyncIterator[Redis]:
    """The client the code under test uses (an ACL user with ``WSLB_TEST_ACL=1``)."""
    client = Redis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture(name="admin")
async def fixture_admin(admin_redis_url: str) -> AsyncIterator[Redis]:
    """An admin client, to SCAN the keys and to listen on channels."""
    client = Redis.from_url(admin_redis_url)
    yield client
    await client.aclose()


@pytest.fixture(name="keys")
def fixture_keys(prefix: str) -> Keys:
    return Keys(prefix)


@pytest.fixture(name="registry")
def fixture_registry(redis: Redis, keys: Keys) -> Registry:
    return Registry(redis, keys)


@pytest.fixture(name="emitter")
async def fixture_emitter(redis: Redis, prefix: str) -> AsyncIterator[AsyncEmitter]:
    emitter = AsyncEmitter(redis, prefix=prefix, origin="o1")
    yield emitter
    await emitter.aclose()


async def held(admin: Redis, keys: Keys) -> set[str]:
    """Every key under the prefix that Redis holds."""
    pattern = "{" + keys.prefix + "}*"
    return {key.decode() async for key in admin.scan_iter(match=pattern, count=1000)}


def odd(id: str = "i1:odd", user: str = "zoë :x") -> Connection:
    """A connection whose every name has non-ASCII text, colons and spaces."""
    connection = make_connection(
        id=id, user=user, path="/ws/ça:va", metadata={"café": "a:b", "n:m": "é"}
    )
    connection.groups.update({"g:1", "ü"})
    return connection


async def listen(admin: Redis, *channels: str) -> PubSub:
    pubsub = admin.pubsub()
    await pubsub.subscribe(*channels)
    for _ in channels:  # the confirmations
        await pubsub.get_message(timeout=SOON)
    return pubsub


async def next_message(pubsub: PubSub) -> dict[str, Any]:
    message: dict[str, Any] | None = await pubsub.get_message(
        ignore_subscribe_messages=True, timeout=SOON
    )
    assert message is not None, "nothing was published"
    return message


def script(redis: Redis, name: str) -> Any:
    return redis.register_script(source(name))


async def test_contract_scripts_build_the_names_keys_builds(
    admin: Redis, keys: Keys, registry: Registry, emitter: AsyncEmitter
) -> None:
    """register.lua lists the instance and the holders, membership.lua the group and its
    holders, unregister.lua rebuilds every set's name from the record: with names in
    non-ASCII text (lengths in bytes), colons and spaces, exactly Keys' names exist, and
    nothing is left behind."""
    connection = odd()
    await registry.register(connection)
    sets = registry.index_keys(connection)
    assert await held(admin, keys) == {
        keys.records("i1"),
        keys.users,
        keys.instances,
        *sets,
        *map(keys.holders, sets),
    }
    assert await emitter.join(UserSelector(connection.user or ""), "ré:2") == 1
    group = keys.group("ré:2")
    assert {group, keys.holders(group)} <= await held(admin, keys)
    await admin.delete(keys.instances)  # the one key unregister.lua leaves
    assert await registry.unregister([connection.id]) == Removal(1, ["zoë :x"])
    assert await held(admin, keys) == set()


async def test_contract_sends_publish_on_keys_channels_in_the_contract_version(
    admin: Redis, keys: Keys, registry: Registry, emitter: AsyncEmitter
) -> None:
    """send.lua's channels are Keys' (``channel``, ``broadcast``); a broadcast counts the
    live instances by their heartbeat and records; the envelope carries ``VERSION`` and
    decodes."""
    await registry.register(odd())
    await admin.set(keys.heartbeat("i1"), "1")
    pubsub = await listen(admin, keys.channel("i1"), keys.broadcast)
    try:
        assert await emitter.send(UserSelector("zoë :x"), "hi") == 1
        message = await next_message(pubsub)
        assert message["channel"] == keys.channel("i1").encode()
        assert message["data"].startswith(b'{"v":%d,' % VERSION)
        [envelope] = decode(message["data"])
        assert (envelope.origin, envelope.targets, envelope.frame) == ("o1", ["i1:odd"], "hi")
        assert await emitter.send(AllSelector(), "all") == 1
        message = await next_message(pubsub)
        assert message["channel"] == keys.broadcast.encode()
        assert [e.sel for e in decode(message["data"])] == [["B"]]
    finally:
        await pubsub.aclose()


@pytest.mark.usefixtures("listener")
async def test_contract_a_user_past_spill_moves_to_its_set_and_back(
    admin: Redis, keys: Keys, registry: Registry, emitter: AsyncEmitter
) -> None:
    """Up to SPILL ids are listed in the users hash; one more moves them all to the user's
    set, which the scripts read (count, send) until the user's last connection goes."""
    many = [make_connection(id=f"i1:m{n}", user="crowd") for n in range(SPILL + 1)]
    assert await registry.register(*many[:SPILL]) == ["crowd"]
    listed = await admin.hget(keys.users, "crowd")
    assert listed is not None and len(listed.split()) == SPILL
    assert not await admin.exists(keys.user_set("crowd"))
    assert await registry.register(many[SPILL]) == []
    assert await admin.hget(keys.users, "crowd") == SPILLED.encode()
    members = await admin.smembers(keys.user_set("crowd"))
    assert members == {c.id.encode() for c in many}
    assert await registry.register(many[0]) == []  # again: still listed once
    assert await admin.scard(keys.user_set("crowd")) == SPILL + 1
    assert await emitter.count(UserSelector("crowd")) == SPILL + 1
    assert await emitter.send(UserSelector("crowd"), "x") == SPILL + 1
    assert await registry.unregister([c.id for c in many[:-1]]) == Removal(SPILL, [])
    assert await admin.hget(keys.users, "crowd") == SPILLED.encode()
    assert await registry.unregister([many[-1].id]) == Removal(1, ["crowd"])
    assert not await admin.exists(keys.users, keys.user_set("crowd"))
    await registry.register(many[0])  # back in the hash
    assert await admin.hget(keys.users, "crowd") == many[0].id.encode()


async def sends(redis: Redis, keys: Keys) -> GroupCommit:
    """send.lua's group commit, as the emitter makes it."""
    return GroupCommit(
        await pick(redis),
        script(redis, "send"),
        5.0,
        keys=[keys.users, keys.instances],
        args=[keys.channel_base, "o1", ""],
    )


def call(*ops: str) -> Args:
    """One send of ``ops`` (a program without set ops), as the emitter makes it."""
    return ([], ["00ff", "text", b"x", b"", *ops], False)


@pytest.fixture(name="listener")
async def fixture_listener(admin: Redis, keys: Keys) -> AsyncIterator[PubSub]:
    """A listener on instance i1's channel, so that sends to i1 are heard."""
    pubsub = await listen(admin, keys.channel("i1"))
    yield pubsub
    await pubsub.aclose()


@pytest.mark.usefixtures("listener")
async def test_contract_a_failing_call_of_a_batch_gets_its_error_the_others_their_replies(
    redis: Redis, keys: Keys, registry: Registry
) -> None:
    await registry.register(make_connection(id="i1:a", user="ann"))
    commit = await sends(redis, keys)
    try:
        first, failed, last = await commit.many(
            [call("Uann"), call("X1"), call("Cnobody:x", "Uann", "|")]
        )
    finally:
        await commit.aclose()
    assert first == [1, 1, b"i1"]  # routed, instances reached, their ids
    assert isinstance(failed, ResponseError)
    assert "unknown selector op X1" in str(failed)
    assert last == [1, 1, b"i1"]


async def run(redis: Redis, keys: Keys, name: str, ops: list[str]) -> Any:
    """One call of a script that reads programs, with ``ops`` as its program."""
    if name == "send":
        commit = await sends(redis, keys)
        try:
            [reply] = await commit.many([call(*ops)])
        finally:
            await commit.aclose()
        if isinstance(reply, BaseException):
            raise reply
        return reply
    fixed = [keys.users, keys.instances]
    args = [1, "i1:a", *ops] if name == "match" else ops
    return await script(redis, name)(keys=fixed, args=args)


@pytest.mark.parametrize("name", READERS)
@pytest.mark.parametrize(
    ("ops", "error"),
    [
        (["X1"], "unknown selector op X1"),
        (["Uann", "Zed", "|"], "unknown selector op Zed"),
        (["Uann", "Ubob"], "must leave one value, not 2"),
        (["Uann", "&"], "needs two values"),
        (["S9"], "S9 names no key"),
        (["M3", "i1:a"], "no such count of ids"),
    ],
)
async def test_contract_scripts_reject_a_program_they_cannot_read(
    redis: Redis, keys: Keys, registry: Registry, name: str, ops: list[str], error: str
) -> None:
    await registry.register(make_connection(id="i1:a", user="ann"))
    with pytest.raises(ResponseError, match=re.escape(error)):
        await run(redis, keys, name, ops)


@pytest.mark.usefixtures("listener")
@pytest.mark.parametrize("name", READERS)
async def test_contract_scripts_read_the_same_program_alike(
    redis: Redis, keys: Keys, registry: Registry, name: str
) -> None:
    """``M<n>`` and its ids, ``&`` and ``|``: each script's reading of one program."""
    await registry.register(make_connection(id="i1:a", user="ann"))
    ops = ["M2", "i1:a", "i1:gone", "Uann", "&"]
    reply = await run(redis, keys, name, ops if name != "count" else ops[:3])
    expected = {"send": [1, 1, b"i1"], "match": [b"i1:a"], "count": 1}[name]
    assert (reply[:1] if name == "match" else reply) == expected


async def test_contract_scripts_refuse_keys_1_that_is_not_root_users(
    redis: Redis, keys: Keys
) -> None:
    """A script learns ROOT from KEYS[1], so KEYS[1] must be ``<ROOT>:users``."""
    count = script(redis, "count")
    # Keys under the prefix only: an ACL user has no others.
    for first in (keys.instances, keys.records("users"), keys.user_set("x:users")):
        with pytest.raises(ResponseError, match="KEYS.1. must be"):
            await count(keys=[first, keys.instances], args=["A"])


def test_contract_header_defines_every_constant_and_the_scripts_spell_none() -> None:
    """Each script gets the constants (one ``local`` each); no script spells a key word,
    a record field or the envelope version itself."""
    text = header()
    for name, value in LUA.items():
        literal = str(value) if isinstance(value, int) else f"'{value}'"
        assert f"\nlocal {name} = {literal}\n" in text
    folder = files("quart_wslb").joinpath("lua")
    for path in folder.iterdir():
        lua = path.read_text("utf-8")
        assert not re.search(r"':[a-z]+(:|')", lua), path.name  # ':c:', ':users'
        assert not re.search(r"\.[upmgt]\b", lua), path.name  # record.u
        assert '"v":' + str(VERSION) not in lua, path.name


def test_check_layout_names_a_different_count_of_shards() -> None:
    check_layout("p", f"{LAYOUT}|8".encode(), f"{LAYOUT}|8")
    check_layout("p", None, f"{LAYOUT}|8")
    with pytest.raises(WsLoadBalanceError, match=r"split over 8 shard\(s\).*uses 1.*WSLB_SHARDS"):
        check_layout("p", f"{LAYOUT}|8".encode())
    with pytest.raises(WsLoadBalanceError, match=r"split over 1 shard\(s\).*uses 4"):
        check_layout("p", LAYOUT.encode(), f"{LAYOUT}|4")
    with pytest.raises(WsLoadBalanceError, match="another version"):
        check_layout("p", b"4|4", f"{LAYOUT}|4")  # before recovery mode
