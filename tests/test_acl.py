"""The documented ACL rules: every command quart-wslb sends, its keys and channels only."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import redis
from redis.exceptions import NoPermissionError

from quart_wslb import AllSelector, AsyncEmitter
from quart_wslb._lua import source
from quart_wslb.acl import COMMANDS, acl_rules
from quart_wslb.testing import RedisServer
from tests.support import acl_url

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted(p.stem for p in (ROOT / "quart_wslb" / "lua").glob("*.lua"))


def test_acl_rules_allow_every_command_of_the_lua_scripts() -> None:
    called = {
        name.lower()
        for script in SCRIPTS
        for name in re.findall(r"redis\.p?call\(\s*'(\w+)'", source(script))
    }
    assert called, "no redis.call found: the pattern no longer matches the scripts"
    assert called <= set(COMMANDS), sorted(called - set(COMMANDS))


def test_acl_rules_name_the_prefix_for_keys_and_channels() -> None:
    rules = acl_rules("app:v2")
    assert rules[:5] == ["resetkeys", "resetchannels", "~{app:v2}*", "&{app:v2}*", "-@all"]
    assert rules[5:] == [f"+{command}" for command in COMMANDS]


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
