"""Settings: argument > ``app.config`` > default, and validation."""

from __future__ import annotations

import os
import re
from typing import Any

import pytest

from quart_wslb.config import DEFAULTS, default_instance_id, resolve_settings
from quart_wslb.signing import Keyring


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
    "secret": (Keyring.parse("a:argument-secret-0001"), Keyring.parse("c:config-secret-00001")),
}
OPTIONS = {**CHOICES, **{k: v for k, v in EXTRA_CHOICES.items() if k in DEFAULTS}}


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
    from quart_wslb.config import from_environ

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
