"""What the Python side and the Lua scripts (``quart_wslb/lua``) agree on, in one place.

Every name below is both used here, in Python, and given to every script as a Lua local
of the same name (:data:`LUA`, rendered into a header by :mod:`quart_wslb._lua`), so that
no script spells a key word, an op or a number that Python also spells:

- the **key words**: every registry key is ``<ROOT>:<word>...``, where ``ROOT`` is the
  hash tag ``{prefix}`` (:class:`~quart_wslb.keys.Keys` builds them; the scripts rebuild
  some from a record and learn ``ROOT`` from ``KEYS[1]``, which is always ``<ROOT>:users``);
- the **selector ops** of a compiled program (:class:`~quart_wslb.selectors.Program`);
- the **record fields** of a connection's JSON record;
- :data:`SPILL`, past which a user's ids move from the ``users`` hash to a set;
- the **reply framing** of a batched script (:mod:`quart_wslb.batch`): for each call the
  count of its items, then the items, or :data:`REPLY_ERROR` and an error message;
- :data:`VERSION` of the wire envelope and :data:`LAYOUT` of the keys, and the one check
  that a prefix holds this layout (:func:`check_layout`).

``tests/test_contract.py`` holds both sides to it on a real Redis.
"""

from __future__ import annotations

from .exceptions import WsLoadBalanceError

__all__ = (
    "FIXED_KEYS",
    "LAYOUT",
    "LUA",
    "NO_INSTANCES",
    "REPLY_ERROR",
    "SPILL",
    "SPILLED",
    "VERSION",
    "check_layout",
)

#: The version of the wire envelope (``"v"``): an instance drops envelopes of another.
VERSION = 3
#: The version of this layout of keys and of the wire envelope, stored under the prefix by
#: every instance: one prefix cannot hold two layouts (their instances would not see each
#: other's records, nor read each other's envelopes).
LAYOUT = "5"

# Key words: <ROOT>:<word> or <ROOT>:<word>:<value>.
#: Hash per instance: connection token -> JSON record.
W_RECORDS = "c"
#: Hash: user -> the user's connection ids (``KEYS[1]`` of every script reading records).
W_USERS = "users"
#: Set per user with more than :data:`SPILL` connections.
W_USER_SET = "u"
#: String: the :data:`LAYOUT` of the keys under the prefix.
W_LAYOUT = "layout"
#: Hash: instance id -> JSON record.
W_INSTANCES = "instances"
#: String with a TTL per instance: its heartbeat.
W_HEARTBEAT = "hb"
#: String with a TTL per dead instance: the reaper's lock.
W_REAP = "reap"
#: Index sets of connection ids: by path, by metadata pair, by group.
W_PATH = "p"
W_METADATA = "m"
W_GROUP = "g"
#: What an index set's word is prefixed with to name its holders hash
#: (``<ROOT>:p:/x`` -> ``<ROOT>:ip:/x``).
W_HOLDERS = "i"
#: Channels: ``<base>:ch:<instance>``, ``<base>:bcast``; ``<ROOT>:db<n>`` is the base
#: in database ``n`` > 0.
W_CHANNEL = "ch"
#: Recovery (recovery.py): the shard's history stream, its meta hash (epoch, last
#: sequence number and time, retention), and a session's hash per session id.
W_HISTORY = "h"
W_HISTORY_META = "hm"
W_SESSION = "ss"
W_BROADCAST = "bcast"
W_DB = "db"

# Selector ops (postfix; see selectors.Program).
#: ``S<n>``: members of ``KEYS[n]`` (counting the :data:`FIXED_KEYS`).
OP_SET = "S"
#: ``U<user>``: the user's connections.
OP_USER = "U"
#: ``A``: every connection.
OP_ALL = "A"
#: ``B``: every connection; alone, a broadcast to every instance.
OP_BROADCAST = "B"
#: ``C<id>``: one connection, if it exists.
OP_CONNECTION = "C"
#: ``M<n>`` then ``n`` ids: those that exist.
OP_IDS = "M"
#: ``&`` and ``|``: the top two values, both and either.
OP_AND = "&"
OP_OR = "|"
#: Keys every script call of a program starts with (users, instances): ``S<n>`` ops
#: count from ``FIXED_KEYS + 1``.
FIXED_KEYS = 2

# Fields of a connection's JSON record (registry.Registry.record writes it).
F_USER = "u"
F_PATH = "p"
F_METADATA = "m"
F_GROUPS = "g"
F_CONNECTED_AT = "t"

#: Ids a user's field of the ``users`` hash lists, space-separated, before they move to
#: the user's set; the field then holds :data:`SPILLED` (an id always has a ``:``).
SPILL = 8
SPILLED = "*"

#: A batched script's reply, per call: the count of its items then the items, or this
#: and the call's error message.
REPLY_ERROR = -1
#: What a send's routed count, or a count, is when no instance ever announced itself
#: under the prefix.
NO_INSTANCES = -1
#: A broadcast's "instances reached" item: the count of those that heard it follows.
BROADCAST_REACHED = -1

#: Every constant the scripts get, by its Lua name (the same as here): the key words
#: (``W_``), the ops (``OP_``), the record fields (``F_``) and the numbers above.
LUA: dict[str, str | int] = {
    name: value
    for name, value in dict(globals()).items()
    if name.startswith(("W_", "OP_", "F_"))
    or name
    in (
        "VERSION",
        "FIXED_KEYS",
        "SPILL",
        "SPILLED",
        "REPLY_ERROR",
        "NO_INSTANCES",
        "BROADCAST_REACHED",
    )
}


def check_layout(prefix: str, found: bytes | str | None, expected: str = LAYOUT) -> None:
    """Raise :class:`~quart_wslb.WsLoadBalanceError` if ``found``, the value of the
    prefix's layout key, is not ``expected`` (``None``: not set yet): keys of another
    version's :data:`LAYOUT`, or split over another count of shards
    (:attr:`Keys.layout_value <quart_wslb.keys.Keys.layout_value>`)."""
    if found is None or found in (expected, expected.encode()):
        return
    text = found.decode(errors="replace") if isinstance(found, bytes) else found
    version, _, shards = text.partition("|")
    if version == LAYOUT:
        raise WsLoadBalanceError(
            f"prefix {prefix!r} holds keys split over {shards or 1} shard(s), and this "
            f"instance or emitter uses {expected.partition('|')[2] or 1}: give every "
            "instance and emitter of a prefix the same WSLB_SHARDS"
        )
    raise WsLoadBalanceError(
        f"prefix {prefix!r} holds keys of layout {found!r}, written by another "
        f"version of quart-wslb (this one uses layout {LAYOUT}): give this version a "
        "prefix of its own"
    )
