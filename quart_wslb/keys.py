"""The Redis key and channel names, all under one prefix.

Registry keys share a hash tag, ``{prefix}``, so that one Lua script can read and write
them atomically, on one Redis Cluster slot. With ``shards`` > 1 (Redis Cluster), the
keys are split over that many hash tags, ``{prefix|0}`` to ``{prefix|<shards - 1>}``
(no prefix has a ``|``; a tag may carry a salt, ``{prefix|3.7}``, that puts its slot in
the shard's own share of the slot space: :func:`shard_tag`): each **shard** is a whole
registry of its own, and each
connection lives in exactly one, its user's (a user's connections share a shard), or
its id's for a connection without a user. Every instance takes part in every shard (a
heartbeat, a channel), so each script still reads and writes one slot, atomically, and
an operation on one connection or one user stays one script call; an operation on an
index (a group, a path, a metadata pair) or on everyone is one call per shard, and its
results add up. :meth:`Keys.views` gives each shard's names. Each user-supplied value is the *last*
component of its key and the component before it is a fixed word, so no value can
collide with another kind of key; metadata keys carry the length of the metadata name
(in UTF-8 bytes, as Lua counts) so that ``a=b:c`` and ``a:b=c`` stay apart. Values are
never used as glob patterns. The words come from :mod:`quart_wslb.contract`, as do
the Lua scripts' (which rebuild some of these names from a record, ``lua/_common.lua``);
``tests/test_contract.py`` holds the two together.
"""

from __future__ import annotations

import secrets
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field

from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

from .contract import (
    LAYOUT,
    W_BROADCAST,
    W_CHANNEL,
    W_DB,
    W_GROUP,
    W_HEARTBEAT,
    W_HISTORY,
    W_HISTORY_META,
    W_HOLDERS,
    W_INSTANCES,
    W_LAYOUT,
    W_METADATA,
    W_PATH,
    W_REAP,
    W_RECORDS,
    W_SESSION,
    W_USER_SET,
    W_USERS,
)

#: ``LAYOUT`` is :data:`quart_wslb.contract.LAYOUT`, here too for older imports.
__all__ = ("LAYOUT", "Keys", "shard_of")

#: The character between the prefix and a shard's number in a sharded hash tag: no
#: prefix contains it, so no shard's keys can be another prefix's.
SHARD_MARK = "|"
#: Most shards: each instance subscribes to two channels per shard.
MAX_SHARDS = 256
#: Shards on a Redis Cluster unless ``WSLB_SHARDS`` says: enough that every master of a
#: small cluster holds a fair part of them (hash tags fall on slots at random), few
#: enough that a send to an index (one script call per shard) stays cheap.
CLUSTER_SHARDS = 16


def shard_tag(prefix: str, shard: int, shards: int) -> str:
    """The hash tag of shard ``shard`` of ``shards``: ``{prefix|shard}``, salted
    (``{prefix|shard.1}``, ``.2``, ...) until its Redis Cluster slot lies in the shard's
    own ``1/shards`` of the slot space. The shards then spread evenly over masters that
    own equal ranges of slots (a new cluster's do), whatever the prefix: with 16 shards
    on 3 masters, 5, 5 and 6, where plain tags may leave one master a sixth of them."""
    name = f"{prefix}{SHARD_MARK}{shard}"
    salt = 0
    while key_slot(name.encode()) * shards // REDIS_CLUSTER_HASH_SLOTS != shard:
        salt += 1  # each try lands in the shard's share with odds 1/shards
        name = f"{prefix}{SHARD_MARK}{shard}.{salt}"
    return "{" + name + "}"


def shard_of(value: str, shards: int) -> int:
    """The shard of a user name or a connection id, of ``shards`` (CRC-32, stable
    across processes and versions)."""
    return zlib.crc32(value.encode()) % shards if shards > 1 else 0


@dataclass(frozen=True, slots=True)
class Keys:
    """Builds every name under ``prefix`` (validated by the config).

    Pub/sub ignores Redis database numbers, so channel names carry ``db`` (when it is not
    0): two deployments on one server with the same prefix in different databases must
    not hear each other.
    """

    prefix: str
    db: int = 0
    #: How many shards the keys are split over (the same for every instance and
    #: emitter of a prefix: the layout marker records it).
    shards: int = 1
    #: The shard whose names this view builds (see :meth:`views`).
    shard: int = 0
    _views: tuple[Keys, ...] = field(default=(), compare=False, repr=False)
    #: The hash tag that opens every name of this shard.
    _root: str = field(default="", init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not 1 <= self.shards <= MAX_SHARDS or not 0 <= self.shard < self.shards:
            raise ValueError(f"shard {self.shard} of {self.shards} (1-{MAX_SHARDS} shards)")
        root = (
            "{" + self.prefix + "}"
            if self.shards == 1
            else shard_tag(self.prefix, self.shard, self.shards)
        )
        object.__setattr__(self, "_root", root)
        if not self._views and self.shard == 0:
            others = [
                Keys(self.prefix, self.db, self.shards, n, (self,)) for n in range(1, self.shards)
            ]
            object.__setattr__(self, "_views", (self, *others))
            for other in others:
                object.__setattr__(other, "_views", self._views)

    @classmethod
    def of(cls, prefix: str, redis: object, shards: int | None = None) -> Keys:
        """The names for ``prefix`` on the database that a Redis client uses, over
        ``shards`` shards; ``None``: one on one Redis, :data:`CLUSTER_SHARDS` on a Redis
        Cluster (a client without a ``connection_pool``)."""
        pool = getattr(redis, "connection_pool", None)
        options = getattr(pool, "connection_kwargs", {})
        if shards is None:
            shards = 1 if pool is not None else CLUSTER_SHARDS
        return cls(prefix, int(options.get("db") or 0), shards)

    @property
    def views(self) -> tuple[Keys, ...]:
        """The names of every shard, in order (just this one when there is one shard)."""
        return self._views

    def view(self, shard: int) -> Keys:
        """The names of shard ``shard``."""
        return self._views[shard]

    def of_user(self, user: str) -> Keys:
        """The names of the shard that holds ``user``'s connections."""
        return self._views[shard_of(user, self.shards)]

    def of_connection(self, id: str) -> Keys:
        """The names of the shard that holds connection ``id`` (:meth:`token` placed a
        user's connections in the user's shard)."""
        return self._views[shard_of(id, self.shards)]

    def split(self, ids: Sequence[str]) -> list[tuple[Keys, list[str]]]:
        """``ids`` (connection ids) by the shard that holds each, the shards in order."""
        if self.shards == 1:
            return [(self, list(ids))]
        found: dict[int, list[str]] = {}
        for id in ids:
            found.setdefault(shard_of(id, self.shards), []).append(id)
        return [(self._views[n], found[n]) for n in sorted(found)]

    def token(self, instance: str, user: str | None, shard: int | None = None) -> str:
        """A new connection token for ``instance`` whose id, ``<instance>:<token>``,
        falls in the shard of ``user``, else in ``shard`` (any shard for neither): random
        tokens are drawn until one does, ``shards`` draws on average."""
        if user is not None:
            shard = shard_of(user, self.shards)
        while True:
            token = secrets.token_urlsafe(12)
            if shard is None or self.shards == 1:
                return token
            if shard_of(f"{instance}:{token}", self.shards) == shard:
                return token

    def move(self, key: str) -> str:
        """``key``, a name of any shard, as this shard names it (a compiled selector
        names shard 0's index sets; each shard's script call gets its own)."""
        other = key[: key.index("}") + 1]
        return key if other == self._root else self._root + key[len(other) :]

    @property
    def layout_value(self) -> str:
        """What the layout marker of every shard holds: :data:`LAYOUT`, and the count of
        shards when there are several."""
        return LAYOUT if self.shards == 1 else f"{LAYOUT}{SHARD_MARK}{self.shards}"

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
    def history(self) -> str:
        """Stream: this shard's messages, for recovery (``<ms>-<seq>`` ids)."""
        return f"{self._root}:{W_HISTORY}"

    @property
    def history_meta(self) -> str:
        """Hash: the history's epoch ``e``, last sequence number ``s`` and time ``m``
        (ms), and retention ``n`` (entries) and ``t`` (ms)."""
        return f"{self._root}:{W_HISTORY_META}"

    def session(self, session: str) -> str:
        """Hash: a recovery session (``recovery.py``), with a TTL."""
        return f"{self._root}:{W_SESSION}:{session}"

    def relative(self, key: str) -> str:
        """``key`` without its hash tag and the colon after it (as history entries
        name index sets)."""
        return key[key.index("}") + 2 :]

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
