"""One frame encoded once: byte for byte what wsproto (Hypercorn's encoder) writes."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection as Client
from websockets.asyncio.client import connect
from wsproto.connection import Connection, ConnectionType
from wsproto.events import BytesMessage, TextMessage

from quart_wslb.envelope import Frame
from quart_wslb.outgoing import Outgoing, encode_frame
from tests.cluster import Cluster, Instance

pytestmark = pytest.mark.timeout(10)

LENGTHS = (0, 1, 125, 126, 127, 65535, 65536, 70000)


def wsproto_frame(frame: Frame) -> bytes:
    """What a wsproto server connection with no extension writes for ``frame``."""
    server = Connection(ConnectionType.SERVER)
    event = TextMessage(data=frame) if isinstance(frame, str) else BytesMessage(data=frame)
    return bytes(server.send(event))


@pytest.mark.parametrize("length", LENGTHS)
def test_encode_frame_text_is_wsprotos(length: int) -> None:
    frame = "é" * (length // 2) + "a" * (length % 2)  # `length` UTF-8 bytes
    assert len(frame.encode()) == length
    assert encode_frame(frame) == wsproto_frame(frame)


@pytest.mark.parametrize("length", LENGTHS)
def test_encode_frame_binary_is_wsprotos(length: int) -> None:
    frame = bytes(n % 251 for n in range(length))
    assert encode_frame(frame) == wsproto_frame(frame)


@pytest.mark.parametrize(
    ("length", "header"),
    [(0, b"\x81\x00"), (125, b"\x81\x7d"), (126, b"\x81\x7e\x00\x7e"),
     (65535, b"\x81\x7e\xff\xff"), (65536, b"\x81\x7f\x00\x00\x00\x00\x00\x01\x00\x00")],
)  # fmt: skip
def test_encode_frame_length_forms_follow_rfc6455(length: int, header: bytes) -> None:
    wire = encode_frame("x" * length)
    assert wire[: len(header)] == header
    assert len(wire) == len(header) + length


def test_encode_frame_binary_opcode_and_payload() -> None:
    assert encode_frame(b"\x00\xff") == b"\x82\x02\x00\xff"


def test_outgoing_encodes_once_and_keeps_the_frame() -> None:
    message = Outgoing("héllo")
    assert message.frame == "héllo"
    wire = message.wire
    assert wire == encode_frame("héllo")
    assert message.wire is wire  # the same bytes for every connection


def test_outgoing_repr_shows_the_frame() -> None:
    assert repr(Outgoing("hi")) == "<Outgoing 'hi'>"


async def connect_raw(instance: Instance, user: str, **options: Any) -> tuple[Client, str]:
    """A client of ``/ws/red`` with websockets' ``options``; its connection id."""
    client = await connect(instance.ws(f"/ws/red?user={user}"), **options)
    hello = json.loads(await asyncio.wait_for(client.recv(), 5))
    return client, str(hello["hello"])


@pytest.mark.integration
@pytest.mark.timeout(60)
async def test_frames_arrive_intact_written_encoded_and_through_asgi(
    start_cluster: Callable[..., Cluster],
) -> None:
    """Through Hypercorn, a client without compression gets the frames encoded once;
    one that negotiated permessage-deflate (websockets' default) gets them through the
    ASGI event, compressed by Hypercorn; both get every frame intact, in order."""
    cluster = start_cluster(1)
    plain, plain_id = await connect_raw(cluster[0], "u", compression=None)
    deflated, deflated_id = await connect_raw(cluster[0], "u")
    try:
        assert plain.response is not None and deflated.response is not None
        assert "Sec-WebSocket-Extensions" not in plain.response.headers
        negotiated = deflated.response.headers["Sec-WebSocket-Extensions"]
        assert negotiated.startswith("permessage-deflate"), negotiated
        assert (await cluster[0].stats())["wire"] == [plain_id]
        texts = ["é" * 40, *("t" * n for n in LENGTHS)]
        for text in texts:  # one message to both: a shared frame
            assert await cluster[0].send({"user": "u"}, text) == 2
        for length in LENGTHS:
            await cluster[0].call("/send_raw?user=u", bytes(n % 251 for n in range(length)))
        expected = [*texts, *(bytes(n % 251 for n in range(size)) for size in LENGTHS)]
        for client in (plain, deflated):
            got = [await asyncio.wait_for(client.recv(), 5) for _ in expected]
            assert got == expected
    finally:
        await plain.close()
        await deflated.close()
