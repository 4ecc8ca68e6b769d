"""How the CLI shows what it read: aligned plain-text tables for people, JSON for
scripts. Pure functions of the records, so that formatting is tested without Redis."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any

from ..instances import InstanceInfo
from ..records import ConnectionRecord

__all__ = (
    "connection_json",
    "connection_rows",
    "duration",
    "instance_json",
    "instance_rows",
    "json_text",
    "table",
    "timestamp",
)

#: Column headers that hold numbers: right-aligned.
_NUMERIC = frozenset({"CONNECTIONS", "RECEIVED", "MSG/S"})


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """``rows`` under ``headers``, in columns as wide as their widest cell, two spaces
    apart; numeric columns right-aligned. No trailing spaces."""
    widths = [len(header) for header in headers]
    for row in rows:
        widths = [max(width, len(cell)) for width, cell in zip(widths, row, strict=True)]
    lines = []
    for row in [list(headers), *rows]:
        cells = [
            cell.rjust(width) if header in _NUMERIC else cell.ljust(width)
            for header, cell, width in zip(headers, row, widths, strict=True)
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def json_text(value: Any) -> str:
    """``value`` as one line of JSON (UTF-8 kept as is)."""
    return json.dumps(value, ensure_ascii=False, sort_keys=True)


def timestamp(unix: float) -> str:
    """A Unix time as ``YYYY-MM-DD HH:MM:SS`` (UTC); ``-`` for 0 (unknown)."""
    if unix <= 0:
        return "-"
    return datetime.fromtimestamp(unix, UTC).strftime("%Y-%m-%d %H:%M:%S")


def duration(seconds: float) -> str:
    """A span as its two largest units: ``42s``, ``5m02s``, ``3h07m``, ``2d04h``."""
    whole = max(0, int(seconds))
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


INSTANCE_HEADERS = ("INSTANCE", "STARTED (UTC)", "UP", "CONNECTIONS", "RECEIVED")


def instance_rows(instances: Sequence[InstanceInfo], now: float | None = None) -> list[list[str]]:
    """One row of :data:`INSTANCE_HEADERS` per instance."""
    now = time.time() if now is None else now
    return [
        [
            info.id,
            timestamp(info.started_at),
            duration(now - info.started_at) if info.started_at > 0 else "-",
            str(info.connections),
            str(info.received),
        ]
        for info in instances
    ]


def instance_json(info: InstanceInfo) -> dict[str, Any]:
    """An instance as a JSON object: its fields."""
    return asdict(info)


CONNECTION_HEADERS = ("ID", "INSTANCE", "USER", "PATH", "GROUPS", "METADATA", "CONNECTED (UTC)")


def connection_rows(records: Sequence[ConnectionRecord]) -> list[list[str]]:
    """One row of :data:`CONNECTION_HEADERS` per connection (its instance opens its id)."""
    return [
        [
            record.id,
            record.instance,
            "-" if record.user is None else record.user,
            record.path,
            ",".join(sorted(record.groups)) or "-",
            ",".join(f"{k}={v}" for k, v in sorted(record.metadata.items())) or "-",
            timestamp(record.connected_at),
        ]
        for record in records
    ]


def connection_json(record: ConnectionRecord) -> dict[str, Any]:
    """A connection record as a JSON object."""
    return {
        "id": record.id,
        "user": record.user,
        "path": record.path,
        "instance": record.instance,
        "groups": sorted(record.groups),
        "metadata": dict(record.metadata),
        "connected_at": record.connected_at,
    }
