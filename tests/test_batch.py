"""GroupCommit against a real Redis, through both transports: lone calls go alone,
concurrent ones share script calls and round trips."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from quart_wslb import batch
from quart_wslb.batch import GroupCommit
from quart_wslb.testing import RedisServer
from quart_wslb.transport import ClientTransport, SocketTransport, Transport
from tests.support import eventually, in_use, round_trips

# A batched script (see quart_wslb.batch): after the fixed keys and arguments, each call
# is its key offset, its argument count and its arguments; the reply is flat, each call's
# item count then its items. Each call's reply echoes its first key and argument; a call
# fails on demand, to show errors reach only their caller.
BATCHED = """
local fixed_keys, fixed_args = tonumber(ARGV[1]), tonumber(ARGV[2])
local out, i = {}, 3 + fixed_args
local function put(...)
  for _, item in ipairs({...}) do out[#out + 1] = item end
end
while i <= #ARGV do
  local koff, n = tonumber(ARGV[i]), tonumber(ARGV[i + 1])
  %s
  i = i + 2 + n
end
return out
"""
SCRIPT = (
    BATCHED
    % """
  if ARGV[i + 2] == 'fail' then put(-1, 'ERR asked to')
  else put(2, KEYS[fixed_keys + koff + 1], ARGV[i + 2]) end"""
)
COUNTER = BATCHED % "put(1, redis.call('INCR', KEYS[fixed_keys + koff + 1]))"
#: A counter with the commands of the library's ACL rules (``quart_wslb.acl``).
HASH_COUNTER = BATCHED % "put(1, redis.call('HINCRBY', KEYS[fixed_keys + koff + 1], 'n', 1))"


#: The transports, by name: the ``kind`` parameter of the tests.
KINDS: dict[str, Callable[[aioredis.Redis], Transport]] = {
    "socket": SocketTransport,
    "client": ClientTransport,
}


@pytest.fixture(name="client")
async def fixture_client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    """A client of ``redis_url`` (the ACL user, in ACL runs)."""
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture(name="prefix")
def fixture_root(prefix: str) -> str:
    """What these tests name their keys with: the test prefix's root, ``{prefix}``, as
    the library's keys (the only keys the ACL user reaches, deleted after the test)."""
    return "{" + prefix + "}"


@pytest.fixture(name="kind", params=sorted(KINDS))
def fixture_kind(request: pytest.FixtureRequest) -> str:
    """Which transport the test runs on."""
    kind: str = request.param
    return kind


@pytest.fixture(name="transport")
def fixture_transport(kind: str, client: aioredis.Redis) -> Transport:
    return KINDS[kind](client)


class Counting(GroupCommit):
    """Counts the pipelines it sends."""

    pipelines = 0

    async def _pipeline(self, batch: Any, windows: Any = ()) -> list[Any]:
        self.pipelines += 1
        return await super()._pipeline(batch, windows)


def make(
    transport: Transport,
    redis: aioredis.Redis,
    script: str = SCRIPT,
    timeout: float = 5.0,
    **fixed: Any,
) -> Counting:
    """A group commit of ``script`` (registered on ``redis``) through ``transport``."""
    fixed.setdefault("args", [0, 0])
    return Counting(transport, redis.register_script(script), timeout, **fixed)


def batch_sizes(commit: GroupCommit) -> list[int]:
    """The size of each batch that ``commit`` drains from its queue, as it goes."""
    sizes: list[int] = []
    run = commit._run

    async def spy(batch: Any, windows: Any = ()) -> None:
        sizes.append(len(batch))
        await run(batch, windows)

    commit._run = spy  # type: ignore[method-assign]
    return sizes


@pytest.mark.integration
async def test_group_commit_lone_call_goes_alone(
    transport: Transport, client: aioredis.Redis, prefix: str
) -> None:
    commit = make(transport, client)
    assert await commit([prefix + "k"], ["a"]) == [prefix.encode() + b"k", b"a"]
    assert await commit([prefix + "k"], ["b"]) == [prefix.encode() + b"k", b"b"]
    assert commit.pipelines == 0


@pytest.mark.integration
async def test_group_commit_concurrent_calls_share_pipelines(
    transport: Transport, client: aioredis.Redis, prefix: str
) -> None:
    commit = make(transport, client)
    results = await asyncio.gather(*(commit([prefix], [str(n)]) for n in range(200)))
    assert [r[1] for r in results] == [str(n).encode() for n in range(200)]
    assert 1 <= commit.pipelines <= 3  # one lone call, then the rest together


@pytest.mark.integration
async def test_group_commit_errors_reach_only_their_caller(
    transport: Transport, client: aioredis.Redis, prefix: str
) -> None:
    commit = make(transport, client)
    results = await asyncio.gather(
        *(commit([prefix], ["fail" if n == 7 else str(n)]) for n in range(20)),
        return_exceptions=True,
    )
    assert isinstance(results[7], ResponseError)
    assert all(not isinstance(r, BaseException) for n, r in enumerate(results) if n != 7)


@pytest.mark.integration
async def test_group_commit_reloads_a_flushed_script(
    kind: str, private_redis: RedisServer
) -> None:
    redis = aioredis.Redis.from_url(private_redis.url)
    commit = make(KINDS[kind](redis), redis)
    await commit(["k"], ["warm"])
    await redis.script_flush()  # as after a Redis restart (on a server of our own)
    results = await asyncio.gather(*(commit(["k"], [str(n)]) for n in range(10)))
    assert [r[1] for r in results] == [str(n).encode() for n in range(10)]
    assert commit.pipelines >= 1
    await redis.aclose()


@pytest.mark.integration
async def test_group_commit_survives_a_caller_giving_up(
    transport: Transport, client: aioredis.Redis, prefix: str
) -> None:
    commit = make(transport, client)
    first = asyncio.create_task(commit([prefix], ["1"]))
    quitter = asyncio.create_task(commit([prefix], ["2"]))
    stayer = asyncio.create_task(commit([prefix], ["3"]))
    await asyncio.sleep(0)
    quitter.cancel()
    assert (await first)[1] == b"1"
    assert (await stayer)[1] == b"3"
    assert quitter.cancelled()
    assert (await commit([prefix], ["4"]))[1] == b"4"  # and it is not stuck busy


@pytest.mark.integration
async def test_group_commit_after_a_flush_runs_each_call_once(
    kind: str, private_redis: RedisServer
) -> None:
    """Calls that Redis refused for want of the script run again, and only they do."""
    redis = aioredis.Redis.from_url(private_redis.url)
    commit = make(KINDS[kind](redis), redis, COUNTER)
    assert await commit(["n"], []) == [1]
    await redis.script_flush()
    assert await commit(["n"], []) == [2]  # a lone call
    await redis.script_flush()
    results = await asyncio.gather(*(commit(["n"], []) for _ in range(20)))
    assert sorted(r[0] for r in results) == list(range(3, 23))
    assert await redis.get("n") == b"22"
    await commit.aclose()
    await redis.aclose()


@pytest.mark.integration
async def test_group_commit_loops_of_sends_fill_their_batches(
    transport: Transport, client: aioredis.Redis, prefix: str
) -> None:
    """Callers that send again as soon as they are answered join the next batch, rather
    than each starting a round trip of its own."""
    commit = make(transport, client)
    sizes = batch_sizes(commit)

    async def loop(worker: int) -> None:
        for n in range(10):
            assert (await commit([prefix], [f"{worker}.{n}"]))[1] == f"{worker}.{n}".encode()

    await asyncio.gather(*(loop(w) for w in range(16)))
    assert sum(sizes) == 16 * 10 - 1  # all but the first, lone call
    assert sizes[1:-1] == [16] * (len(sizes) - 2)


@pytest.mark.integration
async def test_group_commit_gives_its_connection_back_when_idle(
    client: aioredis.Redis, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An emitter over a shared client does not keep one of its connections for good
    (only the socket transport holds one between round trips)."""
    monkeypatch.setattr(batch, "IDLE_RELEASE", 0.05)
    commit = make(SocketTransport(client), client)
    await asyncio.gather(*(commit([prefix], [str(n)]) for n in range(10)))
    assert in_use(client.connection_pool) == 1
    await asyncio.sleep(0.2)
    assert not in_use(client.connection_pool)
    assert (await commit([prefix], ["again"]))[1] == b"again"


@pytest.mark.integration
async def test_group_commit_reloads_the_script_on_its_own_connection(
    kind: str, private_redis: RedisServer
) -> None:
    """After a flush, the script is loaded where the calls run: with a pool of one
    connection, held by the group commit, nothing else could load it."""
    pool = aioredis.BlockingConnectionPool.from_url(
        private_redis.url, max_connections=1, timeout=1
    )
    redis = aioredis.Redis(connection_pool=pool)
    commit = make(KINDS[kind](redis), redis)
    assert (await commit(["k"], ["warm"]))[1] == b"warm"
    async with aioredis.Redis.from_url(private_redis.url) as admin:
        await admin.script_flush()
    results = await asyncio.gather(*(commit(["k"], [str(n)]) for n in range(5)))
    assert [r[1] for r in results] == [str(n).encode() for n in range(5)]
    await commit.aclose()
    await redis.aclose()
    await pool.aclose()  # a pool given to the client is not closed with it


@pytest.mark.integration
async def test_group_commit_passes_fixed_keys_and_args_first(
    transport: Transport, client: aioredis.Redis, prefix: str
) -> None:
    fixed = [prefix + "fixed-1", prefix + "fixed-2"]
    commit = make(transport, client, keys=fixed, args=[2, 1, "x"])
    results = await asyncio.gather(*(commit([f"{prefix}{n}"], [str(n)]) for n in range(5)))
    assert results == [[f"{prefix}{n}".encode(), str(n).encode()] for n in range(5)]


@pytest.mark.integration
async def test_group_commit_batch_is_one_script_call(
    transport: Transport, client: aioredis.Redis, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A queue goes out as one EVALSHA, cut at MAX_CALLS calls or MAX_BYTES of
    arguments, and all its script calls share one round trip."""
    monkeypatch.setattr(batch, "MAX_CALLS", 10)
    monkeypatch.setattr(batch, "MAX_BYTES", 1000)
    commit = make(transport, client)
    trips = round_trips(commit)
    results = await asyncio.gather(*(commit([prefix], [str(n)]) for n in range(26)))
    assert [r[1] for r in results] == [str(n).encode() for n in range(26)]
    assert [len(trip) for trip in trips] == [1, 3]  # the lone call, then 10 + 10 + 5 calls
    big = "x" * 600  # two of these pass MAX_BYTES
    trips.clear()
    results = await asyncio.gather(*(commit([prefix], [big, str(n)]) for n in range(4)))
    assert [r[1] for r in results] == [big.encode()] * 4
    assert [len(trip) for trip in trips] == [1, 3]


def test_split_cuts_a_flat_reply_per_call() -> None:
    from redis.exceptions import NoScriptError

    reply = [2, b"a", b"b", -1, b"NOSCRIPT gone", 0, 1, 7]
    first, error, empty, last = batch._split(reply, 4)
    assert (first, empty, last) == ([b"a", b"b"], [], [7])
    assert isinstance(error, NoScriptError)
    for bad in ([2, b"a"], [1, b"a", 1], [b"x"], 5, [-2, 0]):  # [-2, 0] once looped forever
        assert all(isinstance(r, ResponseError) for r in batch._split(bad, 1))


def test_chunks_give_alone_calls_a_script_call_of_their_own() -> None:
    light: batch.Args = ([], ["x"], False)
    heavy: batch.Args = ([], ["y"], True)
    chunks = batch._chunks([light, light, heavy, light, heavy, heavy, light])
    assert [[c[2] for c in chunk] for chunk in chunks] == [
        [False, False],
        [True],
        [False],
        [True],
        [True],
        [False],
    ]


@pytest.mark.integration
async def test_group_commit_leaves_out_a_call_whose_caller_gave_up(
    transport: Transport, client: aioredis.Redis, prefix: str
) -> None:
    """A queued caller that gives up (its own deadline, or cancelled) before its batch
    goes out: its call is never run, so it has no effect. (That the deadline runs from
    each caller's own call: test_emitter's queued send.)"""
    commit = make(transport, client, HASH_COUNTER)
    first = asyncio.create_task(commit([prefix + ":first"], []))
    quitter = asyncio.create_task(commit([prefix + ":quitter"], []))
    stayer = asyncio.create_task(commit([prefix + ":stayer"], []))
    await asyncio.sleep(0)  # the first is in flight, the others queued
    quitter.cancel()
    assert await first == [1] and await stayer == [1]
    assert quitter.cancelled()
    assert await client.hget(prefix + ":quitter", "n") is None
    assert await client.hget(prefix + ":stayer", "n") == b"1"


@pytest.mark.integration
async def test_group_commit_never_sends_a_call_whose_caller_gave_up_while_it_reconnected(
    private_redis: RedisServer,
) -> None:
    """Redis stalls (CLIENT PAUSE): the call in flight times out, which drops its
    connection, so the batch queued behind it has to connect again, and the handshake
    waits for the pause to end. Its caller's deadline passes meanwhile: once Redis is
    back, its call must not run, since its caller was told it failed and may retry.
    (Only on the socket transport: redis-py's pipelines connect after the batch is cut.)"""
    # A handshake that waits for Redis's answer whatever the redis-py release.
    redis = aioredis.Redis.from_url(private_redis.url + "?client_name=batch")
    admin = aioredis.Redis.from_url(private_redis.url)
    commit = make(SocketTransport(redis), redis, COUNTER, timeout=1.0)
    batches = batch_sizes(commit)
    try:
        assert await commit(["warm"], []) == [1]
        # Ends after the queued caller's deadline (0.3 + 1.0 s), before its batch's
        # (1.0 + 1.0 s, the batch going out when the first call times out).
        await admin.client_pause(1650)
        first = asyncio.create_task(commit(["first"], []))
        await eventually(lambda: commit._busy)
        await asyncio.sleep(0.3)  # not a wait for anything: the second caller comes later
        queued = asyncio.create_task(commit(["queued"], []))
        await eventually(lambda: len(commit._queue) == 1)
        with pytest.raises(TimeoutError):
            await first
        with pytest.raises(TimeoutError):
            await queued
        await eventually(lambda: not commit._busy)  # the batch is over: sent or not
        assert batches == [1], f"the queued call was not in a batch of its own: {batches}"
        assert await admin.get("queued") is None, "a call was run after its caller gave up"
        assert await commit(["after"], []) == [1]  # and the connection is sound
    finally:  # the private server goes with the test: no need to unpause it
        await commit.aclose()
        await admin.aclose()
        await redis.aclose()


@pytest.mark.integration
async def test_group_commit_queued_calls_share_one_deadline_timer(
    kind: str, private_redis: RedisServer
) -> None:
    """Queued calls are timed by one timer for the earliest deadline, not one each: a
    call stuck behind a stalled round trip still fails within its own timeout, and the
    answered ones leave the list of deadlines, which stays short."""
    redis = aioredis.Redis.from_url(private_redis.url)
    commit = make(KINDS[kind](redis), redis, timeout=1.0)
    try:
        results = await asyncio.gather(*(commit(["k"], [str(n)]) for n in range(100)))
        assert len(results) == 100
        assert not commit._deadlines, f"{len(commit._deadlines)} answered calls kept"
        await redis.client_pause(3000)
        loop = asyncio.get_running_loop()
        started = loop.time()
        stalled = asyncio.create_task(commit(["k"], ["stalled"]))
        await eventually(lambda: commit._busy)
        queued = [asyncio.create_task(commit(["k"], [str(n)])) for n in range(3)]
        outcomes = await asyncio.gather(stalled, *queued, return_exceptions=True)
        waited = loop.time() - started
        assert all(isinstance(o, TimeoutError) for o in outcomes), outcomes
        assert waited < 1.0 + 1.0, f"the queued calls failed after {waited:.2f}s (timeout 1s)"
        await eventually(lambda: not commit._busy)  # the batch behind them is over too
    finally:  # the private server goes with the test: no need to unpause it
        await commit.aclose()
        await redis.aclose()


@pytest.mark.integration
async def test_group_commit_many_shares_round_trips_with_concurrent_calls(
    transport: Transport, client: aioredis.Redis, prefix: str
) -> None:
    """many() answers in order, an error in its list; its windows of MAX_PIPELINE
    script calls queue behind and share round trips with single calls in flight."""
    commit = make(transport, client)
    calls: list[Any] = [([prefix], ["fail" if n == 5 else str(n)], False) for n in range(3000)]
    singles = [asyncio.create_task(commit([prefix], [f"s{n}"])) for n in range(50)]
    await asyncio.sleep(0)  # the first single is in flight: many() queues behind it
    sent_before = commit.pipelines
    results = await commit.many(calls)
    assert isinstance(results[5], ResponseError)
    assert [r[1] for n, r in enumerate(results) if n != 5] == [
        str(n).encode() for n in range(3000) if n != 5
    ]
    assert [(await s)[1] for s in singles] == [f"s{n}".encode() for n in range(50)]
    windows = -(-3000 // (batch.MAX_CALLS * batch.MAX_PIPELINE))  # 3: ceil
    assert windows <= commit.pipelines - sent_before <= windows + 1, commit.pipelines
    assert await commit.many([]) == []


@pytest.mark.integration
async def test_group_commit_many_lone_windows_go_straight_out(
    transport: Transport, client: aioredis.Redis, prefix: str
) -> None:
    """With nothing else in flight each window is one round trip of its own, of at most
    MAX_PIPELINE script calls; an alone call keeps a script call of its own."""
    commit = make(transport, client)
    trips = round_trips(commit)
    calls: list[Any] = [([prefix], [str(n)], n == 3) for n in range(1100)]
    results = await commit.many(calls)
    assert [r[1] for r in results] == [str(n).encode() for n in range(1100)]
    # 3 before the alone one, it, then 1096 in 9 script calls: 11 in all, 8 + 3.
    assert [len(trip) for trip in trips] == [batch.MAX_PIPELINE, 3]
    assert commit.pipelines == 0  # no queue: the lone path
