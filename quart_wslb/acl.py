"""The least a Redis user needs to run quart-wslb: its keys, its channels, its commands.

``ACL SETUSER <name> on ><password> <rules>`` with :func:`acl_rules` makes a user that
reaches only the keys and channels under one prefix, with only the commands that
quart-wslb sends itself or from its Lua scripts (Redis checks those too).
``tests/test_acl.py`` holds :data:`COMMANDS` and the scripts together, and the
integration suite runs once as such a user (``WSLB_TEST_ACL=1``).
"""

from __future__ import annotations

__all__ = ("COMMANDS", "acl_rules")

#: Every command quart-wslb sends, lowercase as ACL rules name them, and those that
#: options of the Redis URL make redis-py send: ``PING`` (``health_check_interval=``) and
#: ``CLIENT SETNAME`` (``client_name=``), both harmless. ``AUTH`` and ``HELLO`` are
#: allowed to every user; redis-py's ``CLIENT SETINFO`` on connect may be refused
#: (redis-py ignores the refusal).
COMMANDS: tuple[str, ...] = (
    # connection, scripts (redis-py's pipelines, which register several connections at
    # once, ask SCRIPT EXISTS first), and INFO stats (to tell an output-buffer cut of the
    # subscriber)
    "select", "evalsha", "script|load", "script|exists", "multi", "exec", "info",
    # what URL options make redis-py send
    "ping", "client|setname",
    # pub/sub; on a Redis Cluster, sharded channels; the unsubscriptions a subscriber
    # sends before it closes, so as to drop nothing Redis counted as delivered
    "subscribe", "unsubscribe", "publish", "ssubscribe", "sunsubscribe", "spublish",
    # on a Redis Cluster: the slot map (quart-wslb's and redis-py's), a command after an
    # ASK redirection, and the command table that redis-py's cluster client reads once
    "cluster|slots", "asking", "command",
    # strings and keys
    "get", "set", "setnx", "del", "exists", "pexpire",
    # hashes
    "hget", "hset", "hsetnx", "hdel", "hexists", "hlen", "hkeys", "hgetall", "hscan",
    "hincrby",
    "hrandfield",
    # sets
    "sadd", "srem", "smembers", "scard", "sismember", "sscan",
    # recovery (recovery.py): the history streams, their meta, the clock in send.lua
    "hmget", "xadd", "xtrim", "xrange", "time", "pttl",
)  # fmt: skip


def acl_rules(prefix: str = "wslb") -> list[str]:
    """The ACL rules of a user that can run quart-wslb under ``prefix`` and do no more.

    ``prefix`` is a ``WSLB_PREFIX``, or a glob of them (``"test-*"``). Keys and channels
    both start with ``{prefix}`` (channels carry the database after it), or with
    ``{prefix|<shard>}`` when ``WSLB_SHARDS`` > 1. Needs Redis 6.2 or later (channel
    rules).
    """
    root, shards = "{" + prefix + "}", "{" + prefix + "|*"
    return [
        "resetkeys",
        "resetchannels",
        f"~{root}*",
        f"~{shards}",
        f"&{root}*",
        f"&{shards}",
        "-@all",
        *(f"+{command}" for command in COMMANDS),
    ]
