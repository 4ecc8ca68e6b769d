"""The documented ACL rules: every command quart-wslb sends, its keys and channels only."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis
from redis.exceptions import NoPermissionError

from quart_wslb import AllSelector, AsyncEmitter
from quart_wslb._lua import source
from quart_wslb.acl import COMMANDS, acl_rules
from quart_wslb.testing import RedisServer
from tests.support import acl_refusals, acl_url

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted(p.stem for p in (ROOT / "quart_wslb" / "lua").glob("*.lua"))


#: A command call of a Lua script (``server.call`` is Redis 7's name for ``redis.call``).
CALL = re.compile(r"\b(?:redis|server)\s*\.\s*p?call\b")
#: The same, with the command named by a literal, or by a local of the generated header
#: (``PUBLISH``): the only forms the ACL check can read.
LITERAL = re.compile(
    r"""(?:redis|server)\s*\.\s*p?call\s*\(\s*(?:(['"])([\w|]+)\1|([A-Z_]+))\s*[,)]"""
)
#: A string local of the generated header: ``local PUBLISH = 'SPUBLISH'``.
LOCAL = re.compile(r"^local ([A-Z_]+) = '([\w|]+)'$", re.MULTILINE)
#: A Lua comment: ``--[[ block ]]`` or ``--`` to the end of the line.
COMMENT = re.compile(r"--\[\[.*?\]\]|--[^\n]*", re.DOTALL)


def commands_called(script: str) -> set[str]:
    """The commands ``script`` calls, lowercase; ``ValueError`` for a call whose command
    is not a literal (a variable, a concatenation), which no ACL check could follow."""
    # Comments out, their lines kept (for the line numbers).
    script = COMMENT.sub(lambda comment: "\n" * comment[0].count("\n"), script)
    names = dict(LOCAL.findall(script))
    called = set()
    for call in CALL.finditer(script):
        literal = LITERAL.match(script, call.start())
        command = literal and (literal[2] or names.get(literal[3]))
        if not command:
            line = script.count("\n", 0, call.start()) + 1
            raise ValueError(f"line {line}: a call whose command is not a literal")
        called.add(command.lower())
    return called


def test_acl_rules_allow_every_command_of_the_lua_scripts() -> None:
    called = {
        name
        for script in SCRIPTS
        for sharded in (False, True)
        for name in commands_called(source(script, sharded))
    }
    assert called, "no redis.call found: the pattern no longer matches the scripts"
    assert called <= set(COMMANDS), sorted(called - set(COMMANDS))


def test_acl_commands_called_reads_either_quote_and_refuses_a_variable() -> None:
    script = """redis.call('GET', k)\nredis.pcall( "HSET", k, f, v)\nserver.call('Del')
    -- redis.call(a comment) and --[[ redis.call(another)\n ]] redis.call('PING')"""
    assert commands_called(script) == {"get", "hset", "del", "ping"}
    for hidden in ("redis.call(cmd, k)", "redis.pcall('H' .. 'SET', k)", "local c = redis.call"):
        with pytest.raises(ValueError, match="line 1"):
            commands_called(hidden)


def test_acl_rules_name_the_prefix_for_keys_and_channels() -> None:
    rules = acl_rules("app:v2")
    assert rules[:7] == [
        "resetkeys",
        "resetchannels",
        "~{app:v2}*",
        "~{app:v2|*",
        "&{app:v2}*",
        "&{app:v2|*",
        "-@all",
    ]
    assert rules[7:] == [f"+{command}" for command in COMMANDS]


def test_acl_rules_are_the_ones_the_deploy_guide_shows() -> None:
    line = "ACL SETUSER wslb on >PASSWORD " + " ".join(acl_rules())
    assert line in (ROOT / "docs" / "deploy.md").read_text("utf-8")


@pytest.mark.integration
async def test_acl_user_serves_its_prefix_and_nothing_else(private_redis: RedisServer) -> None:
    with redis.Redis.from_url(private_redis.url) as admin:
        admin.execute_command("ACL", "SETUSER", "app", "on", ">pw", *acl_rules("app"))
        admin.set("{other}:layout", "3")
    url = acl_url(private_redis.url, "app", "pw")
    emitter = AsyncEmitter(redis_url=url, prefix="app", strict=False)
    try:
        assert await emitter.send(AllSelector(), "hello") == 0  # scripts load and run
        assert await emitter.count() == 0
    finally:
        await emitter.aclose()
    with redis.Redis.from_url(url) as user:
        with pytest.raises(NoPermissionError):
            user.get("{other}:layout")
        with pytest.raises(NoPermissionError):
            user.publish("{other}:bcast", "x")
        with pytest.raises(NoPermissionError):
            user.keys("*")


@pytest.mark.integration
async def test_acl_user_may_use_the_url_options_that_send_commands(
    private_redis: RedisServer,
) -> None:
    """``client_name=`` makes redis-py send ``CLIENT SETNAME`` on connect, and
    ``health_check_interval=`` a ``PING`` before a command on an idle connection."""
    with redis.Redis.from_url(private_redis.url) as admin:
        admin.execute_command("ACL", "SETUSER", "app", "on", ">pw", *acl_rules("app"))
    url = acl_url(private_redis.url, "app", "pw") + "?client_name=app-1&health_check_interval=1"
    emitter = AsyncEmitter(redis_url=url, prefix="app", strict=False)
    try:
        assert await emitter.count() == 0
        async with aioredis.Redis.from_url(private_redis.url) as admin:
            names = [client["name"] for client in await admin.client_list()]
        assert "app-1" in names, names
        await asyncio.sleep(1.2)  # idle past the interval: the next command pings first
        assert await emitter.count() == 0
    finally:
        await emitter.aclose()
    with redis.Redis.from_url(private_redis.url) as admin:
        refused = acl_refusals(admin, "app")
    assert not refused, f"Redis refused the ACL user: {refused}"
