"""Settings: argument > ``app.config`` > environment > default, and validation."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from quart_wslb.config import (
    DEFAULTS,
    EmitterOptions,
    default_instance_id,
    emitter_options,
    from_environ,
    redact_url,
    resolve_settings,
)
from quart_wslb.keys import Keys
from quart_wslb.signing import Keyring
from tests.cluster import Cluster


def user_a() -> str:
    return "a"


def user_b() -> str:
    return "b"


#: option -> (argument, config value): three distinct valid values with the default.
CHOICES: dict[str, tuple[Any, Any]] = {
    "redis_url": ("redis://arg:6379/1", "redis://cfg:6379/2"),
    "instance_id": ("arg-1", "cfg-1"),
    "prefix": ("arg", "cfg:x"),
    "max_message_size": (10, 20),
    "send_queue_size": (3, 4),
    "queue_full": ("close", "drop"),
    "redis_timeout": (0.5, 1.5),
    "heartbeat_interval": (1.0, 1.5),
    "instance_ttl": (10.0, 20.0),
    "user": (user_a, user_b),
}
#: Options added after the core set; tested when the package has them.
EXTRA_CHOICES: dict[str, tuple[Any, Any]] = {
    "ping_interval": (5.0, 7.0),
    "ping_message": ("p1", b"p2"),
    "idle_timeout": (30.0, 60.0),
    "redis_max_connections": (8, 16),
    "secret": (Keyring.parse("a:argument-secret-0001"), Keyring.parse("c:config-secret-00001")),
    "shards": (4, 8),
    "recovery_length": (50, 500),
    "recovery_ttl": (30.0, 60.0),
}
OPTIONS = {**CHOICES, **{k: v for k, v in EXTRA_CHOICES.items() if k in DEFAULTS}}
#: option -> (environment variable's text, the value it stands for): distinct from the
#: argument values of ``OPTIONS`` and from the defaults.
ENVIRON: dict[str, tuple[str, Any]] = {
    "redis_url": ("redis://env:6379/3", "redis://env:6379/3"),
    "instance_id": ("env-1", "env-1"),
    "prefix": ("env", "env"),
    "max_message_size": ("30", 30),
    "send_queue_size": ("5", 5),
    "queue_full": ("drop", "drop"),
    "redis_timeout": ("2.5", 2.5),
    "heartbeat_interval": ("1.25", 1.25),
    "instance_ttl": ("12", 12.0),
    "ping_interval": ("4", 4.0),
    "ping_message": ("env-ping", "env-ping"),
    "idle_timeout": ("40", 40.0),
    "redis_max_connections": ("24", 24),
    "shards": ("16", 16),
    "recovery_length": ("77", 77),
    "recovery_ttl": ("9.5", 9.5),
    "secret": ("e:environ-secret-0001", Keyring.parse("e:environ-secret-0001")),
}
FROM_ENVIRON = sorted(set(OPTIONS) & set(ENVIRON))


def config_key(option: str) -> str:
    return f"WSLB_{option.upper()}"


def test_defaults_cover_every_option() -> None:
    assert set(OPTIONS) == set(DEFAULTS)


@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_resolve_argument_beats_config(option: str) -> None:
    argument, configured = OPTIONS[option]
    settings = resolve_settings({option: argument}, {config_key(option): configured})
    assert getattr(settings, option) == argument


@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_resolve_config_beats_default(option: str) -> None:
    _, configured = OPTIONS[option]
    settings = resolve_settings({option: None}, {config_key(option): configured})
    assert getattr(settings, option) == configured


@pytest.mark.parametrize("option", sorted(set(OPTIONS) - {"instance_id"}))
def test_resolve_default_when_nothing_given(option: str) -> None:
    settings = resolve_settings({}, {})
    assert getattr(settings, option) == DEFAULTS[option]


def test_every_option_but_user_comes_from_the_environment() -> None:
    assert set(ENVIRON) >= set(DEFAULTS) - {"user"}


@pytest.mark.parametrize("option", FROM_ENVIRON)
def test_resolve_environment_beats_default(option: str) -> None:
    text, value = ENVIRON[option]
    settings = resolve_settings({}, {}, {config_key(option): text})
    assert getattr(settings, option) == value != DEFAULTS[option]


@pytest.mark.parametrize("option", FROM_ENVIRON)
def test_resolve_config_beats_environment(option: str) -> None:
    configured, _ = OPTIONS[option]
    text, _ = ENVIRON[option]
    settings = resolve_settings({}, {config_key(option): configured}, {config_key(option): text})
    assert getattr(settings, option) == configured


@pytest.mark.parametrize("option", FROM_ENVIRON)
def test_resolve_argument_beats_environment(option: str) -> None:
    argument, _ = OPTIONS[option]
    text, _ = ENVIRON[option]
    settings = resolve_settings({option: argument}, {}, {config_key(option): text})
    assert getattr(settings, option) == argument


def test_resolve_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WSLB_INSTANCE_ID", "exported-1")
    monkeypatch.setenv("WSLB_REDIS_URL", "redis://exported:6379/4")
    settings = resolve_settings({}, {})
    assert (settings.instance_id, settings.redis_url) == ("exported-1", "redis://exported:6379/4")


def test_resolve_environment_never_sets_the_user_getter() -> None:
    assert resolve_settings({}, {}, {"WSLB_USER": "alice"}).user is None


def test_resolve_empty_variable_is_unset() -> None:
    assert resolve_settings({}, {}, {"WSLB_PREFIX": ""}).prefix == DEFAULTS["prefix"]


@pytest.mark.parametrize("name", ["WSLB_INSTANCE_TTL", "WSLB_SEND_QUEUE_SIZE"])
def test_resolve_environment_number_that_is_not_one_names_the_variable(name: str) -> None:
    with pytest.raises(ValueError, match=f"{name} in the environment must be a number"):
        resolve_settings({}, {}, {name: "soon"})


def test_resolve_environment_values_are_validated() -> None:
    with pytest.raises(ValueError, match="WSLB_INSTANCE_ID"):
        resolve_settings({}, {}, {"WSLB_INSTANCE_ID": "has:colon"})
    with pytest.raises(ValueError, match="WSLB_SEND_QUEUE_SIZE"):
        resolve_settings({}, {}, {"WSLB_SEND_QUEUE_SIZE": "1.5"})


def test_emitter_options_argument_beats_environment_beats_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert emitter_options() == EmitterOptions(DEFAULTS["redis_url"], "wslb", 5.0, 32, None)
    monkeypatch.setenv("WSLB_REDIS_URL", "redis://env:1/0")
    monkeypatch.setenv("WSLB_PREFIX", "env")
    monkeypatch.setenv("WSLB_REDIS_TIMEOUT", "0.25")
    monkeypatch.setenv("WSLB_REDIS_MAX_CONNECTIONS", "5")
    monkeypatch.setenv("WSLB_SECRET", "e:environ-secret-0001")
    assert emitter_options() == EmitterOptions(
        "redis://env:1/0", "env", 0.25, 5, Keyring.parse("e:environ-secret-0001")
    )
    given = emitter_options(
        redis_url="redis://arg:1/0",
        prefix="arg",
        timeout=2,
        max_connections=6,
        secret="a:argument-secret-0001",
    )
    assert given == EmitterOptions(
        "redis://arg:1/0", "arg", 2.0, 6, Keyring.parse("a:argument-secret-0001")
    )
    with pytest.raises(ValueError, match="WSLB_REDIS_TIMEOUT"):
        emitter_options(timeout=-1)
    with pytest.raises(ValueError, match="WSLB_REDIS_URL"):
        emitter_options(redis_url="")
    with pytest.raises(ValueError, match="WSLB_REDIS_MAX_CONNECTIONS"):
        emitter_options(max_connections=3)


def test_emitter_options_config_sits_between_argument_and_environment() -> None:
    environ = {
        "WSLB_PREFIX": "env",
        "WSLB_REDIS_TIMEOUT": "3",
        "WSLB_SECRET": "e:environ-secret-0002",
    }
    config = {"WSLB_PREFIX": "config", "WSLB_REDIS_MAX_CONNECTIONS": 7}
    options = emitter_options(prefix=None, timeout=None, config=config, environ=environ)
    assert (options.prefix, options.timeout, options.max_connections) == ("config", 3.0, 7)
    assert options.keyring == Keyring.parse("e:environ-secret-0002")
    assert emitter_options(prefix="arg", config=config, environ=environ).prefix == "arg"


def test_emitter_options_read_no_option_an_emitter_does_not_use() -> None:
    """A Flask app (which never pings) must not fail on the Quart instances' options."""
    environ = {"WSLB_PING_INTERVAL": "soon", "WSLB_INSTANCE_ID": "has:colon"}
    config = {"WSLB_IDLE_TIMEOUT": -1, "WSLB_QUEUE_FULL": "explode"}
    assert emitter_options(config=config, environ=environ).prefix == "wslb"


@pytest.mark.parametrize("secret", ["", {}])
def test_emitter_options_empty_secret_is_an_error(secret: object) -> None:
    with pytest.raises(ValueError):
        emitter_options(secret=secret)
    with pytest.raises(ValueError):
        emitter_options(config={"WSLB_SECRET": secret})


def test_emitter_options_repr_hides_credentials() -> None:
    options = emitter_options(
        redis_url="rediss://u:hunter2@db/0?ssl_password=hunter2", secret="k:hunter2-secret-of-16"
    )
    assert "hunter2" not in repr(options), repr(options)
    assert repr(options).startswith("EmitterOptions(redis_url='rediss://***@db/0?"), options


def test_reference_table_lists_every_option_with_its_variable() -> None:
    """docs/reference.md's one table of options: a row per option, naming its key."""
    reference = (Path(__file__).parent.parent / "docs" / "reference.md").read_text()
    section = reference.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `(\w+)` \| ([^|]*) \|", section, flags=re.MULTILINE)
    documented = {name: key for name, key in rows}
    assert set(documented) == set(DEFAULTS) | {"redis"}
    for name in DEFAULTS:
        assert f"`{config_key(name)}`" in documented[name], name


def test_resolve_ignores_unrelated_config() -> None:
    settings = resolve_settings({}, {"PREFIX": "nope", "wslb_prefix": "nope"})
    assert settings.prefix == DEFAULTS["prefix"]


def test_resolve_integers_become_float_seconds() -> None:
    settings = resolve_settings({"redis_timeout": 2, "heartbeat_interval": 1}, {})
    assert isinstance(settings.redis_timeout, float)
    assert isinstance(settings.heartbeat_interval, float)


def test_default_instance_id_is_valid_and_unique() -> None:
    ids = {default_instance_id() for _ in range(50)}
    assert len(ids) == 50
    for instance in ids:
        assert re.fullmatch(r"[A-Za-z0-9_.\-]{1,64}", instance), instance
        assert f"-{os.getpid()}-" in instance


def test_default_instance_id_used_when_none_given() -> None:
    one, two = resolve_settings({}, {}), resolve_settings({}, {})
    assert one.instance_id != two.instance_id
    assert str(os.getpid()) in one.instance_id


def test_default_instance_id_survives_odd_hostnames(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("socket.gethostname", lambda: "höst:{x}/" + "y" * 100)
    instance = default_instance_id()
    assert re.fullmatch(r"[A-Za-z0-9_.\-]{1,64}", instance), instance


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("redis_url", ""),
        ("redis_url", 5),
        ("instance_id", ""),
        ("instance_id", "a:b"),
        ("instance_id", "a b"),
        ("instance_id", "{a}"),
        ("instance_id", "x" * 65),
        ("instance_id", 5),
        ("prefix", ""),
        ("prefix", "{a}"),
        ("prefix", "a b"),
        ("prefix", "a*"),
        ("prefix", "x" * 65),
        ("max_message_size", 0),
        ("max_message_size", -1),
        ("max_message_size", 1.5),
        ("max_message_size", True),
        ("max_message_size", "10"),
        ("send_queue_size", 0),
        ("send_queue_size", False),
        ("queue_full", "block"),
        ("queue_full", 1),
        ("redis_timeout", 0),
        ("redis_timeout", -1.0),
        ("redis_timeout", True),
        ("redis_timeout", "1"),
        ("heartbeat_interval", 0),
        ("instance_ttl", -1),
    ],
)
def test_validation_rejects_bad_values(option: str, value: object) -> None:
    with pytest.raises(ValueError, match=config_key(option)):
        resolve_settings({option: value}, {})


@pytest.mark.parametrize(
    ("option", "value"),
    [("ping_interval", 0), ("ping_interval", True), ("idle_timeout", -1), ("ping_message", "")],
)
def test_validation_rejects_bad_extra_values(option: str, value: object) -> None:
    if option not in DEFAULTS:
        pytest.skip(f"{option} is not an option of this version")
    with pytest.raises(ValueError, match=config_key(option)):
        resolve_settings({option: value}, {})


def test_validation_rejects_bad_config_values() -> None:
    with pytest.raises(ValueError, match="WSLB_SEND_QUEUE_SIZE"):
        resolve_settings({}, {"WSLB_SEND_QUEUE_SIZE": "256"})


@pytest.mark.parametrize(("interval", "ttl"), [(2.0, 2.0), (3.0, 2.0)])
def test_validation_ttl_must_exceed_heartbeat(interval: float, ttl: float) -> None:
    with pytest.raises(ValueError, match="WSLB_INSTANCE_TTL"):
        resolve_settings({"heartbeat_interval": interval, "instance_ttl": ttl}, {})


def test_validation_user_must_be_callable() -> None:
    with pytest.raises(TypeError, match="WSLB_USER"):
        resolve_settings({"user": "alice"}, {})


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("redis_timeout", float("nan")),
        ("redis_timeout", float("inf")),
        ("heartbeat_interval", float("nan")),
        ("instance_ttl", float("nan")),
        ("instance_ttl", float("inf")),
    ],
)
def test_validation_rejects_non_finite_seconds(option: str, value: float) -> None:
    with pytest.raises(ValueError, match=config_key(option)):
        resolve_settings({option: value}, {})


def test_settings_are_frozen() -> None:
    settings = resolve_settings({}, {})
    with pytest.raises(AttributeError):
        settings.prefix = "other"  # type: ignore[misc]


def test_from_environ_types_numbers_and_keeps_text() -> None:
    environ = {
        "WSLB_REDIS_URL": "redis://h:1/2",
        "WSLB_INSTANCE_ID": "123",
        "WSLB_SEND_QUEUE_SIZE": "64",
        "WSLB_HEARTBEAT_INTERVAL": "0.5",
        "WSLB_PING_MESSAGE": "42",
        "WSLB_PREFIX": "",
        "WSLB_UNKNOWN": "x",
        "OTHER": "y",
    }
    assert from_environ(environ) == {
        "WSLB_REDIS_URL": "redis://h:1/2",
        "WSLB_INSTANCE_ID": "123",
        "WSLB_SEND_QUEUE_SIZE": 64,
        "WSLB_HEARTBEAT_INTERVAL": 0.5,
        "WSLB_PING_MESSAGE": "42",
    }
    with pytest.raises(ValueError):
        from_environ({"WSLB_INSTANCE_TTL": "soon"})


@pytest.mark.integration
async def test_plain_app_takes_exported_instance_id_and_redis_url(
    start_cluster: Callable[..., Cluster], redis_url: str, prefix: str
) -> None:
    """``tests/cluster_app.py`` is a plain ``WsLoadBalance(app)``: the instance takes the
    id, Redis and prefix exported for its process, and nothing from anywhere else."""
    cluster = start_cluster(1, WSLB_INSTANCE_ID="exported-7")
    assert (await cluster[0].stats())["instance"] == "exported-7"
    client = Redis.from_url(redis_url)
    try:
        assert await client.exists(Keys(prefix).heartbeat("exported-7")) == 1
    finally:
        await client.aclose()


@pytest.mark.parametrize(
    "url",
    [
        "redis://:hunter2@db:6379/0",
        "rediss://app:hunter2@db:6380/1",
        "redis://db:6379/0?password=hunter2&socket_timeout=1",
        "unix://app:hunter2@/run/redis.sock?db=2",
        "rediss://db:6380/0?ssl_password=hunter2&ssl_ca_certs=/ca.pem",  # the TLS key's
        "rediss://db:6380/0?SSL_Password=hunter2",
        "redis+sentinel://:hunter2@db1:26379,db2/svc/1",
        "redis+sentinel://db1,db2/svc?sentinel_username=hunter2&sentinel_password=hunter2",
    ],
)
def test_settings_repr_hides_the_redis_password(url: str) -> None:
    settings = resolve_settings({"redis_url": url}, {})
    assert settings.redis_url == url  # the value itself is untouched
    for shown in (repr(settings), str(settings)):
        assert "hunter2" not in shown, shown
        assert "redis_url=" in shown and "db" in shown or "redis.sock" in shown, shown
        assert "***" in shown, shown


def test_redact_url_hides_every_query_parameter_that_names_a_password() -> None:
    url = "rediss://db:6380/0?ssl_password=pw1&password=pw2&username=u&ssl_ca_certs=/ca.pem"
    assert redact_url(url) == (
        "rediss://db:6380/0?ssl_password=***&password=***&username=***&ssl_ca_certs=/ca.pem"
    )


def test_settings_repr_shows_a_url_without_credentials_as_it_is() -> None:
    settings = resolve_settings({"redis_url": "redis://db:6379/3"}, {})
    assert "redis_url='redis://db:6379/3'" in repr(settings)
    assert f"prefix={settings.prefix!r}" in repr(settings)


def test_redis_max_connections_must_leave_room_for_the_subscriber() -> None:
    for bad in (0, 3, -1, True, 2.5, "8"):
        with pytest.raises(ValueError, match="WSLB_REDIS_MAX_CONNECTIONS"):
            resolve_settings({"redis_max_connections": bad}, {})
    assert resolve_settings({}, {"WSLB_REDIS_MAX_CONNECTIONS": 4}).redis_max_connections == 4
