"""The Redis key and channel names, all under one prefix.

Registry keys share the hash tag ``{prefix}`` so that one Lua script can read and write
them atomically, on one Redis Cluster slot. Each user-supplied value is the *last*
component of its key and the component before it is a fixed word, so no value can
collide with another kind of key; metadata keys carry the length of the metadata name
so that ``a=b:c`` and ``a:b=c`` stay apart. Values are never used as glob patterns.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ("Keys",)


@dataclass(frozen=True, slots=True)
class Keys:
    """Builds every name under ``prefix`` (validated by the config).

    Pub/sub ignores Redis database numbers, so channel names carry ``db`` (when it is not
    0): two deployments on one server with the same prefix in different databases must
    not hear each other.
    """

    prefix: str
    db: int = 0

    @classmethod
    def of(cls, prefix: str, redis: object) -> Keys:
        """The names for ``prefix`` on the database that a Redis client uses."""
        pool = getattr(redis, "connection_pool", None)
        options = getattr(pool, "connection_kwargs", {})
        return cls(prefix, int(options.get("db") or 0))

    @property
    def _root(self) -> str:
        return "{" + self.prefix + "}"

    @property
    def connections(self) -> str:
        """Hash: connection id -> JSON record."""
        return f"{self._root}:conns"

    @property
    def all(self) -> str:
        """Set: every connection id in the cluster."""
        return f"{self._root}:all"

    @property
    def instances(self) -> str:
        """Hash: instance id -> JSON record (started_at, ...)."""
        return f"{self._root}:instances"

    def instance_connections(self, instance: str) -> str:
        """Set: the connection ids an instance owns (what reaping removes)."""
        return f"{self._root}:i:{instance}"

    def heartbeat(self, instance: str) -> str:
        """String with a TTL: present while the instance is alive."""
        return f"{self._root}:hb:{instance}"

    def reap_lock(self, instance: str) -> str:
        """String with a TTL: held by the survivor that reaps a dead instance."""
        return f"{self._root}:reap:{instance}"

    def user(self, user: str) -> str:
        """Set: connection ids of one user."""
        return f"{self._root}:u:{user}"

    def path(self, path: str) -> str:
        """Set: connection ids on one concrete websocket path."""
        return f"{self._root}:p:{path}"

    def metadata(self, name: str, value: str) -> str:
        """Set: connection ids whose metadata maps ``name`` to ``value``."""
        return f"{self._root}:m:{len(name)}:{name}:{value}"

    def group(self, name: str) -> str:
        """Set: connection ids that joined group ``name``."""
        return f"{self._root}:g:{name}"

    @property
    def presence(self) -> str:
        """Hash: user -> how many connections the user has in the cluster."""
        return f"{self._root}:presence"

    @property
    def channel_base(self) -> str:
        """What every channel name starts with (route.lua builds channels from it)."""
        return self._root if not self.db else f"{self._root}:db{self.db}"

    def channel(self, instance: str) -> str:
        """Pub/sub channel that only ``instance`` subscribes to."""
        return f"{self.channel_base}:ch:{instance}"

    @property
    def broadcast(self) -> str:
        """Pub/sub channel that every instance subscribes to (``AllSelector``)."""
        return f"{self.channel_base}:bcast"
