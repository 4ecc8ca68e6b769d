"""The CLI's tables and JSON, from records made here (no Redis)."""

from __future__ import annotations

import json

import pytest

from quart_wslb import ConnectionRecord, InstanceInfo
from quart_wslb.cli.output import (
    CONNECTION_HEADERS,
    INSTANCE_HEADERS,
    connection_json,
    connection_rows,
    duration,
    instance_json,
    instance_rows,
    table,
)

RECORD = ConnectionRecord(
    id="i1:c7",
    user="zoë",
    path="/ws/red",
    instance="i1",
    metadata={"room": "red", "a": "b"},
    groups=frozenset({"vip", "team"}),
    connected_at=86400.0,
)


def test_table_aligns_columns_and_right_aligns_numbers() -> None:
    text = table(("INSTANCE", "CONNECTIONS"), [["a-long-one", "7"], ["b", "1234"]])
    assert text.splitlines() == [
        "INSTANCE    CONNECTIONS",
        "a-long-one            7",
        "b                  1234",
    ]


def test_table_of_no_rows_is_its_headers() -> None:
    assert table(("ID", "USER"), []) == "ID  USER"


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [
        (-3, "0s"),
        (42.9, "42s"),
        (302, "5m02s"),
        (3 * 3600 + 420, "3h07m"),
        (2 * 86400 + 4 * 3600, "2d04h"),
    ],
)
def test_duration_shows_two_largest_units(seconds: float, shown: str) -> None:
    assert duration(seconds) == shown


def test_instance_rows_show_start_uptime_and_counts() -> None:
    rows = instance_rows([InstanceInfo("i1", 86400.0, 3, 12), InstanceInfo("i2", 0.0, 0)], 86460)
    assert rows == [
        ["i1", "1970-01-02 00:00:00", "1m00s", "3", "12"],
        ["i2", "-", "-", "0", "0"],
    ]
    assert len(rows[0]) == len(INSTANCE_HEADERS)
    assert instance_json(InstanceInfo("i1", 1.5, 3, 12, 9.5)) == {
        "id": "i1", "started_at": 1.5, "connections": 3, "received": 12, "counted_at": 9.5,
    }  # fmt: skip


def test_connection_rows_and_json_carry_every_field() -> None:
    (row,) = connection_rows([RECORD])
    assert row == ["i1:c7", "i1", "zoë", "/ws/red", "team,vip", "a=b,room=red",
                   "1970-01-02 00:00:00"]  # fmt: skip
    assert len(row) == len(CONNECTION_HEADERS)
    blank = ConnectionRecord("i1:c8", None, "/", "i1", {}, frozenset(), 0.0)
    assert connection_rows([blank])[0][2:] == ["-", "/", "-", "-", "-"]
    assert json.loads(json.dumps(connection_json(RECORD))) == {
        "id": "i1:c7", "user": "zoë", "path": "/ws/red", "instance": "i1",
        "groups": ["team", "vip"], "metadata": {"a": "b", "room": "red"},
        "connected_at": 86400.0,
    }  # fmt: skip
