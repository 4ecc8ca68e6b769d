"""Reading the registry in bounded pages: the records, and the users, a selector matches.

A query never asks Redis for one reply of unbounded size. A selector's ``cover`` names
its drivers (``selectors.Driver``): index sets, a user's ids, or every instance's hash of
records. Each is scanned a page of candidate ids at a time (``SSCAN``/``HSCAN`` of
``PAGE``), and ``match.lua`` returns the records of a page's candidates that pass the
indexed part of the selector; ``matches()`` then runs here, so a
:class:`~quart_wslb.CustomSelector` is evaluated in Python. Every page is one bounded
read (``timeout`` each), so a query yields a page, possibly empty, at least every few
Redis steps, however few candidates match. With several shards
(:class:`~quart_wslb.keys.Keys`), a driver is scanned in each shard that may hold its
members, and each page is matched in its own shard.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Generator
from typing import Any, Generic, TypeVar, cast

from redis.asyncio import Redis
from redis.commands.core import AsyncScript

from .contract import SPILLED
from .exceptions import redis_deadline
from .keys import Keys
from .records import ConnectionRecord
from .selectors import AllSelector, Program, Selector

__all__ = ("PAGE", "Reader", "Stream")

T = TypeVar("T")

#: Connection ids per page when streaming, and per script call when routing by id.
PAGE = 500


class Stream(Generic[T]):
    """Results read from Redis in bounded pages: ``async for`` them, ``await`` a list,
    or take them a page at a time with :meth:`pages`. Read it once."""

    __slots__ = ("_pages",)

    def __init__(self, pages: AsyncIterator[list[T]]) -> None:
        self._pages = pages

    def pages(self) -> AsyncIterator[list[T]]:
        """The results page by page, each page one bounded read of Redis (``timeout``
        each): a page may be empty when none of its candidates matched."""
        return self._pages

    def __aiter__(self) -> AsyncIterator[T]:
        return self._items()

    async def _items(self) -> AsyncIterator[T]:
        async for page in self._pages:
            for item in page:
                yield item

    def __await__(self) -> Generator[Any, None, list[T]]:
        return self._collect().__await__()

    async def _collect(self) -> list[T]:
        return [item async for page in self._pages for item in page]


class Reader:
    """Pages of the records and users that selectors match (see the module's doc)."""

    def __init__(self, redis: Redis, keys: Keys, timeout: float, match: AsyncScript) -> None:
        self._redis = redis
        self._keys = keys
        self._timeout = timeout
        self._match = match

    async def records(self, selector: Selector) -> AsyncIterator[list[ConnectionRecord]]:
        """The matching records of each page of candidates, each listed once."""
        cover = selector.cover() or AllSelector()
        program = cover.compile(self._keys)
        # Several drivers (an | of selectors) may list one connection twice, and so may
        # SSCAN itself when the set shrinks while it is scanned.
        seen: set[str] = set()
        for kind, value in cover.drivers(self._keys):
            async for view, page in self._pages(kind, value):
                found = []
                for record in await self._records(view, page, program):
                    if record.id not in seen and selector.matches(record):
                        seen.add(record.id)
                        found.append(record)
                yield found

    async def users(self, selector: Selector) -> AsyncIterator[list[str]]:
        """The users first seen in each page: of the ``users`` hash for everyone, else
        of the matching records."""
        seen: set[str] = set()  # HSCAN, like SSCAN, may return an entry twice
        if isinstance(selector, AllSelector):
            pages = self._every_user()
        else:
            pages = _users_of(self.records(selector))
        async for page in pages:
            fresh = [user for user in dict.fromkeys(page) if user not in seen]
            seen.update(fresh)
            yield fresh

    async def _pages(self, kind: str, value: str) -> AsyncIterator[tuple[Keys, list[str]]]:
        """The candidate ids of one driver (see ``selectors.Driver``), in pages, each
        with the names of the shard that holds them."""
        if kind == "set":
            for view in self._keys.views:
                async for page in self._scan(view.move(value)):
                    yield view, page
        elif kind == "user":
            view = self._keys.of_user(value)
            async for page in self._user_ids(view, value):
                yield view, page
        elif kind == "all":
            for view in self._keys.views:
                async for page in self._every_id(view):
                    yield view, page
        else:
            yield self._keys.of_connection(value), [value]

    async def _user_ids(self, view: Keys, user: str) -> AsyncIterator[list[str]]:
        async with redis_deadline(self._timeout, "query"):
            raw = cast(bytes | None, await self._redis.hget(view.users, user))
        if raw == SPILLED.encode():  # a user with many connections: in a set of their own
            async for page in self._scan(view.user_set(user)):
                yield page
            return
        ids = raw.decode().split() if raw else []
        for start in range(0, len(ids), PAGE):
            yield ids[start : start + PAGE]

    async def _every_id(self, view: Keys) -> AsyncIterator[list[str]]:
        """The ids in every announced instance's hash of records in one shard, page by
        page."""
        async with redis_deadline(self._timeout, "query"):
            instances = sorted(await self._redis.hkeys(view.instances))
        for name in instances:
            instance = cast(bytes, name).decode()
            async for page in self._scan(view.records(instance), fields=True):
                yield [f"{instance}:{token}" for token in page]

    async def _every_user(self) -> AsyncIterator[list[str]]:
        """The fields of every shard's ``users`` hash, page by page (a user is in one)."""
        for view in self._keys.views:
            async for page in self._scan(view.users, fields=True):
                yield page

    async def _scan(self, key: str, *, fields: bool = False) -> AsyncIterator[list[str]]:
        """The members of a set, or with ``fields`` the field names of a hash, a page
        (one bounded exchange) at a time."""
        # Values come too with HSCAN: HSCAN NOVALUES needs Redis 7.4.
        scan = self._redis.hscan if fields else self._redis.sscan
        cursor: int | None = None
        while cursor != 0:
            async with redis_deadline(self._timeout, "scan"):
                cursor, page = await scan(key, cursor or 0, count=PAGE)
            if page:
                yield [cast(bytes, name).decode() for name in page]

    async def _records(
        self, view: Keys, ids: list[str], program: Program
    ) -> list[ConnectionRecord]:
        async with redis_deadline(self._timeout, "query"):
            flat: list[bytes] = await self._match(
                keys=[view.users, view.instances, *(view.move(k) for k in program.keys)],
                args=[len(ids), *ids, *program.ops],
            )
        return [
            ConnectionRecord.parse(i.decode(), raw)
            for i, raw in zip(flat[::2], flat[1::2], strict=True)
        ]


async def _users_of(
    pages: AsyncIterator[list[ConnectionRecord]],
) -> AsyncIterator[list[str]]:
    async for records in pages:
        yield [record.user for record in records if record.user is not None]
