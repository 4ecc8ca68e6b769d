"""Raw RESP round trips on redis-py's connections: what only :class:`Exchange` has, RESP3
pushes told from replies. What every transport does (replies in order, errors returned,
connections dropped and made again) is tested through both in ``tests/test_transport.py``
(:class:`Exchange` is the socket transport's); the redis-py names they rely on in
``tests/test_compat.py``."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest

from quart_wslb.wire import _read

pytestmark = pytest.mark.timeout(30)


class FakeConnection:
    """What ``_read`` needs of a connection: its stream."""

    def __init__(self, data: bytes) -> None:
        self._reader = asyncio.StreamReader()
        self._reader.feed_data(data)


async def test_read_skips_out_of_band_pushes() -> None:
    """A RESP3 push (client tracking, server notices) is nobody's reply."""
    data = b">2\r\n$10\r\ninvalidate\r\n*0\r\n+OK\r\n>1\r\n$1\r\nx\r\n:7\r\n"
    assert await _read(cast(Any, FakeConnection(data)), 2) == [b"OK", 7]
