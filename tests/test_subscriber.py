"""The subscription reader: RESP parsed straight off the socket, in batches, in order;
anything that is not a message is a confirmation, ignored, or the end of the connection.

These tests feed bytes to a real ``asyncio.StreamReader``. Subscriptions on a real
``redis-server``, through both transports and in both protocols, are tested in
``tests/test_transport.py``."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import cast

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import InvalidResponse, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from quart_wslb.subscriber import (
    PLAIN,
    SHARDED,
    PubSubSubscription,
    StreamSubscription,
    SubscriptionMovedError,
    output_buffer_cuts,
)
from quart_wslb.wire import READ_SIZE
from tests.support import SOON

CHANNELS = ("t:ch:i1", "t:broadcast")
#: A read that finds nothing waits this long.
QUIET = 0.05


def bulk(data: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(data), data)


def array(*items: bytes, push: bool = False) -> bytes:
    return b"%c%d\r\n%s" % (ord(">" if push else "*"), len(items), b"".join(items))


def message(payload: bytes, *, push: bool = False, channel: bytes = b"t:ch:i1") -> bytes:
    return array(bulk(b"message"), bulk(channel), bulk(payload), push=push)


def confirmation(channel: str, count: int, *, push: bool = False) -> bytes:
    return array(bulk(b"subscribe"), bulk(channel.encode()), b":%d\r\n" % count, push=push)


def subscription_of(*chunks: bytes) -> tuple[asyncio.StreamReader, StreamSubscription]:
    """A subscription to ``CHANNELS`` over a stream that already holds ``chunks``."""
    stream = asyncio.StreamReader()
    for chunk in chunks:
        stream.feed_data(chunk)
    return stream, StreamSubscription(stream, CHANNELS)


async def test_stream_subscription_message_split_across_reads() -> None:
    whole = message(b'{"v":1}\nhello')
    stream, subscription = subscription_of(whole[:7])
    assert await subscription.read(QUIET) == []
    stream.feed_data(whole[7:20])
    assert await subscription.read(QUIET) == []
    stream.feed_data(whole[20:] + message(b"next")[:3])
    assert await subscription.read(QUIET) == [b'{"v":1}\nhello']
    stream.feed_data(message(b"next")[3:])
    assert await subscription.read(QUIET) == [b"next"]


@pytest.mark.parametrize("push", [False, True], ids=["resp2", "resp3"])
async def test_stream_subscription_many_messages_in_one_read(push: bool) -> None:
    payloads = [b"m%d\n" % n + b"x" * (n % 50) for n in range(500)]
    _, subscription = subscription_of(b"".join(message(p, push=push) for p in payloads))
    assert await subscription.read(QUIET) == payloads


async def test_stream_subscription_read_takes_at_most_read_size() -> None:
    payloads = [b"%06d" % n + b"y" * 300 for n in range(1000)]  # about 330 KB
    _, subscription = subscription_of(b"".join(message(p) for p in payloads))
    batches: list[list[bytes]] = []
    while sum(map(len, batches)) < len(payloads):
        batches.append(await subscription.read(QUIET))
    assert [p for batch in batches for p in batch] == payloads
    assert len(batches) > 1
    assert max(map(len, batches)) <= READ_SIZE // 300 + 1


async def test_stream_subscription_silence_returns_nothing_after_timeout() -> None:
    _, subscription = subscription_of()
    started = time.monotonic()
    async with asyncio.timeout(SOON):  # it returns, rather than waiting for a message
        assert await subscription.read(QUIET) == []
    took = time.monotonic() - started
    assert took >= QUIET * 0.9, f"a quiet read returned after {took:.3f}s (timeout {QUIET}s)"


@pytest.mark.parametrize("push", [False, True], ids=["resp2", "resp3"])
async def test_stream_subscription_confirm_keeps_messages_that_came_first(push: bool) -> None:
    stream, subscription = subscription_of(
        confirmation(CHANNELS[0], 1, push=push), message(b"early", push=push)
    )
    confirming = asyncio.create_task(subscription.confirm(SOON))
    await asyncio.sleep(QUIET)
    assert not confirming.done()
    stream.feed_data(confirmation(CHANNELS[1], 2, push=push) + message(b"later", push=push))
    await asyncio.wait_for(confirming, SOON)
    assert await subscription.read(QUIET) == [b"early", b"later"]


async def test_stream_subscription_confirm_times_out() -> None:
    _, subscription = subscription_of(confirmation(CHANNELS[0], 1))
    async with asyncio.timeout(SOON):  # it gives up, rather than waiting on
        with pytest.raises(RedisTimeoutError, match="did not confirm"):
            await subscription.confirm(0.1)


async def test_stream_subscription_ignores_unexpected_replies(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, "quart_wslb")
    _, subscription = subscription_of(
        array(bulk(b"pong"), bulk(b"")),
        array(bulk(b"invalidate"), array(bulk(b"key")), push=True),
        b":1\r\n",
        b"+OK\r\n",
        b"#f\r\n",
        array(bulk(b"message"), bulk(b"too short")),
        array(bulk(b"unsubscribe"), bulk(b"t:ch:i1"), b":0\r\n"),
        message(b"wanted"),
    )
    assert await subscription.read(QUIET) == [b"wanted"]
    assert caplog.text.count("subscriber ignored a reply") == 7


async def test_stream_subscription_error_reply_ends_it_after_earlier_messages() -> None:
    _, subscription = subscription_of(
        message(b"before"), b"-NOPERM no permissions\r\n", message(b"after")
    )
    assert await subscription.read(QUIET) == [b"before"]
    with pytest.raises(ResponseError, match="NOPERM"):
        await subscription.read(QUIET)
    with pytest.raises(ResponseError, match="NOPERM"):
        await subscription.read(QUIET)


@pytest.mark.parametrize("push", [False, True], ids=["resp2", "resp3"])
async def test_stream_subscription_sharded_reads_smessages_after_confirmation(push: bool) -> None:
    stream = asyncio.StreamReader()
    subscription = StreamSubscription(stream, CHANNELS, SHARDED)
    stream.feed_data(
        b"".join(
            array(bulk(b"ssubscribe"), bulk(c.encode()), b":1\r\n", push=push) for c in CHANNELS
        )
        + array(bulk(b"smessage"), bulk(b"t:ch:i1"), bulk(b"one"), push=push)
        + message(b"not sharded: ignored", push=push)
    )
    await subscription.confirm(SOON)
    assert await subscription.read(QUIET) == [b"one"]


@pytest.mark.parametrize("push", [False, True], ids=["resp2", "resp3"])
async def test_stream_subscription_server_unsubscribe_ends_it_after_earlier_messages(
    push: bool,
) -> None:
    """Redis unsubscribes a sharded channel whose slot moved: never swallowed."""
    stream = asyncio.StreamReader()
    subscription = StreamSubscription(stream, CHANNELS, SHARDED)
    stream.feed_data(
        array(bulk(b"smessage"), bulk(b"t:ch:i1"), bulk(b"before"), push=push)
        + array(bulk(b"sunsubscribe"), bulk(b"t:ch:i1"), b":0\r\n", push=push)
    )
    assert await subscription.read(QUIET) == [b"before"]
    with pytest.raises(SubscriptionMovedError, match="t:ch:i1"):
        await subscription.read(QUIET)


def smessage(payload: bytes, channel: bytes = b"t:ch:i1") -> bytes:
    return array(bulk(b"smessage"), bulk(channel), bulk(payload))


def sunsubscribe(channel: bytes, left: int) -> bytes:
    return array(bulk(b"sunsubscribe"), bulk(channel), b":%d\r\n" % left)


def sharded_subscription(
    *chunks: bytes, answer: bytes | None = b"", kinds: tuple[bytes, bytes, bytes | None] = SHARDED
) -> tuple[StreamSubscription, list[int]]:
    """A subscription (sharded unless ``kinds`` says) over a stream that holds ``chunks``;
    its unsubscription (counted in the list) brings ``answer`` (None: it sends nothing,
    as a hung Redis)."""
    stream = asyncio.StreamReader()
    for chunk in chunks:
        stream.feed_data(chunk)
    sent: list[int] = []

    async def unsubscribe() -> None:
        sent.append(1)
        if answer is not None:
            stream.feed_data(answer)

    return StreamSubscription(stream, CHANNELS, kinds, unsubscribe), sent


async def test_stream_subscription_drain_hands_out_what_came_before_the_last_unsubscription() -> (
    None
):
    subscription, sent = sharded_subscription(
        smessage(b"unread"),
        answer=smessage(b"in flight")  # Redis answers after what it sent before
        + sunsubscribe(b"t:ch:i1", 1)
        + smessage(b"other channel", b"t:broadcast")
        + sunsubscribe(b"t:broadcast", 0)
        + smessage(b"never: the connection is closed by now"),
    )
    assert await subscription.drain(SOON) == [b"unread", b"in flight", b"other channel"]
    assert sent == [1]


async def test_stream_subscription_drain_after_a_moved_slot_keeps_the_other_channels() -> None:
    subscription, _ = sharded_subscription(
        smessage(b"before") + sunsubscribe(b"t:ch:i1", 1) + smessage(b"after", b"t:broadcast"),
        answer=sunsubscribe(b"t:broadcast", 0),
    )
    assert await subscription.read(QUIET) == [b"before"]
    with pytest.raises(SubscriptionMovedError):
        await subscription.read(QUIET)
    assert await subscription.drain(SOON) == [b"after"]


@pytest.mark.parametrize("push", [False, True], ids=["resp2", "resp3"])
async def test_stream_subscription_drain_of_classic_channels_waits_for_unsubscribe(
    push: bool,
) -> None:
    subscription, _ = sharded_subscription(
        answer=message(b"in flight", push=push)
        + array(bulk(b"unsubscribe"), bulk(CHANNELS[0].encode()), b":1\r\n", push=push)
        + array(bulk(b"unsubscribe"), bulk(CHANNELS[1].encode()), b":0\r\n", push=push),
        kinds=PLAIN,
    )
    assert await subscription.drain(SOON) == [b"in flight"]


async def test_stream_subscription_drain_is_bounded_and_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    subscription, sent = sharded_subscription(smessage(b"unread"), answer=None)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="quart_wslb"):
        assert await subscription.drain(QUIET) == [b"unread"]
    took = time.monotonic() - started
    assert took < SOON, f"the drain took {took:.2f} s"
    assert sent == [1] and "ended early" in caplog.text


async def test_stream_subscription_drain_after_garbage_reads_nothing_more() -> None:
    subscription, sent = sharded_subscription(smessage(b"before") + b"!garbage\r\n")
    assert await subscription.read(QUIET) == [b"before"]
    with pytest.raises(InvalidResponse):
        await subscription.read(QUIET)
    assert await subscription.drain(SOON) == []
    assert sent == []


async def test_stream_subscription_drain_without_unsubscribe_returns_at_once() -> None:
    stream = asyncio.StreamReader()
    stream.feed_data(smessage(b"parsed at the confirmation") + smessage(b"unread"))
    subscription = StreamSubscription(stream, CHANNELS, SHARDED)
    assert await subscription.read(QUIET) == [b"parsed at the confirmation", b"unread"]
    async with asyncio.timeout(SOON):
        assert await subscription.drain(SOON) == []


async def test_stream_subscription_garbage_ends_it_after_earlier_messages() -> None:
    _, subscription = subscription_of(message(b"before") + b"!garbage\r\n" + message(b"after"))
    assert await subscription.read(QUIET) == [b"before"]
    with pytest.raises(InvalidResponse):
        await subscription.read(QUIET)


async def test_stream_subscription_end_of_stream_is_a_lost_connection() -> None:
    stream, subscription = subscription_of(message(b"last"))
    stream.feed_eof()
    assert await subscription.read(QUIET) == [b"last"]
    with pytest.raises(RedisConnectionError, match="closed"):
        await subscription.read(QUIET)


@pytest.mark.parametrize("error", [ConnectionResetError(104, "reset"), TimeoutError(110, "TCP")])
async def test_stream_subscription_socket_error_is_a_lost_connection(error: OSError) -> None:
    """A socket's own timeout (say, TCP keepalive giving up) is not a quiet read."""
    stream, subscription = subscription_of()
    stream.set_exception(error)
    with pytest.raises(RedisConnectionError, match="subscriber connection failed"):
        await subscription.read(QUIET)


async def test_stream_subscription_read_is_cancellable() -> None:
    _, subscription = subscription_of()
    reading = asyncio.create_task(subscription.read(SOON * 10))
    await asyncio.sleep(QUIET)
    reading.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reading
    assert reading.cancelled()


class Info:
    """What ``output_buffer_cuts`` needs of a client: ``info``, answering ``stats``."""

    def __init__(self, stats: dict[str, object], delay: float = 0.0) -> None:
        self.stats = stats
        self.delay = delay

    async def info(self, section: str) -> dict[str, object]:
        await asyncio.sleep(self.delay)
        return self.stats if section == "stats" else {}


async def test_output_buffer_cuts_reads_the_counter_where_redis_has_one() -> None:
    counter = Info({"client_output_buffer_limit_disconnections": 7, "total_connections": 9})
    assert await output_buffer_cuts(cast(Redis, counter)) == 7
    assert await output_buffer_cuts(cast(Redis, Info({"total_connections": 9}))) is None


async def test_output_buffer_cuts_unknown_when_redis_refuses_or_hangs(
    fake_redis: Redis,
) -> None:
    assert await output_buffer_cuts(fake_redis) is None  # fakeredis has no INFO
    started = time.monotonic()
    hanging = Info({"client_output_buffer_limit_disconnections": 1}, delay=SOON * 10)
    assert await output_buffer_cuts(cast(Redis, hanging), timeout=QUIET) is None
    took = time.monotonic() - started
    assert took < SOON, f"gave up on a hanging INFO after {took:.2f}s (timeout {QUIET}s)"


async def test_stream_subscription_read_waits_for_a_split_message_within_timeout() -> None:
    """A read that got part of a message waits for the rest (a drain ends only on a read
    that brings nothing whole)."""
    whole = message(b"x" * 1000)
    stream, subscription = subscription_of(whole[:100])
    asyncio.get_running_loop().call_later(QUIET / 2, stream.feed_data, whole[100:])
    assert await subscription.read(QUIET * 4) == [b"x" * 1000]


async def test_pubsub_subscription_confirm_keeps_messages_that_came_first(
    fake_redis: Redis,
) -> None:
    """The ``PubSub`` reader waits for every confirmation as the socket reader does, and
    hands out first what it read meanwhile."""
    async with fake_redis.pubsub() as pubsub:
        subscription = PubSubSubscription(pubsub, CHANNELS)
        await pubsub.subscribe(CHANNELS[0])
        assert await fake_redis.publish(CHANNELS[0], b"early") == 1
        confirming = asyncio.create_task(subscription.confirm(SOON))
        await asyncio.sleep(QUIET)
        assert not confirming.done()  # the second channel is not confirmed yet
        await pubsub.subscribe(CHANNELS[1])
        assert await fake_redis.publish(CHANNELS[1], b"later") == 1
        await asyncio.wait_for(confirming, SOON)
        assert await subscription.read(QUIET) == [b"early"]
        assert await subscription.read(QUIET) == [b"later"]
