"""Instance heartbeats: a key with a TTL that exists while the instance is alive."""

from __future__ import annotations

import asyncio
import json
import logging
import time

from redis.asyncio import Redis

from .keys import Keys

__all__ = ("Heartbeat",)

log = logging.getLogger("quart_wslb")


class Heartbeat:
    """Announces one instance: ``hb:<id>`` with a TTL, and its entry in ``instances``."""

    def __init__(
        self, redis: Redis, keys: Keys, instance: str, interval: float, ttl: float
    ) -> None:
        self._redis = redis
        self._keys = keys
        self._instance = instance
        self._interval = interval
        self._ttl_ms = int(ttl * 1000)
        self.started_at = time.time()

    async def beat(self) -> None:
        """Refresh the heartbeat key and the instance record in one round trip."""
        record = json.dumps({"started_at": self.started_at})
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.set(self._keys.heartbeat(self._instance), "1", px=self._ttl_ms)
            pipe.hset(self._keys.instances, self._instance, record)
            await pipe.execute()

    async def run(self) -> None:
        """Beat every interval until cancelled; a failed beat is logged and retried."""
        while True:
            try:
                async with asyncio.timeout(self._interval):
                    await self.beat()
            except asyncio.CancelledError:
                raise
            except Exception as error:
                log.warning("heartbeat failed: %r", error)
            await asyncio.sleep(self._interval)

    async def leave(self) -> None:
        """Remove the heartbeat and the instance record (a graceful stop)."""
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.delete(self._keys.heartbeat(self._instance))
            pipe.hdel(self._keys.instances, self._instance)
            await pipe.execute()
