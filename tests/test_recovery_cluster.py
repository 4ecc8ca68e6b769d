"""Recovery mode end to end: Hypercorn instances of ``tests.cluster_app`` (its route
``/ws/recover`` has ``@ws_route(recovery=True)``), real Redis (one server, or the 3-master
Redis Cluster for the stream tests), and real clients of the protocol
(:class:`tests.recovering.RecoveringClient`).

- Streams of numbered messages from an emitter arrive exactly once and in order however
  the client's connection ends: ``kill -9`` of its instance, drops of its own every 500
  messages, a resume with thousands to replay, a slow client closed with 1013, the
  instances' subscribers cut (caught up from history). Counts and resume gaps printed.
- A resume after a clean close replays what was missed, in every frame kind.
- A resume that cannot be replayed in full is told ``recovered: false``: Redis lost its
  data (FLUSHALL or a restart, before the resume or while connected: 4410), history
  trimmed (``WSLB_RECOVERY_LENGTH``), session expired (``WSLB_RECOVERY_TTL``), wrong
  token, session, user or path.
- One owner per session: of two resumes only the last stays open, the other is closed
  with 4409, as is a connection still open when its session resumes elsewhere.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
import redis
from redis.asyncio import Redis
from websockets.exceptions import ConnectionClosed

from quart_wslb import AsyncEmitter, UserSelector
from quart_wslb.testing import RedisServer
from tests.cluster import Cluster, HttpError, Instance, Where, where_of
from tests.recovering import (
    HISTORY_LOST,
    RECOVER_PATH,
    RESUMED_ELSEWHERE,
    Message,
    Pool,
    RecoveringClient,
    Welcome,
    seq,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]
StartCluster = Callable[..., Cluster]
#: Faster heartbeats and a shorter Redis timeout, for the tests where Redis goes away.
FAST = {"WSLB_HEARTBEAT_INTERVAL": "0.5", "WSLB_INSTANCE_TTL": "4", "WSLB_REDIS_TIMEOUT": "2"}
#: The numbered messages of the stream tests, sent in batches of ``STREAM_BATCH`` (one
#: ``send_many`` each, one at a time, so their order is defined) ``STREAM_PAUSE`` seconds
#: apart; the client must have them all within ``STREAM_TIMEOUT`` seconds.
STREAM_TOTAL = 10_000
STREAM_BATCH = 50
STREAM_PAUSE = 0.005
STREAM_TIMEOUT = 120.0
#: The drop test's client drops its connection after every ``CUT_EVERY`` messages.
CUT_EVERY = 500
#: Messages missed before the resume under a stream (as many follow, live).
MISSED = 3_000
#: The slow client test: messages of ``SLOW_PAD`` bytes, more than the socket buffers
#: hold, to a client that does not read, on instances with queues of ``SLOW_QUEUE``.
SLOW_TOTAL = 2_000
SLOW_PAD = 4_000
SLOW_QUEUE = 50
#: The receive buffer of the slow client's socket (the kernel's own may grow to 32 MB).
SLOW_RCVBUF = 16_384
#: The history length of the retention test's instances (``WSLB_RECOVERY_LENGTH``).
SHORT_HISTORY = 50
#: The session TTL of the expiry test's instances (``WSLB_RECOVERY_TTL``); how long
#: after a close it resumes within the TTL; and how long after when past it, with room
#: for the slack of the session key's expiry (a refresh period, a quarter of the TTL,
#: and a second: docs/recovery.md) and for a loaded machine.
SHORT_TTL = 2
WITHIN_TTL = 1.5
EXPIRED_AFTER = 5.5


def base(instance: Instance) -> str:
    """The ``ws://host:port`` of ``instance``, which :class:`RecoveringClient` takes."""
    return f"ws://127.0.0.1:{instance.port}"


async def send_numbers(instance: Instance, user: str, numbers: Sequence[int]) -> list[int]:
    """``{"n": n}`` for each of ``numbers`` to ``user``, in order, in one ``send_many`` on
    ``instance``; the routed count of each."""
    body = {"messages": [[{"user": user}, {"n": n}] for n in numbers]}
    return [int(count) for count in (await instance.call("/send_many", body))["routed"]]


async def nothing_more(client: RecoveringClient) -> None:
    """Nothing more comes, and nothing came twice; then close."""
    extra = await client.quiet()
    assert not extra and not client.stale, f"extra {numbers(extra)}, stale {client.stale}"
    await client.close()


def numbers(messages: Sequence[Message]) -> list[int]:
    """The ``n`` of each numbered message."""
    return [int(m.value["n"]) for m in messages]


async def open_within(client: RecoveringClient, where: str, timeout: float) -> Welcome:
    """``client.open(where)``, tried again while the instance refuses (Redis away)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await client.open(where)
        except (OSError, ConnectionClosed, TimeoutError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


async def send_within(instance: Instance, user: str, message: Any, timeout: float) -> int:
    """``instance.send`` to ``user``, tried again while it answers an error (Redis away)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await instance.send({"user": user}, message)
        except (HttpError, OSError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


@pytest.fixture(name="recovering")
async def fixture_recovering() -> AsyncIterator[Pool]:
    """The test's recovery clients; all their connections are closed at the end."""
    pool = Pool()
    yield pool
    await pool.close()


@pytest.fixture(
    name="where", params=["redis", pytest.param("cluster", marks=pytest.mark.topology)]
)
def fixture_where(request: pytest.FixtureRequest) -> Where:
    """One real Redis, or the session's Redis Cluster of 3 masters (``cluster_set``)."""
    return where_of(request, request.param)


@dataclass
class Streamed:
    """What became of a stream of numbered messages at one client."""

    name: str
    total: int
    client: RecoveringClient
    #: Messages that arrived after the last one, while the client waited for more.
    late: list[Message]

    def check(self) -> None:
        """Print the counts; assert every message arrived once, in order, each resume
        was ``recovered: true``, and nothing came after."""
        got = numbers(self.client.messages)
        every = got + numbers(self.client.stale)
        lost = sorted(set(range(1, self.total + 1)) - set(got))
        duplicated = len(every) - len(set(every))
        misplaced = [(a, b) for a, b in zip(got, got[1:], strict=False) if b != a + 1]
        outages = self.client.outages
        gaps = sorted(outage.gap for outage in outages)
        print(
            f"\n{self.name}: {self.total} sent, {len(got)} received, {len(lost)} lost, "
            f"{duplicated} duplicated, {len(misplaced)} out of order, {len(self.late)} late; "
            f"{len(outages)} resumes, gap (loss to welcome) min/median/max "
            + (f"{gaps[0]:.3f}/{gaps[len(gaps) // 2]:.3f}/{gaps[-1]:.3f} s" if gaps else "-")
        )
        refused = [outage.describe() for outage in outages if not outage.welcome_recovered]
        assert not refused, f"{len(refused)} resumes not recovered: {refused}"
        assert not lost, f"{len(lost)} lost of {self.total}: {lost[:20]}"
        stale = numbers(self.client.stale)
        assert duplicated == 0, f"{duplicated} duplicated of {self.total}: {stale[:20]}"
        assert not self.late, f"{len(self.late)} after the last: {numbers(self.late)[:20]}"
        assert not misplaced, f"{len(misplaced)} out of order: {misplaced[:20]}"
        assert all(m.kind == "j" and m.pos is not None for m in self.client.messages)


async def stream_to(
    client: RecoveringClient,
    bases: Sequence[str],
    emitter: AsyncEmitter,
    *,
    total: int = STREAM_TOTAL,
    first: int = 1,
    cut_every: int = 0,
    during: Callable[[int], None] | None = None,
) -> Streamed:
    """Send ``{"n": first}`` .. ``{"n": total}`` to ``client``'s user from ``emitter``, in
    batches of ``STREAM_BATCH`` (one ``send_many`` each, one at a time: their order is
    defined) ``STREAM_PAUSE`` apart, while ``client`` follows them over ``bases``
    (dropping its connection every ``cut_every`` messages, if given). ``during(sent)``
    runs the moment the client takes message ``total // 3`` (in the middle of a batch:
    the rest of it is on its way), told how many were sent by then."""
    sent = 0
    user = UserSelector(client.user)

    def each(message: Message) -> None:
        if during is not None and len(client.messages) == total // 3:
            during(sent)

    async def send() -> None:
        nonlocal sent
        for start in range(first, total + 1, STREAM_BATCH):
            batch = range(start, min(start + STREAM_BATCH, total + 1))
            await emitter.send_many([(user, {"n": n}) for n in batch])
            sent = batch[-1]
            await asyncio.sleep(STREAM_PAUSE)

    sender = asyncio.create_task(send())
    try:
        await client.follow(
            bases,
            total,
            timeout=STREAM_TIMEOUT,
            settled=sender.done,
            cut_every=cut_every,
            on_message=each,
        )
    finally:
        await sender  # its failure, if any, is the test's
    return Streamed("", total, client, await client.quiet(0.5))


@pytest.mark.timeout(240)
async def test_recovery_kill_during_stream_loses_and_repeats_nothing(
    start_cluster: StartCluster, recovering: Pool, where: Where, prefix: str
) -> None:
    """SIGKILL of the instance that holds the client (its process group), while an
    emitter streams numbered messages to its user: the client resumes on another
    instance and has every message exactly once, in order."""
    cluster = start_cluster(3, url=where.url, **where.env)
    bases = [base(instance) for instance in cluster.instances]
    client = recovering.client("alice")
    first = await client.open(bases[0])
    assert first.recovered, f"a new session's welcome: {first}"
    killed_at = 0.0
    at_kill = (0, 0)

    def kill(sent: int) -> None:
        nonlocal killed_at, at_kill
        killed_at, at_kill = time.monotonic(), (sent, len(client.messages))
        cluster[0].crash()  # SIGKILL of its process group; blocks until it is reaped

    emitter = AsyncEmitter(redis_url=where.url, prefix=prefix, shards=where.shards)
    try:
        streamed = await stream_to(client, bases, emitter, during=kill)
    finally:
        await emitter.aclose()
        await client.close()
    streamed.name = f"kill -9 on {where.name}"
    outages = "; ".join(outage.describe() for outage in client.outages)
    print(f"\nkilled with {at_kill[0]} sent and {at_kill[1]} received; {outages}")
    if client.outages and client.outages[0].welcome is not None:
        print(f"welcome {client.outages[0].welcome.at - killed_at:.3f} s after the kill")
    streamed.check()
    assert killed_at, "the instance was never killed"
    assert at_kill[0] < STREAM_TOTAL, f"killed after the stream ended ({at_kill[0]} sent)"
    # The kill is the only loss (no close frame): the replay and the messages held
    # meanwhile wait for room in the queue, and a burst that fills it after them makes
    # the connection lag (it reads the history), never closes it.
    codes = [outage.code for outage in client.outages]
    assert codes == [1006], f"the kill was not the only loss: {outages}"
    assert client.outages[0].resumed_on != bases[0], f"resumed on the dead one: {outages}"


@pytest.mark.timeout(240)
async def test_recovery_connection_dropped_again_and_again_loses_and_repeats_nothing(
    start_cluster: StartCluster, recovering: Pool, where: Where, prefix: str
) -> None:
    """The client drops its connection (no close frame) every ``CUT_EVERY`` messages of
    the stream and resumes on the next instance: each resume merges replay and live
    messages while the stream goes on; every message arrives once, in order."""
    cluster = start_cluster(3, url=where.url, **where.env)
    bases = [base(instance) for instance in cluster.instances]
    client = recovering.client("abe")
    await client.open(bases[0])
    emitter = AsyncEmitter(redis_url=where.url, prefix=prefix, shards=where.shards)
    try:
        streamed = await stream_to(client, bases, emitter, cut_every=CUT_EVERY)
    finally:
        await emitter.aclose()
        await client.close()
    streamed.name = f"drops every {CUT_EVERY} on {where.name}"
    cuts = STREAM_TOTAL // CUT_EVERY
    assert len(client.outages) >= cuts - 1, f"{len(client.outages)} resumes of {cuts} drops"
    streamed.check()


async def test_recovery_resume_under_a_stream_is_not_closed_while_the_client_reads(
    start_cluster: StartCluster, recovering: Pool, redis_url: str, prefix: str
) -> None:
    """A resume with ``MISSED`` messages to replay while a stream goes on: the live
    messages held during the replay are handed over after it, and the connection of a
    client that reads stays open (default queue, ``WSLB_SEND_QUEUE_SIZE`` 256)."""
    cluster = start_cluster(2)
    bases = [base(instance) for instance in cluster.instances]
    client = recovering.client("una")
    await client.open(bases[0])
    await client.close()
    emitter = AsyncEmitter(redis_url=redis_url, prefix=prefix)
    try:
        for start in range(1, MISSED + 1, 100):
            batch = range(start, min(start + 100, MISSED + 1))
            await emitter.send_many([(UserSelector("una"), {"n": n}) for n in batch])
        # follow() finds the connection closed (1000, by the client) and resumes at once
        streamed = await stream_to(client, bases, emitter, total=2 * MISSED, first=MISSED + 1)
    finally:
        await emitter.aclose()
    streamed.name = f"resume with {MISSED} to replay under a stream"
    streamed.check()
    closed = [outage.describe() for outage in client.outages[1:]]
    assert not closed, f"{len(closed)} closes of a client that reads: {closed}"


async def test_recovery_resume_after_clean_close_replays_what_was_missed(
    start_cluster: StartCluster, recovering: Pool
) -> None:
    cluster = start_cluster(2)
    client = recovering.client("bea")
    first = await client.open(base(cluster[0]))
    assert first.recovered, f"a new session's welcome: {first}"
    await send_numbers(cluster[1], "bea", range(1, 6))
    live = await client.read(5)
    assert numbers(live) == [1, 2, 3, 4, 5]
    assert [seq(m.pos or "") for m in live] == sorted({seq(m.pos or "") for m in live})
    await client.close()
    await send_numbers(cluster[1], "bea", range(6, 26))
    welcome = await client.open(base(cluster[1]))
    assert (welcome.session, welcome.epoch) == (first.session, first.epoch), welcome
    assert welcome.recovered, f"resume after a clean close: {welcome}"
    assert numbers(await client.read(20)) == list(range(6, 26))
    await send_numbers(cluster[0], "bea", [26])
    assert numbers(await client.read(1)) == [26]
    await nothing_more(client)


async def test_recovery_session_of_a_reaped_instance_resumes_with_what_came_since(
    start_cluster: StartCluster, recovering: Pool
) -> None:
    """Its instance killed and reaped (its records gone from Redis: the user counts no
    connection), the session stays resumable: messages sent to the user after the reap,
    when no connection of theirs exists anywhere, are replayed on the resume."""
    cluster = start_cluster(2, **FAST)
    client = recovering.client("rey")
    first = await client.open(base(cluster[0]))
    await send_numbers(cluster[1], "rey", [1, 2])
    assert numbers(await client.read(2)) == [1, 2]
    cluster[0].crash()
    started = time.monotonic()
    while (await cluster[1].call("/query", {"selector": {"user": "rey"}}))["count"]:
        assert time.monotonic() - started < 30, "the dead instance was never reaped"
        await asyncio.sleep(0.2)
    reaped = time.monotonic() - started
    routed = await send_numbers(cluster[1], "rey", [3, 4, 5])
    assert routed == [0, 0, 0], f"routed to a connection after the reap: {routed}"
    welcome = await client.open(base(cluster[1]))
    print(f"\nreaped {reaped:.2f} s after the kill; resumed: {welcome}")
    assert (welcome.session, welcome.recovered) == (first.session, True), welcome
    assert numbers(await client.read(3)) == [3, 4, 5]
    await nothing_more(client)


async def test_recovery_messages_keep_their_kind_live_and_replayed(
    start_cluster: StartCluster, recovering: Pool
) -> None:
    """A str is ``d``, a dict or list ``j``, bytes ``b`` (base64), live and replayed; the
    handler's own send has no position."""
    cluster = start_cluster(2)
    sender = cluster[1]
    client = recovering.client("cid")

    async def send_each() -> None:
        assert await sender.send({"user": "cid"}, "plain text") in (0, 1)
        assert await sender.send({"user": "cid"}, {"a": [1, "é"]}) in (0, 1)
        assert await sender.send({"user": "cid"}, [1, 2]) in (0, 1)
        await sender.call("/send_raw?user=cid", b"\x00\xffbin")

    expected = [("d", "plain text"), ("j", {"a": [1, "é"]}), ("j", [1, 2]), ("b", b"\x00\xffbin")]
    await client.open(base(cluster[0]))
    await send_each()
    assert [(m.kind, m.value) for m in await client.read(4)] == expected
    await client.close()
    await send_each()
    welcome = await client.open(base(cluster[1]))
    assert welcome.recovered, welcome
    assert [(m.kind, m.value) for m in await client.read(4)] == expected
    assert client.connection is not None
    await client.connection.send("whoami")
    own = await client.next()
    assert (own.pos, own.kind, own.value["instance"]) == (None, "j", "i1"), own
    await client.close()


async def test_recovery_welcome_end_bounds_the_replay(
    start_cluster: StartCluster, recovering: Pool
) -> None:
    """The welcome's ``end`` (docs/recovery.md): where the history ended at the claim;
    the messages numbered up to it are the replay, later ones are live."""
    cluster = start_cluster(2)
    client = recovering.client("lea")
    await client.open(base(cluster[0]))
    await client.close()
    await send_numbers(cluster[1], "lea", [1, 2, 3])
    welcome = await client.open(base(cluster[1]))
    await send_numbers(cluster[1], "lea", [4])
    got = await client.read(4)
    replay = [int(m.value["n"]) for m in got if seq(m.pos or "") <= seq(welcome.end)]
    assert replay == [1, 2, 3], f"up to end {welcome.end}: {replay} of {numbers(got)}"
    await client.close()


@pytest.mark.parametrize("loss", ["flushall", "restart"])
async def test_recovery_after_redis_lost_its_data_is_not_recovered(
    start_cluster: StartCluster, recovering: Pool, private_redis: RedisServer, loss: str
) -> None:
    """Redis (this test's own server) loses every key, by FLUSHALL or a restart without
    persistence: the resume is told ``recovered: false`` in a new epoch, nothing is
    replayed, and the new session gets what is sent next."""
    cluster = start_cluster(2, url=private_redis.url, **FAST)
    client = recovering.client("dan")
    first = await client.open(base(cluster[0]))
    await send_numbers(cluster[1], "dan", [1, 2, 3])
    assert numbers(await client.read(3)) == [1, 2, 3]
    await client.close()
    await send_numbers(cluster[1], "dan", [4, 5])
    if loss == "flushall":
        async with Redis.from_url(private_redis.url) as admin:
            await admin.flushall()
    else:
        await asyncio.to_thread(private_redis.stop)
        await asyncio.to_thread(private_redis.start)
    welcome = await open_within(client, base(cluster[1]), timeout=20)
    assert not welcome.recovered, f"resume after Redis lost its data ({loss}): {welcome}"
    assert welcome.epoch != first.epoch, f"the epoch stayed {first.epoch} after {loss}"
    replayed = await client.quiet()
    assert not replayed, f"replayed after {loss}: {numbers(replayed)}"
    await send_within(cluster[0], "dan", {"n": 6}, timeout=20)
    assert numbers(await client.read(1, timeout=10)) == [6]
    await client.close()


async def test_recovery_redis_lost_its_data_while_connected_is_not_recovered(
    start_cluster: StartCluster, recovering: Pool, private_redis: RedisServer
) -> None:
    """FLUSHALL (this test's own Redis) while the client is connected, messages sent
    after it, then the connection drops: the resume is told ``recovered: false`` in a
    new epoch (what was sent meanwhile may be lost, but not silently)."""
    cluster = start_cluster(2, url=private_redis.url, **FAST)
    client = recovering.client("dot")
    first = await client.open(base(cluster[0]))
    await send_numbers(cluster[1], "dot", [1, 2, 3])
    assert numbers(await client.read(3)) == [1, 2, 3]
    async with Redis.from_url(private_redis.url) as admin:
        await admin.flushall()
    await send_numbers(cluster[1], "dot", [4, 5, 6])
    meanwhile = await client.quiet(1.0)
    client.drop()
    with pytest.raises(ConnectionClosed):
        await client.next()
    welcome = await open_within(client, base(cluster[1]), timeout=20)
    print(f"\nflushed while connected: {numbers(meanwhile)} arrived live; resume {welcome}")
    assert not welcome.recovered, f"resume after FLUSHALL while connected: {welcome}"
    assert welcome.epoch != first.epoch, f"the epoch stayed {first.epoch} after FLUSHALL"
    await send_within(cluster[0], "dot", {"n": 7}, timeout=20)
    after = numbers(await client.read_until(lambda m: m.value["n"] == 7, timeout=10))
    assert after == sorted(set(after)) and set(after) <= {4, 5, 6, 7}, after
    assert not client.stale, f"stale: {numbers(client.stale)}"
    await client.close()


async def test_recovery_subscriber_cut_while_connected_fills_the_gap_from_history(
    start_cluster: StartCluster, recovering: Pool, private_redis: RedisServer, prefix: str
) -> None:
    """CLIENT KILL TYPE pubsub (this test's own Redis) in the middle of a stream: the
    instances subscribe again, and the connected client gets what their subscribers
    missed from history, before newer messages; nothing is lost or repeated, and a
    client that reads is not closed (its catch-up waits for room in its queue, and a
    burst that fills it after makes it lag behind, reading the history)."""
    cluster = start_cluster(2, url=private_redis.url, **FAST)
    bases = [base(instance) for instance in cluster.instances]
    client = recovering.client("ada")
    await client.open(bases[0])
    killed: list[int] = []

    def cut(sent: int) -> None:
        with redis.Redis.from_url(private_redis.url) as admin:
            killed.append(int(admin.client_kill_filter(_type="pubsub")))

    emitter = AsyncEmitter(redis_url=private_redis.url, prefix=prefix)
    try:
        streamed = await stream_to(client, bases, emitter, during=cut)
    finally:
        await emitter.aclose()
    streamed.name = "subscribers cut while connected"
    print(f"\ncloses: {[outage.describe() for outage in client.outages]}")
    assert killed == [2], f"subscriber connections killed: {killed} (2 instances)"
    closes = [outage.describe() for outage in client.outages]
    assert not closes, f"a client that reads was closed: {closes}"
    streamed.check()


async def test_recovery_redis_restart_while_connected_closes_4410_and_tells_the_resume(
    start_cluster: StartCluster, recovering: Pool, private_redis: RedisServer
) -> None:
    """Redis (this test's own) restarts without persistence while the client is
    connected: once the instance subscribes again its history is gone, so the client is
    closed with 4410, and its resume is told ``recovered: false`` in a new epoch."""
    cluster = start_cluster(2, url=private_redis.url, **FAST)
    client = recovering.client("ned")
    first = await client.open(base(cluster[0]))
    await send_numbers(cluster[1], "ned", [1, 2])
    assert numbers(await client.read(2)) == [1, 2]
    await asyncio.to_thread(private_redis.stop)
    await asyncio.to_thread(private_redis.start)
    code = await client.closed(20.0)
    assert code == HISTORY_LOST, f"close code {code} after the restart"
    welcome = await open_within(client, base(cluster[1]), timeout=20)
    assert not welcome.recovered, f"resume after the restart: {welcome}"
    assert welcome.epoch != first.epoch, f"the epoch stayed {first.epoch} after the restart"
    await send_within(cluster[0], "ned", {"n": 3}, timeout=20)
    assert numbers(await client.read(1, timeout=10)) == [3]


async def test_recovery_slow_client_lags_then_gets_everything_from_history(
    start_cluster: StartCluster, recovering: Pool, redis_url: str, prefix: str
) -> None:
    """A client that does not read while ``SLOW_TOTAL`` large messages come, on
    instances told to drop what does not fit (``WSLB_QUEUE_FULL=drop``) in a small
    queue: nothing is dropped and it is not closed; once its queue is full it lags, and
    gets every message once, in order, from the history, as fast as it reads."""
    cluster = start_cluster(2, WSLB_SEND_QUEUE_SIZE=str(SLOW_QUEUE), WSLB_QUEUE_FULL="drop")
    bases = [base(instance) for instance in cluster.instances]
    client = recovering.client("sid")
    await client.open(bases[0], rcvbuf=SLOW_RCVBUF)
    emitter = AsyncEmitter(redis_url=redis_url, prefix=prefix)
    pad = "x" * SLOW_PAD
    try:
        for start in range(1, SLOW_TOTAL + 1, STREAM_BATCH):
            batch = range(start, min(start + STREAM_BATCH, SLOW_TOTAL + 1))
            await emitter.send_many([(UserSelector("sid"), {"n": n, "pad": pad}) for n in batch])
    finally:
        await emitter.aclose()
    await client.follow(bases, SLOW_TOTAL, timeout=STREAM_TIMEOUT, settled=lambda: True)
    streamed = Streamed("slow client", SLOW_TOTAL, client, await client.quiet(0.5))
    codes = [outage.code for outage in client.outages]
    print(f"\nslow client: close codes {codes}")
    assert codes == [], f"a slow client that reads was closed: {codes}"
    streamed.check()


async def test_recovery_two_resumes_at_once_one_stays_the_other_closed_4409(
    start_cluster: StartCluster, recovering: Pool
) -> None:
    cluster = start_cluster(2)
    origin = recovering.client("eve")
    await origin.open(base(cluster[0]))
    await origin.close()
    one, two = origin.fork(), origin.fork()
    opened = await asyncio.gather(
        one.open(base(cluster[0])), two.open(base(cluster[1])), return_exceptions=True
    )
    for result in opened:  # the loser may be closed before its welcome
        if isinstance(result, BaseException) and not isinstance(result, ConnectionClosed):
            raise result
    codes = await asyncio.gather(one.closed(2.0), two.closed(2.0))
    assert sorted(codes, key=str) == [RESUMED_ELSEWHERE, None], f"close codes {codes}"
    winner, loser = (one, two) if codes[0] is None else (two, one)
    assert winner.welcomes and winner.welcomes[-1].recovered, winner.welcomes
    assert winner.session == origin.session
    await cluster[1].send({"user": "eve"}, {"n": 1})
    assert numbers(await winner.read(1)) == [1]
    await winner.close()


async def test_recovery_resume_elsewhere_closes_the_open_connection_4409(
    start_cluster: StartCluster, recovering: Pool
) -> None:
    """A session resumed while its connection is still open (a half-open connection the
    server has not noticed): the resume wins, the old connection is closed with 4409."""
    cluster = start_cluster(2)
    old = recovering.client("fay")
    await old.open(base(cluster[0]))
    await cluster[1].send({"user": "fay"}, {"n": 1})
    assert numbers(await old.read(1)) == [1]
    new = old.fork()
    welcome = await new.open(base(cluster[1]))
    assert welcome.recovered, welcome
    code = await old.closed(3.0)
    assert code == RESUMED_ELSEWHERE, f"the old connection: close code {code}"
    await cluster[0].send({"user": "fay"}, {"n": 2})
    assert numbers(await new.read(1)) == [2]
    await new.close()


async def test_recovery_retention_exceeded_is_told_not_silent(
    start_cluster: StartCluster, recovering: Pool
) -> None:
    """With ``WSLB_RECOVERY_LENGTH=50``: 30 missed messages are replayed; 500 are not, and
    the resume says so (``recovered: false``); whatever follows is in order, once."""
    cluster = start_cluster(2, WSLB_RECOVERY_LENGTH=str(SHORT_HISTORY))
    client = recovering.client("gus")
    await client.open(base(cluster[0]))
    await client.close()
    await send_numbers(cluster[1], "gus", range(1, 31))
    within = await client.open(base(cluster[1]))
    assert within.recovered, f"30 within the history: {within}"
    assert numbers(await client.read(30)) == list(range(1, 31))
    await client.close()
    beyond = 10 * SHORT_HISTORY
    for start in range(31, 31 + beyond, 100):
        await send_numbers(cluster[1], "gus", range(start, min(start + 100, 31 + beyond)))
    welcome = await client.open(base(cluster[0]))
    assert not welcome.recovered, f"{beyond} missed, history of {SHORT_HISTORY}: {welcome}"
    last = 31 + beyond
    await cluster[1].send({"user": "gus"}, {"n": last})
    after = numbers(await client.read_until(lambda m: m.value["n"] == last))
    print(f"\nretention: welcome {welcome}; then {len(after)} messages: {after[:5]}...")
    assert after == sorted(set(after)) and set(after) <= set(range(31, last + 1)), after
    assert not client.stale, f"stale: {numbers(client.stale)}"
    await client.close()


async def test_recovery_session_expired_is_not_recovered(
    start_cluster: StartCluster, recovering: Pool
) -> None:
    """With ``WSLB_RECOVERY_TTL=2``: a resume within the TTL is recovered; one well
    after it (``EXPIRED_AFTER``) is ``recovered: false``, with a session of its own."""
    cluster = start_cluster(2, WSLB_RECOVERY_TTL=str(SHORT_TTL))
    client = recovering.client("hal")
    first = await client.open(base(cluster[0]))
    await client.close()
    await send_numbers(cluster[1], "hal", [1])
    await asyncio.sleep(WITHIN_TTL)
    within = await client.open(base(cluster[1]))
    assert within.recovered, f"resume {WITHIN_TTL} s after, TTL {SHORT_TTL} s: {within}"
    assert numbers(await client.read(1)) == [1]
    await client.close()
    await send_numbers(cluster[1], "hal", [2])
    await asyncio.sleep(EXPIRED_AFTER)
    welcome = await client.open(base(cluster[1]))
    assert not welcome.recovered, f"resume {EXPIRED_AFTER} s after, TTL {SHORT_TTL} s: {welcome}"
    assert welcome.session != first.session, welcome
    replayed = await client.quiet()
    assert not replayed, f"replayed from an expired session: {numbers(replayed)}"
    await client.close()


@pytest.mark.parametrize("wrong", ["token", "session", "user", "path"])
async def test_recovery_resume_refused_without_the_sessions_token_user_or_path(
    start_cluster: StartCluster, recovering: Pool, wrong: str
) -> None:
    """A resume with another token, an unknown session, as another user or on another
    path of the route is told ``recovered: false``, gets a session of its own and none
    of the missed messages."""
    cluster = start_cluster(2)
    ivy = recovering.client("ivy")
    await ivy.open(base(cluster[0]))
    await ivy.close()
    await send_numbers(cluster[1], "ivy", [1, 2, 3])
    other = ivy.fork()
    frame = other.resume_frame()
    if wrong == "user":
        other.user = "mallory"
    elif wrong == "path":
        other.path = RECOVER_PATH + "/other"
    else:
        frame[wrong] = "x" + frame[wrong]
    welcome = await other.open(base(cluster[1]), frame)
    assert not welcome.recovered, f"a resume with a wrong {wrong}: {welcome}"
    assert welcome.session != ivy.session, f"a wrong {wrong} got the session: {welcome}"
    replayed = await other.quiet()
    assert not replayed, f"a wrong {wrong} got ivy's messages: {numbers(replayed)}"
    await other.close()
    # ivy herself still resumes, and gets them
    welcome = await ivy.open(base(cluster[0]))
    assert welcome.recovered, welcome
    assert numbers(await ivy.read(3)) == [1, 2, 3]
    await ivy.close()


async def test_recovery_first_frame_other_than_resume_closes_1008(
    start_cluster: StartCluster, recovering: Pool
) -> None:
    cluster = start_cluster(1)
    client = recovering.client("jon")
    with pytest.raises(ConnectionClosed):
        await client.open(base(cluster[0]), {"t": "hello"})
    assert client.connection is not None
    assert client.connection.close_code == 1008, client.connection.close_code
