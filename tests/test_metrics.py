"""quart_wslb.metrics: counters, gauges and the latency histogram, through the signals;
then two real Hypercorn instances scraped over HTTP."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from types import FrameType

import fakeredis
import pytest
import redis.asyncio as aioredis
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from quart import Quart

from quart_wslb import UserSelector, WsLoadBalance, local_index, signals
from quart_wslb.keys import Keys
from quart_wslb.metrics import LATENCY_BUCKETS, Metrics
from quart_wslb.signal_sender import SignalSender
from tests.cluster import Clients, Cluster, receive
from tests.support import eventually, fake_client, make_app, make_connection

StartCluster = Callable[..., Cluster]
#: The samples' names, as Prometheus shows them.
ROUTED, DELIVERED = "wslb_messages_routed_total", "wslb_messages_delivered_total"
DROPPED, REJECTED = "wslb_messages_dropped_total", "wslb_envelopes_rejected_total"
LATENCY = "wslb_delivery_latency_seconds"


def metered() -> tuple[WsLoadBalance, Metrics, CollectorRegistry]:
    """An extension (not serving) with metrics in a registry of its own."""
    app = Quart(__name__)
    wslb = WsLoadBalance(app, instance_id="i1", prefix="test-metrics")
    registry = CollectorRegistry()
    return wslb, Metrics(app, registry=registry), registry


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    """A sample's value; 0 when it does not exist."""
    return registry.get_sample_value(name, labels) or 0.0


async def test_metrics_counts_routed_sends_and_their_connections() -> None:
    wslb, _, registry = metered()
    sender = SignalSender(wslb)
    for routed in (3, 0, 2):
        await sender.send(
            signals.message_routed,
            message_id="m",
            selector=UserSelector("a"),
            routed=routed,
            instances=1,
        )
    assert value(registry, ROUTED) == 3
    assert value(registry, "wslb_routed_connections_total") == 5


async def test_metrics_counts_drops_by_reason_and_rejections_apart() -> None:
    wslb, _, registry = metered()
    sender = SignalSender(wslb)
    for reason in ("queue_full", "queue_full", "bad_signature", "malformed", "made-up"):
        await sender.dropped(reason, message_id="m", detail="x")
    assert value(registry, DROPPED, reason="queue_full") == 2
    assert value(registry, DROPPED, reason="bad_signature") == 1
    assert value(registry, DROPPED, reason="other") == 1  # an unknown reason: bounded labels
    assert value(registry, REJECTED, reason="bad_signature") == 1
    assert value(registry, REJECTED, reason="malformed") == 1
    assert value(registry, REJECTED, reason="queue_full") == 0  # a delivery drop, no rejection


async def test_metrics_shows_every_known_reason_from_the_start() -> None:
    _, _, registry = metered()
    assert registry.get_sample_value(DROPPED, {"reason": "gone"}) == 0.0
    assert registry.get_sample_value(REJECTED, {"reason": "unsigned"}) == 0.0
    assert registry.get_sample_value("wslb_subscriber_restarts_total", {"reason": "deaf"}) == 0.0


async def test_metrics_counts_reaped_instances_and_restarts() -> None:
    wslb, _, registry = metered()
    sender = SignalSender(wslb)
    await sender.send(signals.instance_reaped, instance="i9", connections=4)
    await sender.send(signals.subscriber_lost, error=ConnectionError("x"), reason="deaf")
    await sender.send(signals.subscriber_lost, error=ConnectionError("x"), reason="deaf")
    assert value(registry, "wslb_instances_reaped_total") == 1
    assert value(registry, "wslb_reaped_connections_total") == 4
    assert value(registry, "wslb_subscriber_restarts_total", reason="deaf") == 2
    assert value(registry, "wslb_subscriber_restarts_total", reason="error") == 0


async def test_metrics_observes_latency_in_its_buckets_and_skew_as_zero() -> None:
    wslb, _, registry = metered()
    sender = SignalSender(wslb)
    connection = make_connection()
    for latency in (0.003, 0.2, -0.01):
        await sender.send(signals.message_timed, connection=connection, latency=latency)
    assert value(registry, f"{LATENCY}_count") == 3
    assert value(registry, f"{LATENCY}_sum") == pytest.approx(0.203)
    assert value(registry, f"{LATENCY}_bucket", le=str(LATENCY_BUCKETS[0])) == 1  # the skewed
    assert value(registry, f"{LATENCY}_bucket", le="0.005") == 2
    assert value(registry, f"{LATENCY}_bucket", le="0.25") == 3


async def test_metrics_hears_only_its_own_extension() -> None:
    wslb, _, registry = metered()
    other, _, other_registry = metered()
    await SignalSender(other).send(signals.message_delivered, connection=None, frame="x")
    assert value(registry, DELIVERED) == 0
    assert value(other_registry, DELIVERED) == 1


async def test_metrics_disconnect_stops_counting() -> None:
    wslb, metrics, registry = metered()
    sender = SignalSender(wslb)
    await sender.send(signals.message_delivered, connection=None, frame="x")
    metrics.disconnect()
    await sender.send(signals.message_delivered, connection=None, frame="x")
    assert value(registry, DELIVERED) == 1


def test_metrics_needs_the_extension_first() -> None:
    with pytest.raises(RuntimeError, match="WsLoadBalance before its Metrics"):
        Metrics(Quart(__name__), registry=CollectorRegistry())


def test_metrics_refuses_a_second_one_for_an_app() -> None:
    app = Quart(__name__)
    WsLoadBalance(app)
    Metrics(app, registry=CollectorRegistry())
    with pytest.raises(RuntimeError, match="already has Metrics"):
        Metrics(app, registry=CollectorRegistry())


def test_metrics_two_apps_cannot_share_a_registry() -> None:
    """Their names collide: prometheus_client says so, at once."""
    registry = CollectorRegistry()
    first, second = Quart(__name__), Quart(__name__)
    WsLoadBalance(first)
    WsLoadBalance(second)
    Metrics(first, registry=registry)
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        Metrics(second, registry=registry)


async def test_metrics_gauges_read_connections_and_queues_at_scrape_time() -> None:
    wslb, _, registry = metered()
    assert value(registry, "wslb_local_connections") == 0
    assert value(registry, "wslb_send_queue_max_frames") == 0
    one, two = make_connection(id="i1:a"), make_connection(id="i1:b")
    for connection in (one, two):
        wslb._local.add(connection)  # held, with no writer: what is offered stays queued
    for frame in ("x", "y"):
        assert await one.offer(frame, None)
    assert await two.offer("z", None)
    assert value(registry, "wslb_local_connections") == 2
    assert value(registry, "wslb_send_queue_frames") == 3
    assert value(registry, "wslb_send_queue_max_frames") == 2


async def test_metrics_gauges_copy_the_connections_at_once() -> None:
    """A scrape may run in another thread (``start_http_server``), and the event loop's
    thread may then change the connections between any two Python steps of the scrape:
    a profile hook plays that here, adding a connection at each call into the index."""
    wslb, _, registry = metered()
    wslb._local.add(make_connection(id="i1:a"))
    added = iter(range(10))

    def switch(frame: FrameType, event: str, arg: object) -> None:
        if event == "call" and frame.f_globals is vars(local_index):
            for n in added:  # the hook is not profiled: this add is not seen here
                wslb._local.add(make_connection(id=f"i1:x{n}"))
                break

    sys.setprofile(switch)
    try:
        held = value(registry, "wslb_local_connections")
    finally:
        sys.setprofile(None)
    assert 2 <= held <= len(wslb._local)  # what was held at some moment, not an error


async def test_metrics_disconnect_stops_stamping_the_apps_sends(
    fake_server: fakeredis.FakeServer,
) -> None:
    redis = fake_client(fake_server)
    app, wslb = make_app(redis, "i1")
    metrics = Metrics(app, registry=CollectorRegistry())
    try:
        async with app.test_app():
            assert wslb.emitter.timestamps
            metrics.disconnect()
            assert not wslb.emitter.timestamps
        async with app.test_app():  # served again: its new emitter is not stamped either
            assert not wslb.emitter.timestamps
    finally:
        await redis.aclose()


async def test_metrics_response_is_prometheus_text() -> None:
    wslb, metrics, _ = metered()
    await SignalSender(wslb).send(signals.message_delivered, connection=None, frame="x")
    response = metrics.response()
    assert response.content_type == CONTENT_TYPE_LATEST
    text = await response.get_data(as_text=True)
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["wslb_messages_delivered"].samples[0].value == 1


async def test_metrics_stamps_the_apps_sends_and_times_their_delivery(
    fake_server: fakeredis.FakeServer,
) -> None:
    redis = fake_client(fake_server)
    app, wslb = make_app(redis, "i1")
    registry = CollectorRegistry()
    Metrics(app, registry=registry)
    try:
        async with app.test_app() as test_app:
            assert wslb.emitter.timestamps
            async with test_app.test_client().websocket("/ws/red?user=alice") as socket:
                await socket.receive_json()  # the hello: written, not sent, so not timed
                assert await wslb.send(UserSelector("alice"), "hi") == 1
                assert await socket.receive() == "hi"
                await eventually(lambda: value(registry, f"{LATENCY}_count") == 1)
                assert value(registry, DELIVERED) == 2
                assert value(registry, ROUTED) == 1
    finally:
        await redis.aclose()


async def test_metrics_made_while_serving_stamps_the_sends_at_once(
    fake_server: fakeredis.FakeServer,
) -> None:
    redis = fake_client(fake_server)
    app, wslb = make_app(redis, "i1")
    try:
        async with app.test_app():
            assert not wslb.emitter.timestamps
            Metrics(app, registry=CollectorRegistry())
            assert wslb.emitter.timestamps
    finally:
        await redis.aclose()


def _python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=False
    )


@pytest.mark.integration
def test_metrics_not_made_imports_and_listens_to_nothing() -> None:
    """Without Metrics, prometheus_client is never imported and no signal has a
    receiver: the library's senders skip each signal at its first check."""
    done = _python(
        "import sys, quart, quart_wslb\n"
        "quart_wslb.WsLoadBalance(quart.Quart('x'))\n"
        "assert 'prometheus_client' not in sys.modules, 'imported'\n"
        "from quart_wslb import signals\n"
        "heard = [n for n in signals.__all__ if getattr(signals, n).receivers]\n"
        "assert not heard, heard\n"
    )
    assert done.returncode == 0, done.stderr


@pytest.mark.integration
def test_metrics_without_prometheus_client_names_the_extra() -> None:
    done = _python(
        "import sys\nsys.modules['prometheus_client'] = None\nimport quart_wslb.metrics\n"
    )
    assert done.returncode != 0
    assert "pip install 'quart-wslb[metrics]'" in done.stderr


def scrape(port: int) -> dict[str, float]:
    """Every sample of an instance's ``/metrics``, by name and labels."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        if response.headers["content-type"] != CONTENT_TYPE_LATEST:
            raise AssertionError(response.headers["content-type"])
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = json.dumps(sample.labels, sort_keys=True) if sample.labels else ""
            samples[sample.name + labels] = sample.value
    return samples


async def scraped(cluster: Cluster, index: int) -> dict[str, float]:
    return await asyncio.to_thread(scrape, cluster[index].port)


async def until(
    cluster: Cluster, index: int, check: Callable[[dict[str, float]], bool]
) -> dict[str, float]:
    """The scrape of instance ``index`` once ``check`` holds of it (within 10 s): a frame
    is counted right after its write, which the client may see first."""
    async with asyncio.timeout(10):
        while not check(samples := await scraped(cluster, index)):
            await asyncio.sleep(0.05)
    return samples


@pytest.mark.integration
async def test_metrics_of_two_instances_count_a_send_across_them(
    start_cluster: StartCluster, clients: Clients, admin_redis_url: str, prefix: str
) -> None:
    cluster = start_cluster(2, TEST_METRICS="1")
    _, _ = await clients.join(cluster[0], "ann")
    bob, _ = await clients.join(cluster[1], "bob")
    assert await cluster[0].send({"user": "bob"}, "over there") == 1
    assert await receive(bob) == "over there"
    sender = await scraped(cluster, 0)
    holder = await until(cluster, 1, lambda s: s.get(f"{LATENCY}_count") == 1)
    assert sender[ROUTED] == 1 and holder[ROUTED] == 0
    assert sender["wslb_routed_connections_total"] == 1
    assert holder[DELIVERED] == 2, holder  # the hello, then the message
    assert sender[DELIVERED] == 1, sender  # ann's hello only
    assert sender.get(f"{LATENCY}_count") == 0  # hellos are written, not sent: not timed
    assert holder["wslb_local_connections"] == 1
    assert holder["wslb_send_queue_frames"] == 0
    # Garbage on i1's channel: dropped and rejected there, and i1 still delivers.
    async with aioredis.Redis.from_url(admin_redis_url) as admin:
        assert await admin.publish(Keys(prefix).channel("i1"), b"not json\n") == 1
    reason = '{"reason": "malformed"}'
    holder = await until(cluster, 1, lambda s: s.get(REJECTED + reason) == 1)
    assert holder[DROPPED + reason] == 1
    assert await cluster[0].send({"user": "bob"}, "still there") == 1
    assert await receive(bob) == "still there"
    holder = await until(cluster, 1, lambda s: s.get(f"{LATENCY}_count") == 2)
    latency_sum = holder[f"{LATENCY}_sum"]
    assert 0 <= latency_sum < 10, f"{latency_sum:.3f}s for two messages, on one host"
