"""The synchronous Emitter: same results as the async path, from many threads, after fork."""

from __future__ import annotations

import json
import multiprocessing
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import redis

from quart_wslb import (
    Emitter,
    GroupSelector,
    NoInstancesError,
    PathSelector,
    RedisUnavailableError,
    UserSelector,
    sync,
)
from quart_wslb.envelope import decode
from quart_wslb.keys import Keys
from quart_wslb.queries import PAGE
from quart_wslb.testing import RedisServer, free_port


def seed(redis_url: str, prefix: str) -> Keys:
    """Two records, of users ann and bob, on a pretend instance i1."""
    keys = Keys(prefix)
    with redis.Redis.from_url(redis_url) as client:
        for n, user in enumerate(("ann", "bob")):
            cid = f"i1:c{n}"
            record = {"u": user, "p": "/ws", "t": "1.0"}
            client.hset(keys.records("i1"), f"c{n}", json.dumps(record))
            client.hset(keys.users, user, cid)
            client.sadd(keys.path("/ws"), cid)
        client.hset(keys.instances, "i1", json.dumps({"started_at": 1.0}))
    return keys


@pytest.fixture(name="cluster_keys")
def fixture_cluster_keys(redis_url: str, prefix: str) -> Keys:
    """Two records on a pretend instance i1 whose channel a test may listen on."""
    return seed(redis_url, prefix)


def listen(redis_url: str, channel: str) -> tuple[Any, redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    pubsub = client.pubsub()  # type: ignore[no-untyped-call, unused-ignore]  # typed from redis 8
    pubsub.subscribe(channel)
    pubsub.get_message(timeout=1)
    return pubsub, client


@pytest.mark.integration
def test_emitter_send_query_and_membership(
    redis_url: str, prefix: str, cluster_keys: Keys
) -> None:
    pubsub, client = listen(redis_url, cluster_keys.channel("i1"))
    with Emitter(redis_url, prefix=prefix) as emitter:
        assert emitter.send(UserSelector("ann"), {"hi": 1}) == 1
        message = pubsub.get_message(ignore_subscribe_messages=True, timeout=2)
        assert message is not None and message["data"].endswith(b'\n{"hi":1}')
        assert emitter.count() == 2
        assert sorted(emitter.users()) == ["ann", "bob"]
        assert [r.id for r in emitter.connections(UserSelector("bob"))] == ["i1:c1"]
        assert emitter.join(UserSelector("bob"), "team") == 1
        assert emitter.count(GroupSelector("team")) == 1
        assert emitter.leave(UserSelector("bob"), "team") == 1
        assert emitter.count(GroupSelector("team")) == 0
        assert emitter.disconnect(UserSelector("ann"), 4000, "bye") == 1
        assert emitter.resolve(UserSelector("ann")) == {"i1": ["i1:c0"]}
    pubsub.close()
    client.close()


@pytest.mark.integration
def test_emitter_timestamps_stamp_its_sends_once_set(
    redis_url: str, prefix: str, cluster_keys: Keys
) -> None:
    pubsub, client = listen(redis_url, cluster_keys.channel("i1"))

    def sent() -> int | None:
        message = pubsub.get_message(ignore_subscribe_messages=True, timeout=2)
        assert message is not None
        return decode(message["data"])[0].sent

    with Emitter(redis_url, prefix=prefix) as emitter:
        assert not emitter.timestamps
        emitter.timestamps = True  # before the first call: its AsyncEmitter is made later
        before = time.time_ns() // 1000
        assert emitter.send(UserSelector("ann"), "hi") == 1
        stamp = sent()
        assert stamp is not None and before <= stamp <= time.time_ns() // 1000
        emitter.timestamps = False  # and once it runs
        assert emitter.send(UserSelector("ann"), "hi") == 1
        assert sent() is None
        emitter.timestamps = True
        assert emitter.send(UserSelector("ann"), "hi") == 1
        assert sent() is not None
    pubsub.close()
    client.close()


@pytest.mark.integration
def test_emitter_many_threads_share_one_pool(
    redis_url: str, prefix: str, cluster_keys: Keys
) -> None:
    results: list[int] = []
    lock = threading.Lock()
    pubsub, client = listen(redis_url, cluster_keys.channel("i1"))  # i1 hears its channel
    with Emitter(redis_url, prefix=prefix) as emitter:

        def work() -> None:
            for _ in range(50):
                routed = emitter.send(UserSelector("bob"), "x")
                with lock:
                    results.append(routed)

        threads = [threading.Thread(target=work) for _ in range(10)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    pubsub.close()
    client.close()
    assert results == [1] * 500


def _send_in_child(redis_url: str, prefix: str, out: multiprocessing.Queue[int]) -> None:
    out.put(EMITTER_BEFORE_FORK[0].send(UserSelector("ann"), "from the child"))


EMITTER_BEFORE_FORK: list[Emitter] = []


@pytest.mark.integration
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # fork with threads (3.12+)
def test_emitter_works_in_a_forked_child(redis_url: str, prefix: str, cluster_keys: Keys) -> None:
    pubsub, client = listen(redis_url, cluster_keys.channel("i1"))
    emitter = Emitter(redis_url, prefix=prefix)
    assert emitter.send(UserSelector("ann"), "parent") == 1  # the loop thread exists now
    EMITTER_BEFORE_FORK[:] = [emitter]
    context = multiprocessing.get_context("fork")
    out: multiprocessing.Queue[int] = context.Queue()
    child = context.Process(target=_send_in_child, args=(redis_url, prefix, out))
    child.start()
    try:
        assert out.get(timeout=15) == 1
    finally:
        child.join(10)
        if child.is_alive():
            child.kill()
        out.close()
        out.join_thread()
    assert child.exitcode == 0
    assert emitter.send(UserSelector("ann"), "parent again") == 1
    emitter.close()
    pubsub.close()
    client.close()


@pytest.mark.integration
def test_emitter_errors_are_clear(redis_url: str, prefix: str) -> None:
    with pytest.raises(ValueError, match="PREFIX"):
        Emitter(redis_url, prefix="no spaces")
    with Emitter(redis_url, prefix=prefix + "-typo") as emitter:
        with pytest.raises(NoInstancesError):
            emitter.send(UserSelector("x"), "x")
    with Emitter(f"redis://127.0.0.1:{free_port()}/0", timeout=0.5) as emitter:
        started = time.monotonic()
        with pytest.raises(RedisUnavailableError):
            emitter.send(UserSelector("x"), "x")
        took = time.monotonic() - started
        assert took < 2.5, f"an unreachable Redis answered after {took:.2f}s (timeout 0.5s)"


@pytest.mark.parametrize("secret", ["", {}])
def test_emitter_empty_secret_is_an_error_as_in_the_async_emitter(secret: object) -> None:
    """An empty secret is a mistake (a variable that did not expand): say so, rather than
    send unsigned messages that the instances then refuse."""
    with pytest.raises(ValueError):
        Emitter("redis://127.0.0.1:1/0", secret=secret)


@pytest.mark.integration
def test_emitter_threads_beyond_its_pool_wait_for_a_connection(
    private_redis: RedisServer,
) -> None:
    """On a Redis of its own: no other test's clients come or go while it counts."""
    seed(private_redis.url, "pool")
    with redis.Redis.from_url(private_redis.url) as admin:
        with Emitter(private_redis.url, prefix="pool", max_connections=4) as emitter:
            with ThreadPoolExecutor(max_workers=64) as pool:
                counts = list(pool.map(lambda _: emitter.count(UserSelector("bob")), range(300)))
            during = int(admin.info("clients")["connected_clients"]) - 1  # less this one
    assert counts == [1] * 300
    assert during <= 4, f"{during} connections with max_connections=4"


@pytest.mark.integration
def test_emitter_send_many_counts_in_order(
    redis_url: str, prefix: str, cluster_keys: Keys
) -> None:
    pubsub, client = listen(redis_url, cluster_keys.channel("i1"))
    pairs = ((UserSelector("bob" if n % 3 else "nobody"), str(n)) for n in range(1500))
    with Emitter(redis_url, prefix=prefix) as emitter:
        counts = emitter.send_many(pairs)  # any iterable, read in the caller's thread
        with pytest.raises(TypeError):
            emitter.send_many([(UserSelector("bob"), None)])
    assert counts == [1 if n % 3 else 0 for n in range(1500)]
    frames: list[str | bytes] = []
    for _ in range(1500):  # bounded: each read waits at most two seconds
        message = pubsub.get_message(ignore_subscribe_messages=True, timeout=2)
        if message is None:
            break
        frames += [e.frame for e in decode(message["data"])]
    assert frames == [str(n) for n in range(1500) if n % 3]
    pubsub.close()
    client.close()


@pytest.mark.integration
def test_emitter_not_strict_answers_zero_without_instances(redis_url: str, prefix: str) -> None:
    with Emitter(redis_url, prefix=prefix + "-empty", strict=False) as emitter:
        assert emitter.strict is False
        assert emitter.send(UserSelector("x"), "x") == 0
        assert emitter.count() == 0
        assert list(emitter.users()) == []
    with Emitter(redis_url, prefix=prefix + "-empty") as strict:
        with pytest.raises(NoInstancesError):
            strict.count()


@pytest.mark.integration
def test_emitter_users_waits_for_one_page_at_a_time(
    redis_url: str, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pages that match nobody are each one wait of the calling thread, not one wait for
    all of them: every wait is bounded by a page's few Redis steps."""
    keys = Keys(prefix)
    anonymous = 3 * PAGE + 1  # pages of candidates, none with a user
    with redis.Redis.from_url(redis_url) as client:
        records = {f"c{n}": json.dumps({"p": "/ws", "t": "1.0"}) for n in range(anonymous)}
        client.hset(keys.records("i1"), mapping=records)
        client.sadd(keys.path("/ws"), *(f"i1:c{n}" for n in range(anonymous)))
        client.hset(keys.instances, "i1", json.dumps({"started_at": 1.0}))
    waits = []
    result = sync._result

    def counted(future: Any, timeout: float) -> Any:
        waits.append(timeout)
        return result(future, timeout)

    monkeypatch.setattr(sync, "_result", counted)
    with Emitter(redis_url, prefix=prefix) as emitter:
        assert list(emitter.users(PathSelector("/ws"))) == []
    # SSCAN's COUNT is a hint: about 500 ids a page, so three or four pages, and the end.
    assert len(waits) >= 3, f"{len(waits)} waits for {anonymous} candidates"


@pytest.mark.integration
def test_emitter_instances_lists_the_live_ones(
    redis_url: str, prefix: str, cluster_keys: Keys
) -> None:
    with Emitter(redis_url, prefix=prefix) as emitter:
        assert emitter.instances() == []  # i1 is listed, but has no heartbeat
        with redis.Redis.from_url(redis_url) as client:
            client.set(cluster_keys.heartbeat("i1"), "1")
        (info,) = emitter.instances()
    assert (info.id, info.started_at, info.connections, info.received) == ("i1", 1.0, 2, 0)
