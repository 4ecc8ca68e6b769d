"""Stream: pages read once, as items (``async for``), as a list (``await``) or as pages."""

from __future__ import annotations

from collections.abc import AsyncIterator

from quart_wslb import Stream


async def pages_of(*pages: list[int]) -> AsyncIterator[list[int]]:
    for page in pages:
        yield page


async def test_stream_iterates_the_items_of_every_page_in_order() -> None:
    assert [n async for n in Stream(pages_of([1, 2], [], [3]))] == [1, 2, 3]


async def test_stream_awaited_collects_a_list() -> None:
    assert await Stream(pages_of([1], [], [2, 3])) == [1, 2, 3]


async def test_stream_pages_keeps_empty_pages() -> None:
    assert [page async for page in Stream(pages_of([1], [], [2])).pages()] == [[1], [], [2]]


async def test_stream_is_read_once() -> None:
    stream = Stream(pages_of([1, 2]))
    assert await stream == [1, 2]
    assert await stream == []
