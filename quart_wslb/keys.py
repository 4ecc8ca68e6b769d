"""The Redis key and channel names, all under one prefix.

Registry keys share the hash tag ``{prefix}`` so that one Lua script can read and write
them atomically, on one Redis Cluster slot. Each user-supplied value is the *last*
component of its key and the component before it is a fixed word, so no value can
collide with another kind of key; metadata keys carry the length of the metadata name
(in UTF-8 bytes, as Lua counts) so that ``a=b:c`` and ``a:b=c`` stay apart. Values are
never used as glob patterns. The words come from :mod:`quart_wslb.contract`, as do
the Lua scripts' (which rebuild some of these names from a record, ``lua/_common.lua``);
``tests/test_contract.py`` holds the two together.
"""

from __future__ import annotations

from dataclasses import dataclass

from .contract import (
    LAYOUT,
    W_BROADCAST,
    W_CHANNEL,
    W_DB,
    W_GROUP,
    W_HEARTBEAT,
    W_HOLDERS,
    W_INSTANCES,
    W_LAYOUT,
    W_METADATA,
    W_PATH,
    W_REAP,
    W_RECORDS,
    W_USER_SET,
    W_USERS,
)

#: ``LAYOUT`` is :data:`quart_wslb.contract.LAYOUT`, here too for older imports.
__all__ = ("LAYOUT", "Keys")


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

    def records(self, instance: str) -> str:
        """Hash: connection token -> JSON record, for the connections ``instance`` owns.

        One hash per instance is also the instance's index: its size is its connection
        count and reaping walks it.
        """
        return f"{self._root}:{W_RECORDS}:{instance}"

    @property
    def users(self) -> str:
        """Hash: user -> the user's connection ids, space-separated, or ``*`` when they
        are in :meth:`user_set`; a user is present while its field exists."""
        return f"{self._root}:{W_USERS}"

    def user_set(self, user: str) -> str:
        """Set: the connection ids of a user with more than a few connections."""
        return f"{self._root}:{W_USER_SET}:{user}"

    @property
    def layout(self) -> str:
        """String: the :data:`LAYOUT` of the keys under this prefix."""
        return f"{self._root}:{W_LAYOUT}"

    @property
    def instances(self) -> str:
        """Hash: instance id -> JSON record (started_at, ...)."""
        return f"{self._root}:{W_INSTANCES}"

    def heartbeat(self, instance: str) -> str:
        """String with a TTL: present while the instance is alive."""
        return f"{self._root}:{W_HEARTBEAT}:{instance}"

    def reap_lock(self, instance: str) -> str:
        """String with a TTL: held by the survivor that reaps a dead instance."""
        return f"{self._root}:{W_REAP}:{instance}"

    def path(self, path: str) -> str:
        """Set: connection ids on one concrete websocket path."""
        return f"{self._root}:{W_PATH}:{path}"

    def metadata(self, name: str, value: str) -> str:
        """Set: connection ids whose metadata maps ``name`` to ``value``."""
        return f"{self._root}:{W_METADATA}:{len(name.encode())}:{name}:{value}"

    def group(self, name: str) -> str:
        """Set: connection ids that joined group ``name``."""
        return f"{self._root}:{W_GROUP}:{name}"

    def holders(self, index: str) -> str:
        """Hash: instance -> how many members of index set ``index`` (a :meth:`path`,
        :meth:`metadata` or :meth:`group` set) it owns; an instance with none has no
        field. ``<root>:<word>:<value>`` has ``<root>:i<word>:<value>``."""
        root = self._root
        if not index.startswith(root + ":"):
            raise ValueError(f"{index!r} is not a key under {root!r}")
        return f"{root}:{W_HOLDERS}{index[len(root) + 1 :]}"

    @property
    def channel_base(self) -> str:
        """What every channel name starts with (send.lua builds channels from it)."""
        return self._root if not self.db else f"{self._root}:{W_DB}{self.db}"

    def channel(self, instance: str) -> str:
        """Pub/sub channel that only ``instance`` subscribes to."""
        return f"{self.channel_base}:{W_CHANNEL}:{instance}"

    @property
    def broadcast(self) -> str:
        """Pub/sub channel that every instance subscribes to (``AllSelector``)."""
        return f"{self.channel_base}:{W_BROADCAST}"
