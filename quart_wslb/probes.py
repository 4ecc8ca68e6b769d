"""Telling which subscribed channels went deaf: :class:`ProbeTracker`.

A hung Redis (or a hung master of a Redis Cluster) says nothing: a subscription to it
neither brings messages nor fails. What tells is a probe: publish a numbered message on
each subscribed channel now and then and count those that come back.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ("ProbeTracker",)


class ProbeTracker:
    """Which subscribed channels stopped hearing the probes published on them.

    A hung master says nothing: its subscriptions neither get messages nor fail. The
    watchdog publishes a numbered probe on each channel now and then (:meth:`next`),
    the subscriber reports each one it receives (:meth:`heard`); a channel that missed
    ``missed`` probes in a row, or whose probe reached no subscriber, is deaf
    (:meth:`deaf_channels`), and the subscription should be made again. After each
    (re)subscription, :meth:`reset`.
    """

    def __init__(self, channels: Iterable[str], missed: int = 2) -> None:
        if missed < 1:
            raise ValueError("missed must be at least 1")
        self._missed = missed
        self._sent = dict.fromkeys(channels, 0)
        self._seen = dict(self._sent)
        self._unheard: set[str] = set()

    @property
    def channels(self) -> list[str]:
        """The channels tracked."""
        return list(self._sent)

    def next(self, channel: str) -> int:
        """The number of the next probe to publish on ``channel`` (counted as sent)."""
        self._sent[channel] += 1
        return self._sent[channel]

    def published(self, channel: str, receivers: int | None) -> None:
        """What publishing the last probe on ``channel`` returned: Redis's count of
        receivers (``0``: we are not subscribed there: deaf at once), or ``None`` if the
        publish failed (a missed probe, like any other)."""
        if receivers == 0:
            self._unheard.add(channel)

    def heard(self, channel: str, number: int) -> bool:
        """Count probe ``number`` of ``channel`` as received; ``False`` (ignored) for a
        channel not tracked or a number never sent, which would hide misses."""
        if channel not in self._sent or not 0 < number <= self._sent[channel]:
            return False
        self._seen[channel] = max(self._seen[channel], number)
        self._unheard.discard(channel)
        return True

    def missed(self, channel: str) -> int:
        """Probes sent on ``channel`` since the last one received."""
        return self._sent[channel] - self._seen[channel]

    def deaf_channels(self) -> list[str]:
        """The channels that missed ``missed`` probes in a row, or whose last probe
        reached no subscriber."""
        return [c for c in self._sent if self.missed(c) >= self._missed or c in self._unheard]

    def reset(self) -> None:
        """Just (re)subscribed: nothing is missed yet."""
        self._seen = dict(self._sent)
        self._unheard.clear()
