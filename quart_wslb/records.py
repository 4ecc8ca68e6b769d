"""What the cluster knows of a connection: the records shared by the live connection,
the selectors that match it and the queries that read it back from Redis."""

from __future__ import annotations

import json
from collections.abc import Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Protocol

from .contract import F_CONNECTED_AT, F_GROUPS, F_METADATA, F_PATH, F_USER

__all__ = ("ConnectionInfo", "ConnectionRecord")


class ConnectionInfo(Protocol):
    """What the cluster knows about a connection (live or read from Redis)."""

    @property
    def id(self) -> str:
        """Cluster-unique id, ``<instance>:<token>``."""
        ...

    @property
    def user(self) -> str | None:
        """The user the ``user`` callable named, or ``None``."""
        ...

    @property
    def path(self) -> str:
        """The concrete websocket path, such as ``/ws/red``."""
        ...

    @property
    def instance(self) -> str:
        """The id of the instance that holds the socket."""
        ...

    @property
    def metadata(self) -> Mapping[str, str]:
        """Metadata from the ``metadata`` callable (str -> str)."""
        ...

    @property
    def groups(self) -> AbstractSet[str]:
        """The groups (rooms) it belongs to."""
        ...

    @property
    def connected_at(self) -> float:
        """Unix time at which it was registered."""
        ...


@dataclass(frozen=True, slots=True)
class ConnectionRecord:
    """A connection anywhere in the cluster, as read from Redis by a query."""

    id: str
    user: str | None
    path: str
    instance: str
    metadata: Mapping[str, str]
    groups: frozenset[str]
    connected_at: float

    @classmethod
    def parse(cls, id: str, raw: bytes) -> ConnectionRecord:
        """Read a stored record (``registry.Registry.record`` writes them)."""
        data = json.loads(raw)
        user = data.get(F_USER)
        return cls(
            id=id,
            user=user if isinstance(user, str) else None,
            path=str(data.get(F_PATH, "")),
            instance=id.partition(":")[0],
            metadata=dict(data.get(F_METADATA) or {}),
            # An empty Lua table is encoded as {} whether it was a list or not.
            groups=frozenset(data.get(F_GROUPS) or ()),
            connected_at=float(data.get(F_CONNECTED_AT) or 0.0),
        )
