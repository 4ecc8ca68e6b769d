"""Prometheus metrics of one instance, from its signals (the ``metrics`` extra).

    pip install "quart-wslb[metrics]"

:class:`Metrics` connects receivers to the extension's signals (:mod:`quart_wslb.signals`)
and counts what they report; the gauges are computed when Prometheus scrapes. Nothing
here runs unless a ``Metrics`` is made: the library sends a signal only when something
listens, so an app without one pays nothing, and importing :mod:`quart_wslb` never
imports ``prometheus_client``. With one, the app's own sends carry their send time
(:attr:`AsyncEmitter.timestamps <quart_wslb.AsyncEmitter.timestamps>`), from which every
instance with metrics measures send-to-deliver latency. ``docs/metrics.md`` describes
each metric and how to serve ``/metrics``.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import suppress

from blinker import NamedSignal
from quart import Quart, Response

from . import signals
from .connection import Connection
from .exceptions import NotStartedError
from .extension import WsLoadBalance

try:
    from prometheus_client import (
        CONTENT_TYPE_LATEST,
        REGISTRY,
        CollectorRegistry,
        Counter,
        Histogram,
        generate_latest,
    )
    from prometheus_client.core import GaugeMetricFamily, Metric
    from prometheus_client.registry import Collector
except ImportError as error:  # pragma: no cover - tested in a subprocess
    raise ImportError(
        "quart_wslb.metrics needs prometheus_client: pip install 'quart-wslb[metrics]'"
    ) from error

__all__ = ("DROP_REASONS", "LATENCY_BUCKETS", "REJECTED", "Metrics")

#: The ``reason`` values of ``message_dropped`` (see :mod:`quart_wslb.signals`); any
#: other is counted as ``"other"``, so the label's values stay few.
DROP_REASONS = frozenset(
    {
        "malformed",
        "error",
        "queue_full",
        "gone",
        "closed",
        "too_large",
        "unsigned",
        "bad_signature",
    }
)
#: The drop reasons that reject what arrived on the channel (it failed the schema or the
#: signature checks), counted again in ``wslb_envelopes_rejected_total``.
REJECTED = frozenset({"malformed", "unsigned", "bad_signature"})
#: The ``reason`` values of ``subscriber_lost``.
LOST_REASONS = frozenset({"closed", "output_buffer_limit", "error", "deaf", "unexpected"})
#: Seconds: the upper bounds of the latency histogram's buckets, from a same-host hop
#: (~0.2 ms) to a client that reads seconds late.
LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)


class Metrics:
    """The Prometheus metrics of ``app``'s :class:`~quart_wslb.WsLoadBalance`.

    Make it after the extension (``Metrics(app)`` or ``Metrics().init_app(app)``). Its
    metrics go to ``registry`` (default: ``prometheus_client.REGISTRY``); each app of
    one process needs a registry of its own, since the names would collide. Serve them
    with :meth:`response` from a route of your choosing.
    """

    def __init__(
        self,
        app: Quart | None = None,
        *,
        registry: CollectorRegistry | None = None,
        buckets: tuple[float, ...] = LATENCY_BUCKETS,
    ) -> None:
        #: Where the metrics are registered.
        self.registry = REGISTRY if registry is None else registry
        self._buckets = buckets
        self._wslb: WsLoadBalance | None = None
        # Whether the app's sends should carry their send time: until disconnect().
        self._stamping = True
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Quart) -> None:
        """Register the metrics and listen to ``app``'s extension; ``RuntimeError`` if it
        has none yet, or has metrics already."""
        wslb = app.extensions.get("wslb")
        if not isinstance(wslb, WsLoadBalance):
            raise RuntimeError("make the app's WsLoadBalance before its Metrics")
        if "wslb_metrics" in app.extensions:
            raise RuntimeError("the app already has Metrics")
        self._wslb = wslb
        self._register()
        self._listen(wslb)
        app.extensions["wslb_metrics"] = self
        # After the extension's own start (registered first), which makes its emitter
        # (again at each start); and now, if it serves already.
        app.before_serving(self._stamp)
        with suppress(NotStartedError):
            wslb.emitter.timestamps = True

    def _register(self) -> None:
        """Make every metric, in :attr:`registry`."""
        registry = self.registry
        self.routed = Counter(
            "wslb_messages_routed",
            "Sends made by this instance (each routed to zero or more connections)",
            registry=registry,
        )
        self.routed_connections = Counter(
            "wslb_routed_connections",
            "Connections this instance's sends were routed to (an upper bound for "
            "compound index selectors)",
            registry=registry,
        )
        self.delivered = Counter(
            "wslb_messages_delivered",
            "Frames written to this instance's clients",
            registry=registry,
        )
        self.dropped = Counter(
            "wslb_messages_dropped",
            "Messages not delivered, by reason (see quart_wslb.signals.message_dropped)",
            ["reason"],
            registry=registry,
        )
        self.rejected = Counter(
            "wslb_envelopes_rejected",
            "What arrived on this instance's channels and was refused: malformed, "
            "unsigned or badly signed (also counted in wslb_messages_dropped)",
            ["reason"],
            registry=registry,
        )
        # Every known label at 0 from the start, so that rate() sees the first one.
        for reason in DROP_REASONS:
            self.dropped.labels(reason)
        for reason in REJECTED:
            self.rejected.labels(reason)
        self.reaped = Counter(
            "wslb_instances_reaped",
            "Dead instances whose records this instance removed",
            registry=registry,
        )
        self.reaped_connections = Counter(
            "wslb_reaped_connections",
            "Connection records removed with the dead instances this instance reaped",
            registry=registry,
        )
        self.restarts = Counter(
            "wslb_subscriber_restarts",
            "Times the subscriber connection was lost and made again, by reason",
            ["reason"],
            registry=registry,
        )
        for reason in LOST_REASONS:
            self.restarts.labels(reason)
        self.latency = Histogram(
            "wslb_delivery_latency_seconds",
            "From a send (the sender's clock) to the write to a client of this instance "
            "(this one's clock), for messages whose sender stamped them",
            buckets=self._buckets,
            registry=registry,
        )
        registry.register(_Gauges(self._connections))

    def _receivers(self) -> list[tuple[NamedSignal, Callable[..., None]]]:
        return [
            (signals.message_routed, self._on_routed),
            (signals.message_delivered, self._on_delivered),
            (signals.message_timed, self._on_timed),
            (signals.message_dropped, self._on_dropped),
            (signals.instance_reaped, self._on_reaped),
            (signals.subscriber_lost, self._on_lost),
        ]

    def _listen(self, wslb: WsLoadBalance) -> None:
        """Connect each receiver for ``wslb`` only; blinker forgets them with it."""
        for signal, receiver in self._receivers():
            signal.connect(receiver, sender=wslb, weak=False)

    def disconnect(self) -> None:
        """Stop counting: disconnect every receiver (the metrics stay registered), and
        turn the app's :attr:`~quart_wslb.AsyncEmitter.timestamps` off, now and at its
        next start, since its sends' times would cost without serving anything here."""
        for signal, receiver in self._receivers():
            signal.disconnect(receiver)
        self._stamping = False
        if self._wslb is not None:
            with suppress(NotStartedError):  # not serving: its next start asks _stamp
                self._wslb.emitter.timestamps = False

    async def _stamp(self) -> None:
        """Have the app's own sends carry their send time (its emitter is made at start),
        unless :meth:`disconnect` was called."""
        if self._stamping:
            self._extension().emitter.timestamps = True

    def _extension(self) -> WsLoadBalance:
        if self._wslb is None:
            raise RuntimeError("Metrics is not bound to an app; call init_app(app)")
        return self._wslb

    def response(self) -> Response:
        """The metrics of :attr:`registry` in Prometheus's text format, as a response
        to return from a route (``docs/metrics.md``)."""
        return Response(generate_latest(self.registry), content_type=CONTENT_TYPE_LATEST)

    # Receivers: plain functions, called inline on the event loop (signals.py).

    def _on_routed(self, sender: object, *, routed: int, **_: object) -> None:
        self.routed.inc()
        if routed > 0:
            self.routed_connections.inc(routed)

    def _on_delivered(self, sender: object, **_: object) -> None:
        self.delivered.inc()

    def _on_timed(self, sender: object, *, latency: float, **_: object) -> None:
        # Clock skew can make it negative: counted as 0, not lost from the count.
        self.latency.observe(max(latency, 0.0))

    def _on_dropped(self, sender: object, *, reason: str, **_: object) -> None:
        label = reason if reason in DROP_REASONS else "other"
        self.dropped.labels(label).inc()
        if label in REJECTED:
            self.rejected.labels(label).inc()

    def _on_reaped(self, sender: object, *, connections: int, **_: object) -> None:
        self.reaped.inc()
        self.reaped_connections.inc(max(connections, 0))

    def _on_lost(self, sender: object, *, reason: str = "unexpected", **_: object) -> None:
        self.restarts.labels(reason if reason in LOST_REASONS else "other").inc()

    def _connections(self) -> list[Connection]:
        # A copy made at once: a scrape may run in another thread (start_http_server)
        # while the event loop adds and removes connections.
        return self._extension().local_connections.snapshot()


#: The gauges: name, help.
GAUGES = (
    ("wslb_local_connections", "Connections this instance holds"),
    ("wslb_send_queue_frames", "Frames queued for this instance's clients"),
    ("wslb_send_queue_max_frames", "Frames queued for this instance's most backed-up client"),
)


class _Gauges(Collector):
    """The gauges, computed at scrape time, in one pass over the connections: nothing
    between scrapes."""

    def __init__(self, connections: Callable[[], list[Connection]]) -> None:
        self._connections = connections

    def describe(self) -> list[Metric]:
        """The gauges' names (the registry checks them for duplicates)."""
        return [GaugeMetricFamily(name, text) for name, text in GAUGES]

    def collect(self) -> list[Metric]:
        depths = [connection.queued for connection in self._connections()]
        values = (len(depths), sum(depths), max(depths, default=0))
        return [
            GaugeMetricFamily(name, text, value=value)
            for (name, text), value in zip(GAUGES, values, strict=True)
        ]
