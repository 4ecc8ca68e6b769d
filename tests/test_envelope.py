"""The wire envelope: packing user messages, and encoding/decoding what travels."""

from __future__ import annotations

import json
from typing import Any

import pytest

from quart_wslb.envelope import (
    VERSION,
    Envelope,
    EnvelopeError,
    Frame,
    Kind,
    decode,
    encode,
    head,
    pack,
    to_frame,
)

HEADER_FIELDS = ("v", "origin", "messages")


def header(size: Any = 2, **fields: Any) -> bytes:
    """A header line of one message of ``size`` bytes, with the given fields (of the
    header, or of its message) over valid defaults; ``None`` removes one."""
    message: dict[str, Any] = {"id": "m1", "kind": "text", "targets": ["i1:a"], "size": size}
    data: dict[str, Any] = {"v": VERSION, "origin": "i1"}
    for name, value in fields.items():
        (data if name in HEADER_FIELDS else message)[name] = value
    data.setdefault("messages", [{k: v for k, v in message.items() if v is not None}])
    return json.dumps({k: v for k, v in data.items() if v is not None}).encode()


@pytest.mark.parametrize(
    ("message", "kind", "payload"),
    [
        ("héllo", "text", "héllo".encode()),
        ("", "text", b""),
        (b"\x00\xff", "binary", b"\x00\xff"),
        (bytearray(b"ab"), "binary", b"ab"),
        (memoryview(b"cd"), "binary", b"cd"),
        ({"a": [1, "é"]}, "json", '{"a":[1,"é"]}'.encode()),
        ([1, None, True], "json", b"[1,null,true]"),
        ({}, "json", b"{}"),
    ],
)
def test_pack_encodes_each_kind_once(message: object, kind: Kind, payload: bytes) -> None:
    assert pack(message) == (kind, payload)


@pytest.mark.parametrize("message", [1, 1.5, None, True, {"a"}, ("a",), object()])
def test_pack_rejects_other_types(message: object) -> None:
    with pytest.raises(TypeError, match="must be str, bytes, dict or list"):
        pack(message)


def test_pack_rejects_unserialisable_dict() -> None:
    with pytest.raises(TypeError, match="not JSON serialisable"):
        pack({"when": object()})


def test_pack_rejects_non_string_keys() -> None:
    with pytest.raises(TypeError, match="not JSON serialisable"):
        pack({("a", "b"): 1})


def test_pack_rejects_circular_list() -> None:
    loop: list[object] = []
    loop.append(loop)
    with pytest.raises(TypeError, match="not JSON serialisable"):
        pack(loop)


@pytest.mark.parametrize("number", [float("nan"), float("inf")])
def test_pack_rejects_non_finite_numbers(number: float) -> None:
    with pytest.raises(TypeError):
        pack({"x": number})


@pytest.mark.parametrize(
    ("message", "frame"),
    [("hi", "hi"), (b"\x01", b"\x01"), ({"a": 1}, '{"a":1}'), (["é"], '["é"]')],
)
def test_to_frame_text_for_str_and_json_bytes_for_bytes(message: object, frame: Frame) -> None:
    assert to_frame(message) == frame


def test_to_frame_rejects_other_types() -> None:
    with pytest.raises(TypeError):
        to_frame(3)


@pytest.mark.parametrize(
    ("kind", "frame"),
    [
        ("text", "héllo\nworld\n"),
        ("text", ""),
        ("binary", b"\n\x00\xff{}\n"),
        ("binary", b""),
        ("json", '{"a":"b\\n"}'),
    ],
)
@pytest.mark.parametrize("targets", [[], ["i1:a"], ["i1:a", "i1:b"]])
def test_encode_decode_round_trip(kind: Kind, frame: Frame, targets: list[str]) -> None:
    envelope = Envelope(id="m-é", origin="host-1", kind=kind, targets=targets, frame=frame)
    assert decode(encode(envelope)) == [envelope]


def test_encode_decode_round_trip_with_a_position() -> None:
    envelope = Envelope(id="m", origin="o", kind="text", targets=["i1:a"], frame="x", pos="17-3")
    assert decode(encode(envelope)) == [envelope]
    quick = b'{"v":3,"origin":"o","messages":[{"pos":"17-3","id":"m","kind":"text","size":1,'
    assert decode(quick + b'"targets":[]}]}\nx')[0].pos == "17-3"


def test_encode_decode_round_trip_with_a_send_time() -> None:
    envelope = Envelope(id="m", origin="o", kind="text", targets=["i1:a"], frame="x", sent=17)
    assert decode(encode(envelope)) == [envelope]
    quick = b'{"v":3,"origin":"o","messages":[{"t":17,"id":"m","kind":"text","size":1,'
    assert decode(quick + b'"targets":[]}]}\nx')[0].sent == 17


def test_quick_header_takes_send_times_on_the_fast_path() -> None:
    from quart_wslb.envelope import quick_header

    signed = b'{"v":3,"origin":"o","messages":[{"ts":1,"sel":["Ua"],"sig":"k:ab","t":5,'
    plain = b'{"v":3,"origin":"o","messages":[{"t":5,'
    for start in (signed, plain):
        header = start + b'"id":"m","kind":"text","targets":["i:a"],"size":0}]}'
        assert quick_header(header) is not None, header


@pytest.mark.parametrize(
    "sent", [b"1" + b"0" * 400, b"9007199254740993", b"-1", b"1.5", b'"x"', b"true", b"null"]
)
@pytest.mark.parametrize("signed", [False, True])
def test_decode_ignores_a_send_time_that_is_not_one(sent: bytes, signed: bool) -> None:
    from quart_wslb.envelope import quick_header

    start = b'{"ts":1,"sel":["Ua"],"sig":"k:ab",' if signed else b"{"
    header = b'{"v":3,"origin":"o","messages":[' + start + b'"t":' + sent
    header += b',"id":"m","kind":"text","targets":["i:a"],"size":1}]}'
    quick = quick_header(header)  # on the fast path: a bad t is common to neither
    assert quick is not None and "t" not in quick["messages"][0], header
    [envelope] = decode(header + b"\nx")
    assert envelope.sent is None
    assert envelope.frame == "x"


def test_decode_takes_the_largest_send_time() -> None:
    from quart_wslb.envelope import MAX_SENT

    header = b'{"v":3,"origin":"o","messages":[{"t":%d,' % MAX_SENT
    assert (
        decode(header + b'"id":"m","kind":"text","targets":[],"size":1}]}\nx')[0].sent == MAX_SENT
    )


def test_encode_decode_several_messages_in_order() -> None:
    envelopes = [
        Envelope(id="m1", origin="i0", kind="text", targets=["i1:a"], frame="é\n"),
        Envelope(id="m2", origin="i0", kind="binary", targets=[], frame=b"\n\x00"),
        Envelope(id="m3", origin="i0", kind="join", targets=["i1:a", "i1:b"], frame="room"),
    ]
    assert decode(encode(*envelopes)) == envelopes


def test_encode_needs_one_origin() -> None:
    with pytest.raises(ValueError, match="one origin"):
        encode()
    with pytest.raises(ValueError, match="one origin"):
        encode(Envelope("a", "i0", "text", [], "x"), Envelope("b", "i1", "text", [], "y"))


def test_encode_is_head_targets_size_then_payload() -> None:
    envelope = Envelope(id="m1", origin="i1", kind="binary", targets=["i1:a"], frame=b"\x00")
    raw = encode(envelope)
    assert raw == head("m1", "i1", "binary") + b'["i1:a"],"size":1}]}\n\x00'
    assert json.loads(raw.partition(b"\n")[0]) == {
        "v": VERSION,
        "origin": "i1",
        "messages": [{"id": "m1", "kind": "binary", "targets": ["i1:a"], "size": 1}],
    }


def test_encode_decode_signed_round_trip() -> None:
    envelope = Envelope("m1", "i1", "text", ["i1:a"], "hi", ts=5, sel=["Ua"], sig="k:ab")
    raw = encode(envelope)
    assert raw.startswith(b'{"v":3,"origin":"i1","messages":[{"ts":5,"sel":["Ua"],"sig":"k:ab",')
    assert decode(raw) == [envelope]


def test_head_opens_with_the_signature() -> None:
    start = head("m1", "i1", "join", b'"ts":5,"sel":["Ua"],"sig":"k:ab",')
    [envelope] = decode(start + b'["i1:a"],"size":3}]}\nvip')
    assert (envelope.ts, envelope.sel, envelope.sig, envelope.frame) == (5, ["Ua"], "k:ab", "vip")


def test_envelope_payload_is_utf8_of_text() -> None:
    envelope = Envelope(id="m", origin="o", kind="text", targets=[], frame="é")
    assert envelope.payload == "é".encode()


def test_decode_json_kind_gives_text_frame() -> None:
    [envelope] = decode(header(kind="json", size=7) + b'\n{"a":1}')
    assert envelope.frame == '{"a":1}'


def test_decode_ignores_unknown_header_fields() -> None:
    raw = header(signature="abc", offset={"n": 1}) + b"\nhi"
    assert decode(raw) == [
        Envelope(id="m1", origin="i1", kind="text", targets=["i1:a"], frame="hi")
    ]


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b"", id="empty"),
        pytest.param(header(), id="no-newline"),
        pytest.param(b"not json\nhi", id="bad-json"),
        pytest.param(b"\xff\xfe\nhi", id="header-not-utf8"),
        pytest.param(b"[1, 2]\nhi", id="header-not-object"),
        pytest.param(b"\nhi", id="empty-header"),
        pytest.param(header(v=1) + b"\nhi", id="version-1"),
        pytest.param(header(v=0) + b"\nhi", id="version-0"),
        pytest.param(header(v="2") + b"\nhi", id="version-str"),
        pytest.param(header(v=2.0) + b"\nhi", id="version-float"),
        pytest.param(header(v=True) + b"\nhi", id="version-bool"),
        pytest.param(header(v=None) + b"\nhi", id="missing-version"),
        pytest.param(header(origin=None) + b"\nhi", id="missing-origin"),
        pytest.param(header(origin="") + b"\nhi", id="empty-origin"),
        pytest.param(header(messages=None) + b"\nhi", id="missing-messages"),
        pytest.param(header(messages=[]) + b"\n", id="no-messages"),
        pytest.param(header(messages={"id": "m1"}) + b"\nhi", id="messages-object"),
        pytest.param(header(messages=[1]) + b"\nhi", id="message-int"),
        pytest.param(header(id=None) + b"\nhi", id="missing-id"),
        pytest.param(header(kind=None) + b"\nhi", id="missing-kind"),
        pytest.param(header(targets=None) + b"\nhi", id="missing-targets"),
        pytest.param(header(size=None) + b"\nhi", id="missing-size"),
        pytest.param(header(id="") + b"\nhi", id="empty-id"),
        pytest.param(header(id=7) + b"\nhi", id="id-int"),
        pytest.param(header(kind="xml") + b"\nhi", id="unknown-kind"),
        pytest.param(header(kind=1) + b"\nhi", id="kind-int"),
        pytest.param(header(kind=[]) + b"\nhi", id="kind-list"),
        pytest.param(header(kind={}) + b"\nhi", id="kind-dict"),
        pytest.param(header(targets="i1:a") + b"\nhi", id="targets-str"),
        pytest.param(header(targets=[1]) + b"\nhi", id="target-int"),
        pytest.param(header(targets=[""]) + b"\nhi", id="target-empty"),
        pytest.param(header(size=-1) + b"\nhi", id="size-negative"),
        pytest.param(header(size="2") + b"\nhi", id="size-str"),
        pytest.param(header(size=True) + b"\nhi", id="size-bool"),
        pytest.param(header(size=3) + b"\nhi", id="size-past-the-end"),
        pytest.param(header(size=1) + b"\nhi", id="size-short-of-the-end"),
        pytest.param(header(kind="text") + b"\n\xff\xfe", id="text-not-utf8"),
        pytest.param(header(kind="json", size=1) + b"\n\xc3", id="json-not-utf8"),
    ],
)
def test_decode_rejects_malformed(raw: bytes) -> None:
    with pytest.raises(EnvelopeError):
        decode(raw)


def test_decode_binary_payload_need_not_be_utf8() -> None:
    assert decode(header(kind="binary") + b"\n\xff\xfe")[0].frame == b"\xff\xfe"


def test_envelope_error_is_a_value_error() -> None:
    assert issubclass(EnvelopeError, ValueError)


M = b'{"id":"m","kind":"text","targets":["i:c"],"size":1}'
QUICK_CORPUS = [
    b'{"v":3,"origin":"o","messages":[' + M + b"]}",
    b'{"v":3,"origin":"o","messages":[' + M + b"," + M + b"]}",
    b'{"v":3,"origin":"o","messages":[{"id":"m","kind":"binary","targets":[],"size":0}]}',
    b'{"v":3,"origin":"o","messages":[{"id":"m","kind":"join","targets":["a","b"],'
    b'"size":3,"extra":[1]}],"extra":{}}',
    b'{"v":3,"origin":"o","messages":[{"id":"m","kind":"nope","targets":[],"size":0}]}',
    b'{"v":3,"origin":"o","messages":[{"id":"","kind":"text","targets":[],"size":0}]}',
    b'{"v":3,"origin":"o","messages":[{"id":"' + b"x" * 201 + b'","kind":"text",'
    b'"targets":[],"size":0}]}',
    b'{"v":3,"origin":"o","messages":[{"id":"m","kind":"text","targets":[""],"size":0}]}',
    b'{"v":3,"origin":"o","messages":[{"id":"m","kind":"text","targets":[1],"size":0}]}',
    b'{"v":3,"origin":"o","messages":[{"id":"m","kind":"text","targets":"i:c","size":0}]}',
    b'{"v":3,"origin":"o","messages":[{"id":"m","kind":"text","targets":[]}]}',
    b'{"v":3,"origin":"o","messages":[{"id":5,"kind":"text","targets":[],"size":0}]}',
    b'{"v":3,"origin":"o","messages":[{"id":"m","kind":"text","targets":[],"size":-1}]}',
    b'{"v":3,"origin":"o","messages":[{"id":"m","kind":"text","targets":[],"size":1.0}]}',
    b'{"v":3,"origin":"o","messages":[{"id":"m","kind":"text","targets":[],"size":true}]}',
    b'{"v":3,"origin":"o","messages":[' + M + b",7]}",
    b'{"v":3,"origin":"o","messages":[]}',
    b'{"v":3,"origin":"o","messages":{}}',
    b'{"v":3,"origin":"","messages":[' + M + b"]}",
    b'{"v":3,"messages":[' + M + b"]}",
    b'{"v":true,"origin":"o","messages":[' + M + b"]}",
    b'{"v":2.0,"origin":"o","messages":[' + M + b"]}",
    b'{"v":1,"origin":"o","messages":[' + M + b"]}",
    b' {"v":2,"origin":"o","messages":[' + M + b"]}",
    b'{"v":3,"origin":"o","messages":[' + M + b"]} x",
    b"[1, 2]",
    b"\xff\xfe",
    # Signed entries: ts, sel and sig first (send.lua's order), or anywhere.
    b'{"v":3,"origin":"o","messages":[{"ts":1,"sel":["Ua"],"sig":"k:ab",' + M[1:] + b"]}",
    b'{"v":3,"origin":"o","messages":[{"id":"m","kind":"text","targets":[],"size":0,'
    b'"sig":"k:ab","ts":5,"sel":["S{p}:g:x","Ub","|"]}]}',
    b'{"v":3,"origin":"o","messages":[{"ts":1,"sel":["Ua"],"sig":"k:ab",'
    + M[1:]
    + b","
    + M
    + b"]}",
    b'{"v":3,"origin":"o","messages":[{"ts":1.5,"sel":["Ua"],"sig":"k",' + M[1:] + b"]}",
    b'{"v":3,"origin":"o","messages":[{"ts":true,"sel":["Ua"],"sig":"k",' + M[1:] + b"]}",
    b'{"v":3,"origin":"o","messages":[{"ts":1,"sel":[],"sig":"k",' + M[1:] + b"]}",
    b'{"v":3,"origin":"o","messages":[{"ts":1,"sel":"Ua","sig":"k",' + M[1:] + b"]}",
    b'{"v":3,"origin":"o","messages":[{"ts":1,"sel":[1],"sig":"k",' + M[1:] + b"]}",
    b'{"v":3,"origin":"o","messages":[{"ts":1,"sel":["Ua"],"sig":"",' + M[1:] + b"]}",
    b'{"v":3,"origin":"o","messages":[{"ts":1,"sel":["Ua"],"sig":5,' + M[1:] + b"]}",
    b'{"v":3,"origin":"o","messages":[{"ts":1,"sel":["Ua"],"sig":"'
    + b"k" * 201
    + b'",'
    + M[1:]
    + b"]}",
    b'{"v":3,"origin":"o","messages":[{"ts":1,"sel":["Ua"],"xyz":"k",' + M[1:] + b"]}",
    b'{"v":3,"origin":"o","messages":[{"sig":"k:ab",' + M[1:] + b"]}",
    # Sent by selector: sel instead of targets (signed or not); neither is refused.
    b'{"v":3,"origin":"o","messages":[{"sel":["S{p}:g:x"],"id":"m","kind":"text","size":0}]}',
    b'{"v":3,"origin":"o","messages":[{"ts":1,"sel":["B"],"sig":"k:ab","id":"m",'
    b'"kind":"text","size":0}]}',
    b'{"v":3,"origin":"o","messages":[{"id":"m","kind":"text","size":0}]}',
    b'{"v":3,"origin":"o","messages":[{"id":"m","kind":"text","targets":null,"size":0}]}',
    b'{"v":3,"origin":"o","messages":[{"sel":null,"id":"m","kind":"text","size":0}]}',
    b'{"v":3,"origin":"o","messages":[{"sel":[],"id":"m","kind":"text","size":0}]}',
    b'{"v":3,"origin":"o","messages":[{"sel":["B"],"ts":1,"id":"m","kind":"text","size":0}]}',
    # The shard of a sharded send (sh): a non-negative int, or refused.
    b'{"v":3,"origin":"o","sh":3,"messages":[{"sel":["B"],"id":"m","kind":"text","size":0}]}',
    b'{"v":3,"origin":"o","sh":0,"messages":[{"sel":["B"],"id":"m","kind":"text","size":0}]}',
    b'{"v":3,"origin":"o","sh":-1,"messages":[{"sel":["B"],"id":"m","kind":"text","size":0}]}',
    b'{"v":3,"origin":"o","sh":"1","messages":[{"sel":["B"],"id":"m","kind":"text","size":0}]}',
    b'{"v":3,"origin":"o","sh":true,"messages":[{"sel":["B"],"id":"m","kind":"text","size":0}]}',
    b'{"v":3,"origin":"o","sh":1.0,"messages":[{"sel":["B"],"id":"m","kind":"text","size":0}]}',
    # A recovery position (pos): a short string, or refused.
    b'{"v":3,"origin":"o","messages":[{"pos":"17-3","id":"m","kind":"text","targets":[],"size":0}]}',
    b'{"v":3,"origin":"o","messages":[{"sel":["B"],"pos":"1-1","id":"m","kind":"text","size":0}]}',
    b'{"v":3,"origin":"o","messages":[{"pos":17,"id":"m","kind":"text","targets":[],"size":0}]}',
    b'{"v":3,"origin":"o","messages":[{"pos":"1","id":"m","kind":"text","targets":[],"size":0}]}',
    b'{"v":3,"origin":"o","messages":[{"pos":null,"id":"m","kind":"text","targets":[],"size":0}]}',
    # A send time (t, Unix µs): an int in 0..2**53, or ignored (dropped, never refused).
    b'{"v":3,"origin":"o","messages":[{"t":17,"id":"m","kind":"text","targets":[],"size":0}]}',
    b'{"v":3,"origin":"o","messages":[{"t":9007199254740992,"id":"m","kind":"text",'
    b'"targets":[],"size":0}]}',
    b'{"v":3,"origin":"o","messages":[{"t":9007199254740993,"id":"m","kind":"text",'
    b'"targets":[],"size":0}]}',
    b'{"v":3,"origin":"o","messages":[{"t":1' + b"0" * 400 + b',"id":"m","kind":"text",'
    b'"targets":[],"size":0}]}',
    b'{"v":3,"origin":"o","messages":[{"t":null,"id":"m","kind":"text","targets":[],"size":0}]}',
    b'{"v":3,"origin":"o","messages":[{"t":[],"id":"m","kind":"text","targets":[],"size":0}]}',
    b'{"v":3,"origin":"o","messages":[{"t":"x","id":"m","kind":"nope","targets":[],"size":0}]}',
    b'{"v":3,"origin":"o","messages":[{"ts":1,"sel":["Ua"],"sig":"k:ab","t":-5,' + M[1:] + b"]}",
    b'{"v":3,"origin":"o","messages":[{"t":"x",' + M[1:] + b"," + M + b"]}",
    b'{"v":3,"origin":"o","messages":[{"sel":["B"],"t":0,"id":"m","kind":"text","size":0}]}',
    b'{"v":3,"origin":"o","messages":[{"t":-1,"id":"m","kind":"text","targets":[],"size":0}]}',
    b'{"v":3,"origin":"o","messages":[{"t":1.5,"id":"m","kind":"text","targets":[],"size":0}]}',
    b'{"v":3,"origin":"o","messages":[{"t":"1","id":"m","kind":"text","targets":[],"size":0}]}',
    b'{"v":3,"origin":"o","messages":[{"t":true,"id":"m","kind":"text","targets":[],"size":0}]}',
    # Unhashable kinds: a set lookup would raise TypeError rather than defer.
    b'{"v":3,"origin":"x","messages":[{"id":"a","kind":[],"targets":[],"size":0}]}',
    b'{"v":3,"origin":"x","messages":[{"id":"a","kind":{},"targets":[],"size":0}]}',
]


@pytest.mark.parametrize("header", QUICK_CORPUS)
def test_quick_header_accepts_only_what_the_schema_accepts(header: bytes) -> None:
    from marshmallow import ValidationError

    from quart_wslb.envelope import _SCHEMA, quick_header

    quick = quick_header(header)
    try:
        full = _SCHEMA.loads(header)
    except (ValidationError, ValueError):
        full = None
    if quick is not None:  # the fast path may defer to the schema, never disagree with it
        assert quick == full
    assert (quick is None) >= (full is None)


def test_quick_header_takes_signed_entries_on_the_fast_path() -> None:
    from quart_wslb.envelope import quick_header

    signed = b'{"v":3,"origin":"o","messages":[{"ts":1,"sel":["Ua"],"sig":"k:ab",' + M[1:]
    for header in (signed + b"]}", signed + b"," + M + b"]}"):
        assert quick_header(header) is not None, header


def test_decode_gives_every_message_its_envelopes_shard() -> None:
    entry = b'{"sel":["B"],"id":"m","kind":"text","size":1}'
    raw = b'{"v":3,"origin":"o","sh":2,"messages":[' + entry + b"," + entry + b"]}\nab"
    assert [e.shard for e in decode(raw)] == [2, 2]
    assert [e.shard for e in decode(raw.replace(b'"sh":2,', b""))] == [None, None]
    with pytest.raises(EnvelopeError):
        decode(raw.replace(b'"sh":2', b'"sh":-2'))
