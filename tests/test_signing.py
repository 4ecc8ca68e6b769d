"""The trust boundary, end to end: real Hypercorn instances, one real Redis, real clients,
and publishes made by hand on the cluster's channels (what anyone with PUBLISH rights
under the prefix can do)."""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar, cast

import pytest
import redis.asyncio as aioredis
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from quart_wslb import (
    AllSelector,
    AsyncEmitter,
    ConnectionSelector,
    Emitter,
    GroupSelector,
    MetadataSelector,
    PathSelector,
    UserSelector,
    signals,
)
from quart_wslb.config import resolve_settings
from quart_wslb.envelope import Envelope, Kind, decode, encode
from quart_wslb.keys import Keys
from quart_wslb.receiver import Receiver
from quart_wslb.registry import Registry
from quart_wslb.selectors import Program
from quart_wslb.signal_sender import SignalSender
from quart_wslb.signing import Keyring, Verifier, canonical, message, predicate, sel_text
from tests.cluster import Clients, Cluster
from tests.support import held, make_connection, received, recording

StartCluster = Callable[..., Cluster]
F = TypeVar("F", bound=Callable[..., Any])
#: Two keys: k1 signs, k0 is still accepted (a rotation under way).
SECRET = "k1:first-secret-of-the-test,k0:older-secret-of-the-test"
QUIET = 0.5  # how long "nothing arrives" is watched


def cluster_test(test: F) -> F:
    """Marks a test that runs real Redis and Hypercorn processes (and may take longer)."""
    return cast(F, pytest.mark.integration(pytest.mark.timeout(90)(test)))


@asynccontextmanager
async def publisher(url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(url)
    try:
        yield client
    finally:
        await client.aclose()


@asynccontextmanager
async def emitting(url: str, prefix: str, secret: str | None) -> AsyncIterator[AsyncEmitter]:
    emitter = AsyncEmitter(redis_url=url, prefix=prefix, secret=secret)
    try:
        yield emitter
    finally:
        await emitter.aclose()


async def silent(*clients: ClientConnection) -> bool:
    """Whether none of ``clients`` receives anything for ``QUIET`` seconds."""
    for client in clients:
        try:
            frame = await asyncio.wait_for(client.recv(), QUIET)
        except TimeoutError:
            continue
        raise AssertionError(f"a client received {frame!r}")
    return True


async def stat(cluster: Cluster, index: int, name: str) -> int:
    return int((await cluster[index].stats()).get(name, 0))


async def wait_stat(cluster: Cluster, index: int, name: str, value: int) -> None:
    """Wait (at most 5 s) until an instance's counter reaches ``value``."""
    for _ in range(100):
        if await stat(cluster, index, name) >= value:
            return
        await asyncio.sleep(0.05)
    stats: dict[str, Any] = await cluster[index].stats()
    raise AssertionError(f"{name} never reached {value}: {stats}")


@cluster_test
async def test_signing_forged_broadcast_is_dropped_with_a_secret(
    start_cluster: StartCluster, clients: Clients, redis_url: str, prefix: str
) -> None:
    """A valid-looking envelope on the broadcast channel, published by hand, reaches no
    client of a cluster that has a secret: every instance drops it as unsigned."""
    cluster = start_cluster(2, WSLB_SECRET=SECRET)
    ann, _ = await clients.join(cluster[0], "ann")
    bob, _ = await clients.join(cluster[1], "bob")
    forged = encode(Envelope("forged-1", "attacker", "text", [], "you have been pwned"))
    async with publisher(redis_url) as redis:
        assert await redis.publish(Keys(prefix).broadcast, forged) == 2
    assert await silent(ann, bob)
    for index in (0, 1):
        await wait_stat(cluster, index, "dropped_unsigned", 1)
    assert await cluster[0].send({"all": True}, "signed, so delivered") == 2
    for client in (ann, bob):
        assert await asyncio.wait_for(client.recv(), 5) == "signed, so delivered"


@cluster_test
async def test_signing_forged_disconnect_with_a_bad_code_is_rejected(
    start_cluster: StartCluster, clients: Clients, redis_url: str, prefix: str
) -> None:
    """A disconnect control with code 99999 closes nobody (it used to close with 1006,
    signalling nothing): the instance drops it as malformed."""
    cluster = start_cluster(1)
    ann, ann_id = await clients.join(cluster[0], "ann")
    forged = encode(
        Envelope("kick-1", "attacker", "disconnect", [ann_id], '{"code":99999,"reason":"x"}')
    )
    async with publisher(redis_url) as redis:
        assert await redis.publish(Keys(prefix).channel("i0"), forged) == 1
    await wait_stat(cluster, 0, "dropped_malformed", 1)
    assert await cluster[0].send({"user": "ann"}, "still here") == 1
    assert await asyncio.wait_for(ann.recv(), 5) == "still here"


@cluster_test
async def test_signing_forged_probe_is_rejected(
    start_cluster: StartCluster, redis_url: str, prefix: str
) -> None:
    """A probe numbered past any the instance sent (which made every later probe look
    heard, disabling deaf-subscriber detection) is dropped and signalled."""
    cluster = start_cluster(1)
    async with publisher(redis_url) as redis:
        probe = b"\x00probe:" + str(10**18).encode()
        assert await redis.publish(Keys(prefix).channel("i0"), probe) == 1
    await wait_stat(cluster, 0, "dropped_malformed", 1)
    assert json.dumps(await cluster[0].stats())  # the instance still answers


async def recv(client: ClientConnection) -> Any:
    frame = await asyncio.wait_for(client.recv(), 5)
    return json.loads(frame) if isinstance(frame, str) and frame[:1] in "{[" else frame


async def no_refusals(cluster: Cluster) -> None:
    for instance in cluster.instances:
        stats = await instance.stats()
        assert not [name for name in stats if name.startswith("dropped")], stats


@cluster_test
async def test_signing_signed_sends_arrive_across_the_cluster(
    start_cluster: StartCluster, clients: Clients
) -> None:
    """Every kind of selector, membership and disconnect, between instances that sign
    and check: all delivered, nothing refused."""
    cluster = start_cluster(3, WSLB_SECRET=SECRET)
    ann, _ = await clients.join(cluster[0], "ann", "red")
    bob, _ = await clients.join(cluster[1], "bob", "red")
    cat, _ = await clients.join(cluster[2], "cat", "blue")
    assert await cluster[2].send({"user": "ann"}, {"to": "ann"}) == 1
    assert await recv(ann) == {"to": "ann"}
    assert await cluster[0].call("/join", {"selector": {"user": "bob"}, "group": "vip"}) == {
        "matched": 1
    }
    assert await cluster[0].send({"group": "vip"}, "vip only") == 1
    assert await recv(bob) == "vip only"
    assert await cluster[1].send({"meta": {"room": "blue"}}, "blue") == 1
    assert await recv(cat) == "blue"
    assert await cluster[1].send({"room_prefix": "bl"}, "custom") == 1  # paged by id
    assert await recv(cat) == "custom"
    both = {"or": [{"path": "/ws/red"}, {"group": "vip"}]}
    # An | of index selectors counts an upper bound: bob, in both, counts twice.
    assert await cluster[2].send(both, ["red", "or", "vip"]) == 3
    assert (await recv(ann), await recv(bob)) == (["red", "or", "vip"],) * 2
    await ann.send("join:team")  # a connection's own join, then a send to the group
    assert (await recv(ann))["done"] == "join:team"
    assert await cluster[1].send({"group": "team"}, "team") == 1
    assert await recv(ann) == "team"
    body = {"selector": {"user": "cat"}, "code": 4001, "reason": "bye"}
    assert await cluster[0].call("/disconnect", body) == {"closed": 1}
    with pytest.raises(ConnectionClosed) as closed:
        await recv(cat)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4001
    await no_refusals(cluster)


@cluster_test
async def test_signing_emitters_sign_and_others_are_refused(
    start_cluster: StartCluster, clients: Clients, redis_url: str, prefix: str
) -> None:
    """Emitters with the signing key or the older accepted one are delivered (a key
    rotation); one without a secret, with a wrong secret or an unknown key id is not."""
    cluster = start_cluster(2, WSLB_SECRET=SECRET)
    ann, _ = await clients.join(cluster[1], "ann")
    ann_only = UserSelector("ann")
    for secret in ("k1:first-secret-of-the-test", "k0:older-secret-of-the-test", SECRET):
        async with emitting(redis_url, prefix, secret) as emitter:
            assert await emitter.send(ann_only, secret[:2]) == 1
        assert await recv(ann) == secret[:2]
    with Emitter(redis_url, prefix=prefix, secret={"k0": "older-secret-of-the-test"}) as sync:
        assert sync.send(ann_only, "sync") == 1
    assert await recv(ann) == "sync"
    # No secret (refused as unsigned), a wrong one, an unknown key id (bad signatures).
    for other in (None, "k1:not-the-secret-at-all", "k9:first-secret-of-the-test"):
        async with emitting(redis_url, prefix, other) as emitter:
            assert await emitter.send(ann_only, "refused") == 1  # routed, then refused
            assert await emitter.disconnect(ann_only, 4000) == 1
    assert await silent(ann)
    await wait_stat(cluster, 1, "dropped_unsigned", 2)
    await wait_stat(cluster, 1, "dropped_bad_signature", 4)


@cluster_test
async def test_signing_send_many_is_signed_message_by_message(
    start_cluster: StartCluster, clients: Clients, redis_url: str, prefix: str
) -> None:
    """An emitter's send_many, signed, is delivered whole by instances that check; the
    same without the secret is refused, every message of it."""
    cluster = start_cluster(2, WSLB_SECRET=SECRET)
    ann, _ = await clients.join(cluster[1], "ann", "red")
    pairs: list[tuple[Any, object]] = [(UserSelector("ann"), str(n)) for n in range(200)]
    pairs += [(GroupSelector("none"), "x"), (MetadataSelector(room="red"), "room")]
    async with emitting(redis_url, prefix, SECRET) as emitter:
        assert await emitter.send_many(pairs) == [1] * 200 + [0, 1]
    assert [await recv(ann) for _ in range(201)] == [str(n) for n in range(200)] + ["room"]
    await no_refusals(cluster)
    async with emitting(redis_url, prefix, None) as emitter:
        assert await emitter.send_many(pairs[:50]) == [1] * 50  # routed, then refused
    assert await silent(ann)
    await wait_stat(cluster, 1, "dropped_unsigned", 50)


@cluster_test
async def test_signing_key_rotation_mid_deploy_refuses_nothing(
    start_cluster: StartCluster, clients: Clients
) -> None:
    """Step 2 of a rotation, half deployed: one instance still signs with the old key,
    the other already with the new one; each accepts what the other signs."""
    cluster = start_cluster(
        1, WSLB_SECRET="k0:older-secret-of-the-test,k1:first-secret-of-the-test"
    )
    cluster.env["WSLB_SECRET"] = SECRET  # k1 signs, k0 accepted
    cluster.spawn(1).wait_ready()
    ann, _ = await clients.join(cluster[0], "ann")
    bob, _ = await clients.join(cluster[1], "bob")
    assert await cluster[0].send({"user": "bob"}, "signed with k0") == 1
    assert await cluster[1].send({"user": "ann"}, "signed with k1") == 1
    assert (await recv(bob), await recv(ann)) == ("signed with k0", "signed with k1")
    await no_refusals(cluster)


@cluster_test
async def test_signing_replayed_redirected_and_stale_messages_are_refused(
    start_cluster: StartCluster, clients: Clients, redis_url: str, prefix: str
) -> None:
    """A captured signed envelope published again, a signed message whose targets were
    changed to someone its selector does not select, and a stale one: none delivered."""
    cluster = start_cluster(1, WSLB_SECRET=SECRET)
    ann, _ = await clients.join(cluster[0], "ann")
    bob, bob_id = await clients.join(cluster[0], "bob")
    channel = Keys(prefix).channel("i0")
    async with publisher(redis_url) as redis, redis.pubsub() as pubsub:
        await pubsub.subscribe(channel)
        assert await cluster[0].send({"user": "ann"}, "once") == 1
        assert await recv(ann) == "once"
        captured = await captured_envelope(pubsub)
        assert await redis.publish(channel, captured) == 2
        await wait_stat(cluster, 0, "dropped_bad_signature", 1)
        ring = Keyring.parse(SECRET)
        redirected = signed(ring, [bob_id], ["Uann"], "for ann only", origin="i0")
        assert await redis.publish(channel, encode(redirected)) == 2
        await wait_stat(cluster, 0, "dropped_bad_signature", 2)
        old = time.time_ns() // 1_000_000 - 120_000
        stale = signed(ring, [bob_id], ["Ubob"], "too late", origin="i0", ts=old)
        assert await redis.publish(channel, encode(stale)) == 2
        await wait_stat(cluster, 0, "dropped_bad_signature", 3)
    assert await silent(ann, bob)
    assert await cluster[0].send({"user": "bob"}, "fresh") == 1
    assert await recv(bob) == "fresh"


async def captured_envelope(pubsub: Any) -> bytes:
    """The first envelope (not a probe) that ``pubsub`` receives within 5 s."""
    async with asyncio.timeout(5):
        while True:
            found = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1)
            if found and not found["data"].startswith(b"\x00"):
                return bytes(found["data"])


# Units: keys, the canonical selector, the local evaluator, the verifier.

KEYS = Keys("t")
RING = Keyring.parse(SECRET)


def signed(
    ring: Keyring,
    targets: list[str],
    sel: list[str],
    frame: str = "hi",
    *,
    id: str = "m1",
    origin: str = "i0",
    kind: Kind = "text",
    ts: int | None = None,
) -> Envelope:
    """A signed message, as an instance with ``ring`` would send it."""
    ts = time.time_ns() // 1_000_000 if ts is None else ts
    text = sel_text(sel)
    assert text is not None
    data = message(origin, id, kind, ts, text, frame.encode())
    return Envelope(id, origin, kind, targets, frame, ts=ts, sel=sel, sig=ring.sign(data))


def test_keyring_parse_text_first_signs_all_accepted() -> None:
    old = Keyring.parse("k0:older-secret-of-the-test")
    data = b"payload"
    assert RING.signing == "k1"
    assert RING.check(RING.sign(data), data) is None
    assert RING.check(old.sign(data), data) is None  # the old key is still accepted
    assert old.check(RING.sign(data), data) == "unknown key id 'k1'"
    assert RING.check("k1:" + "é" * 32, data) == "bad MAC"
    assert RING.check(RING.sign(data), b"other") == "bad MAC"


def test_keyring_parse_mapping_and_bytes() -> None:
    ring = Keyring.parse({"a": b"sixteen-bytes-00", "b": "sixteen-chars-000"})
    assert (ring.signing, repr(ring)) == ("a", "Keyring(signing='a', accepted=['a', 'b'])")
    assert Keyring.parse(ring) is ring


@pytest.mark.parametrize(
    "value",
    ["nokeyid-but-long-enough", "k1:tiny", "bad id:long-enough-secret-1", "", {}, 42],
)
def test_keyring_parse_rejects_and_never_quotes_the_secret(value: object) -> None:
    with pytest.raises((ValueError, TypeError)) as error:
        Keyring.parse(value)
    for secret in ("nokeyid-but-long-enough", "tiny", "long-enough-secret-1"):
        assert secret not in str(error.value)


def test_keyring_secret_stays_out_of_settings_repr() -> None:
    settings = resolve_settings({"secret": SECRET}, {})
    assert isinstance(settings.secret, Keyring)
    for shown in (repr(settings), repr(settings.secret), str(settings)):
        assert "first-secret" not in shown and "older-secret" not in shown


def test_canonical_names_the_keys_of_set_ops() -> None:
    selector = (GroupSelector("vip") & MetadataSelector(room="r:1")) | ConnectionSelector("S:x")
    program = selector.compile(KEYS)
    assert canonical(program) == [
        "S" + KEYS.group("vip"),
        "S" + KEYS.metadata("room", "r:1"),
        "&",
        "CS:x",
        "|",
    ]
    assert canonical(UserSelector("ann").compile(KEYS)) == ["Uann"]
    by_id = Program(keys=["{t}:g:x"], ops=["M2", "S3", "S4", "S3", "|"])
    assert canonical(by_id) == ["M2", "S3", "S4", "S{t}:g:x", "|"]


def test_predicate_matches_what_the_selector_matches() -> None:
    ann = make_connection(id="i0:a", user="ann", path="/ws/red", metadata={"room": "é:1"})
    bob = make_connection(id="i0:b", user="bob", path="/ws/blue", metadata={"room": "x"})
    ann.groups.add("vip")
    selectors = [
        UserSelector("ann"),
        ConnectionSelector("i0:b"),
        PathSelector("/ws/red"),
        GroupSelector("vip"),
        MetadataSelector(room="é:1"),
        AllSelector(),
        UserSelector("bob") | GroupSelector("vip"),
        UserSelector("ann") & PathSelector("/ws/blue"),
        GroupSelector("vip") & MetadataSelector(room="é:1"),
    ]
    for selector in selectors:
        match = predicate(canonical(selector.compile(KEYS)), KEYS)
        assert match is not None
        for connection in (ann, bob):
            assert match(connection) == selector.matches(connection), (selector, connection)
    by_id = predicate(["M2", "i0:b", "i0:z"], KEYS)
    assert by_id is not None and (by_id(ann), by_id(bob)) == (False, True)


@pytest.mark.parametrize(
    "sel",
    [
        [],
        ["X"],
        ["U"],
        ["&"],
        ["Ua", "Ub"],
        ["Ua", "|"],
        ["M3", "a"],
        ["Mx"],
        ["M" + "9" * 5000, "a"],
        ["S{other}:g:vip"],
        ["S{t}:q:vip"],
        ["S{t}:m:9:room:x"],
        ["S{t}:m:x:room:x"],
        ["S{t}:m:" + "9" * 5000 + ":room:x"],
        ["M\u00b2", "a", "b"],  # str.isdigit() holds for "²", int() refuses it
        ["S{t}:m:\u00b2:room:x"],
        ["M\u0663", "a", "b", "c"],  # Arabic-Indic three: int() reads it, ASCII only here
    ],
)
def test_predicate_refuses_what_it_cannot_read(sel: list[str]) -> None:
    assert predicate(sel, KEYS) is None


def test_verifier_accepts_signed_then_refuses_its_replay() -> None:
    verifier = Verifier(RING, KEYS)
    envelope = signed(RING, ["i0:a"], ["Uann"])
    assert verifier.check(envelope) is None
    assert verifier.check(envelope) == "replayed"


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"sig": None}, "unsigned"),
        ({"ts": None}, "incomplete signature"),
        ({"frame": "ho"}, "bad MAC"),
        ({"origin": "i9"}, "bad MAC"),
        ({"kind": "json"}, "bad MAC"),
        ({"id": "m2"}, "bad MAC"),
        ({"sel": ["Ubob"]}, "bad MAC"),
        ({"ts": 1}, "bad MAC"),
    ],
)
def test_verifier_refuses_any_change(change: dict[str, Any], problem: str) -> None:
    envelope = signed(RING, ["i0:a"], ["Uann"])
    for name, value in change.items():
        setattr(envelope, name, value)
    assert Verifier(RING, KEYS).check(envelope) == problem


def test_verifier_refuses_other_keys_and_stale_messages() -> None:
    verifier = Verifier(RING, KEYS, window=5)
    other = Keyring.parse("k1:somebody-else-secret")
    assert verifier.check(signed(other, [], ["B"])) == "bad MAC"
    stranger = Keyring.parse("k7:somebody-else-secret")
    assert verifier.check(signed(stranger, [], ["B"])) == "unknown key id 'k7'"
    old = signed(RING, [], ["B"], ts=time.time_ns() // 1_000_000 - 6_000)
    assert (verifier.check(old) or "").startswith("stale")
    ahead = signed(RING, [], ["B"], ts=time.time_ns() // 1_000_000 + 6_000)
    assert (verifier.check(ahead) or "").startswith("stale")


def test_verifier_past_its_bound_refuses_what_it_forgot() -> None:
    verifier = Verifier(RING, KEYS, recent=2)
    first, second, third = (signed(RING, [], ["B"], id=f"m{n}") for n in range(3))
    for envelope in (first, second, third):
        assert verifier.check(envelope) is None
    # first was forgotten early: its replay is refused all the same, by its timestamp.
    assert verifier.check(first) == "replayed"
    assert len(verifier._seen) == 2


def test_verifier_floor_is_per_origin_so_a_slow_clock_is_not_refused() -> None:
    verifier = Verifier(RING, KEYS, recent=2)
    now = time.time_ns() // 1_000_000
    fast = [signed(RING, [], ["B"], id=f"f{n}", origin="fast", ts=now + n) for n in range(3)]
    for envelope in fast:
        assert verifier.check(envelope) is None
    # "fast"'s floor rose to its forgotten message's timestamp; "slow"'s clock is 2 s
    # behind, within the window: its fresh messages are not replays.
    late = signed(RING, [], ["B"], id="s0", origin="slow", ts=now - 2_000)
    assert verifier.check(late) is None
    assert verifier.check(fast[0]) == "replayed"


def test_verifier_probe_signed_by_the_ring() -> None:
    verifier = Verifier(RING, KEYS)
    number, _, signature = RING.probe("i0", 7).partition(b":")
    assert int(number) == 7
    assert verifier.probe("i0", 7, signature) is None
    assert verifier.probe("i0", 8, signature) == "bad MAC"
    assert verifier.probe("i1", 7, signature) == "bad MAC"
    assert verifier.probe("i0", 7, b"") == "unsigned"


@pytest.mark.parametrize("secret", [b"sixteen-bytes-00", b"k" * 64, b"a much longer secret " * 5])
def test_keyring_mac_is_hmac_sha256(secret: bytes) -> None:
    ring = Keyring({"k": secret})
    data = b"origin\nid\ntext\n1\n5\nUalic" + bytes(range(256))
    expected = hmac.digest(secret, data, "sha256")[:16].hex()
    assert ring.sign(data) == f"k:{expected}"


def test_keyring_fragment_escapes_what_json_must() -> None:
    for sel in (['Ua"b'], ["Ua\\b"], ["Ua\nb", "Uc", "|"], ["Ué"]):
        fragment = RING.fragment("i0", "m1", "text", b"hi", sel)
        entry = json.loads("{" + fragment.decode() + '"id":"m1"}')
        assert entry["sel"] == sel
        envelope = Envelope("m1", "i0", "text", [], "hi", entry["ts"], sel, entry["sig"])
        assert Verifier(RING, KEYS).check(envelope) is None
    with pytest.raises(ValueError, match="NUL"):
        RING.fragment("i0", "m1", "text", b"hi", ["Ua\0b"])


async def test_signing_batched_sends_sign_each_message(fake_redis: aioredis.Redis) -> None:
    """Concurrent sends share one envelope per instance; each of its messages carries a
    signature of its own, which the receiver checks on its own."""
    registry = Registry(fake_redis, KEYS)
    for n in range(4):
        await registry.register(make_connection(id=f"i1:c{n}", user=f"u{n}"))
    await fake_redis.set(KEYS.heartbeat("i1"), "1")
    await fake_redis.hset(KEYS.instances, "i1", '{"started_at":0}')
    emitter = AsyncEmitter(fake_redis, prefix="t", origin="i0", secret=SECRET)
    async with fake_redis.pubsub() as pubsub:
        await pubsub.subscribe(KEYS.channel("i1"))
        sends = [emitter.send(UserSelector(f"u{n}"), f"to u{n}") for n in range(4)]
        assert await asyncio.gather(*sends) == [1, 1, 1, 1]
        envelopes = [e for raw in await received(pubsub) for e in decode(raw)]
    await emitter.aclose()
    assert [e.frame for e in envelopes] == [f"to u{n}" for n in range(4)]
    verifier = Verifier(RING, KEYS)
    for n, envelope in enumerate(envelopes):
        assert (envelope.sel, envelope.targets) == ([f"Uu{n}"], [f"i1:c{n}"])
        assert verifier.check(envelope) is None


async def test_signing_router_refuses_unsigned_and_retargeted(fake_redis: aioredis.Redis) -> None:
    ann = make_connection(id="i1:a", user="ann")
    bob = make_connection(id="i1:b", user="bob")
    owner = SignalSender(object())
    receiver = Receiver(fake_redis, KEYS, "i1", held(ann, bob), owner, keyring=RING)
    ann.start()
    bob.start()
    try:
        with recording(signals.message_dropped, owner) as dropped:
            await receiver.dispatch(encode(Envelope("m0", "i0", "text", [], "unsigned")))
            await receiver.dispatch(encode(signed(RING, [], ["Uann"], "all?", id="m1")))
            mixed = signed(RING, ["i1:a", "i1:b"], ["Uann"], "ann only", id="m2")
            await receiver.dispatch(encode(mixed))
        assert dropped.reasons() == ["unsigned", "bad_signature", "bad_signature"]
        assert dropped.calls[2]["detail"] == "target outside the selector: i1:b"
        assert await ann._websocket.wait_sent(1) == ["ann only"]  # type: ignore[attr-defined]
        assert bob._websocket.sent == []  # type: ignore[attr-defined]
    finally:
        await ann.stop()
        await bob.stop()


@pytest.mark.parametrize(
    "change",
    [
        {"sig": "k1:" + "é" * 32},
        {"sig": "no-colon"},
        {"ts": 10**30},
        {"ts": -1},
        {"sel": ["M" + "9" * 5000, "i1:a"]},
        {"sel": ["S{t}:m:" + "9" * 5000 + ":room:x"]},
        {"sel": ["Uann\0"]},
    ],
)
async def test_signing_router_refuses_hostile_fields_without_raising(
    fake_redis: aioredis.Redis, change: dict[str, Any]
) -> None:
    """Whatever a forger puts in the signature fields costs that message only, refused
    as a bad signature; dispatch itself never raises."""
    ann = make_connection(id="i1:a", user="ann")
    owner = SignalSender(object())
    receiver = Receiver(fake_redis, KEYS, "i1", held(ann), owner, keyring=RING)
    envelope = signed(RING, ["i1:a"], ["Uann"], "forged")
    for name, value in change.items():
        setattr(envelope, name, value)
    with recording(signals.message_dropped, owner) as dropped:
        await receiver.dispatch(encode(envelope))
    assert dropped.reasons() == ["bad_signature"]
    assert len(ann._queue) == 0


async def first_refused(redis: aioredis.Redis, raw: bytes) -> tuple[list[str], list[Any]]:
    """Dispatch ``raw`` (messages m1 and m2 to i1:a, user ann) on a receiver with a
    secret: why m1 (never m2) was dropped, and what ann received (one frame)."""
    ann = make_connection(id="i1:a", user="ann")
    owner = SignalSender(object())
    receiver = Receiver(redis, KEYS, "i1", held(ann), owner, keyring=RING)
    ann.start()
    try:
        with recording(signals.message_dropped, owner) as dropped:
            await receiver.dispatch(raw)
        sent: list[Any] = await ann._websocket.wait_sent(1)  # type: ignore[attr-defined]
    finally:
        await ann.stop()
    assert all(call["message_id"] != "m2" for call in dropped.calls)
    return dropped.reasons(), sent


@pytest.mark.parametrize("sel", [["M\u00b2", "i1:a", "i1:b"], ["S{t}:m:\u00b2:room:x"]])
async def test_signing_router_hostile_signed_selector_costs_only_its_message(
    fake_redis: aioredis.Redis, sel: list[str]
) -> None:
    """A key holder's unreadable selector is refused on its own: the other messages of
    the same publish are delivered."""
    hostile = signed(RING, ["i1:a"], sel, "hostile", id="m1")
    fine = signed(RING, ["i1:a"], ["Uann"], "fine", id="m2")
    assert await first_refused(fake_redis, encode(hostile, fine)) == (["bad_signature"], ["fine"])


async def test_signing_router_check_that_raises_costs_only_its_message(
    fake_redis: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Should a check of a signed message ever raise, that message alone is dropped."""
    selects = Verifier.selects

    def broken(self: Verifier, sel: list[str]) -> Any:
        if sel == ["Ubroken"]:
            raise ValueError("a bug in a check")
        return selects(self, sel)

    monkeypatch.setattr(Verifier, "selects", broken)
    raw = encode(
        signed(RING, ["i1:a"], ["Ubroken"], "first", id="m1"),
        signed(RING, ["i1:a"], ["Uann"], "second", id="m2"),
    )
    assert await first_refused(fake_redis, raw) == (["error"], ["second"])


async def test_signing_router_checks_targets_once_and_delivers_to_those_it_checked(
    fake_redis: aioredis.Redis,
) -> None:
    """The targets are matched against the selector once, before any await: a
    connection that appears meanwhile (while signals run) under a target id that had
    none is reported gone, not handed the message unchecked."""
    ann = make_connection(id="i1:a", user="ann")
    bob = make_connection(id="i1:b", user="bob")
    local = held(ann)
    owner = SignalSender(object())
    receiver = Receiver(fake_redis, KEYS, "i1", local, owner, keyring=RING)

    def arrives(sender: object, **_: Any) -> None:
        local.add(bob)  # registered while the receiver awaits its signals

    ann.start()
    bob.start()
    try:
        with (
            signals.message_received.connected_to(arrives, sender=owner.sender),
            recording(signals.message_dropped, owner) as dropped,
        ):
            await receiver.dispatch(encode(signed(RING, ["i1:a", "i1:b"], ["Uann"], "ann only")))
        assert await ann._websocket.wait_sent(1) == ["ann only"]  # type: ignore[attr-defined]
        assert (dropped.reasons(), dropped.calls[0]["detail"]) == (["gone"], "i1:b")
        assert len(bob._queue) == 0
        assert bob._websocket.sent == []  # type: ignore[attr-defined]
    finally:
        await ann.stop()
        await bob.stop()


def test_verifier_prunes_floors_rarely_when_many_origins_stay_in_the_window(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Past ``FLOORS`` origins, the floors are pruned; when all of them are still within
    the window, pruning removes nothing, and the next prune waits until there are twice
    as many (not one prune of every floor per message)."""
    monkeypatch.setattr("quart_wslb.signing.FLOORS", 4)
    verifier = Verifier(RING, KEYS, recent=1)
    now = time.time_ns() // 1_000_000
    sent = [signed(RING, [], ["B"], id="m", origin=f"o{n}", ts=now) for n in range(200)]
    rebuilds, floors = 0, verifier._floors
    for envelope in sent:
        assert verifier.check(envelope) is None
        rebuilds += verifier._floors is not floors
        floors = verifier._floors
    assert len(floors) == 199  # every origin but the last has a forgotten message
    assert rebuilds <= 8, f"{rebuilds} prunes for 200 messages"
    assert all(verifier.check(envelope) == "replayed" for envelope in sent[:-1])


@pytest.mark.parametrize("field", ["sel", "id"])
async def test_signing_router_refuses_lone_surrogates_as_a_bad_signature(
    fake_redis: aioredis.Redis, field: str, caplog: pytest.LogCaptureFixture
) -> None:
    """JSON lets anyone who can publish put a lone surrogate in a string, which has no
    UTF-8: no sender signs one, so the message is refused like a forgery (no ERROR
    with a traceback), and the rest of the publish is delivered."""
    fine = signed(RING, ["i1:a"], ["Uann"], "fine", id="m2")
    forged = {"ts": fine.ts, "sel": ["Uann"], "sig": fine.sig, "id": "m1", "kind": "text"}
    forged[field] = ["Uann\ud800"] if field == "sel" else "m\ud800"
    header = json.loads(encode(fine).partition(b"\n")[0])
    header["messages"].insert(0, {**forged, "targets": ["i1:a"], "size": 6})
    raw = json.dumps(header).encode() + b"\nforgedfine"  # ASCII: the surrogate escaped
    assert await first_refused(fake_redis, raw) == (["bad_signature"], ["fine"])
    assert not [r for r in caplog.records if r.levelname == "ERROR"]


def test_verifier_selects_reuses_the_test_of_a_repeated_selector() -> None:
    verifier = Verifier(RING, KEYS)
    group = canonical(GroupSelector("vip").compile(KEYS))
    first = verifier.selects(list(group))
    assert first is not None and verifier.selects(list(group)) is first
    ann = make_connection(id="i0:a", user="ann")
    ann.groups.add("vip")
    other = verifier.selects(["Ubob"])
    assert other is not None and other is not first
    assert (first(ann), other(ann)) == (True, False)
    assert verifier.selects(["X"]) is None and verifier.selects(["X"]) is None


def test_verifier_prunes_the_floors_that_fell_below_the_window(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("quart_wslb.signing.FLOORS", 4)
    verifier = Verifier(RING, KEYS, window=5, recent=1)
    then = time.time_ns() // 1_000_000
    later = then + 6_000  # past the window of everything sent at ``then``
    for n, ts in enumerate([then] * 10 + [later] * 30):
        envelope = signed(RING, [], ["B"], id="m", origin=f"o{n}", ts=ts)
        assert verifier.check(envelope, ts) is None
    assert 0 < len(verifier._floors) <= 29
    assert all(ts == later for ts in verifier._floors.values()), verifier._floors
