"""Settings: keyword argument > ``app.config["WSLB_*"]`` > :data:`DEFAULTS`."""

from __future__ import annotations

import math
import os
import re
import secrets
import socket
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from .signing import Keyring

__all__ = (
    "DEFAULTS",
    "QueueFullPolicy",
    "Settings",
    "UserGetter",
    "from_environ",
    "resolve_settings",
)

#: A callable run in the websocket context that names the connection's user.
UserGetter = Callable[[], "str | None | Awaitable[str | None]"]
QueueFullPolicy = Literal["close", "drop"]

_INSTANCE_RE = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
_PREFIX_RE = re.compile(r"[A-Za-z0-9_.\-:]{1,64}")

#: Every option, its default, and the ``WSLB_*`` config key it is read from.
DEFAULTS: dict[str, Any] = {
    "redis_url": "redis://127.0.0.1:6379/0",
    "instance_id": None,  # generated per process: host-pid-random
    "prefix": "wslb",
    "max_message_size": 1024 * 1024,
    "send_queue_size": 256,
    "queue_full": "close",
    "redis_timeout": 5.0,
    "heartbeat_interval": 2.0,
    "instance_ttl": 6.0,
    "ping_interval": None,  # seconds; None: no pings
    "ping_message": '{"type":"ping"}',
    "idle_timeout": None,  # seconds; None: never close for silence
    "user": None,
    # "kid1:secret1,kid0:secret0" or {kid: secret}: the first signs, all are accepted.
    # None: every publish under the prefix is trusted (docs/security.md).
    "secret": None,
}


@dataclass(frozen=True, slots=True)
class Settings:
    """The resolved, validated options of one extension."""

    redis_url: str
    instance_id: str
    prefix: str
    max_message_size: int
    send_queue_size: int
    queue_full: QueueFullPolicy
    redis_timeout: float
    heartbeat_interval: float
    instance_ttl: float
    ping_interval: float | None
    ping_message: str | bytes
    idle_timeout: float | None
    user: UserGetter | None
    #: The keys that sign and check envelopes; never shown (``repr`` leaves it out).
    secret: Keyring | None = field(default=None, repr=False)


def default_instance_id() -> str:
    """A process-unique instance id that is readable in logs: ``host-pid-random``."""
    host = re.sub(r"[^A-Za-z0-9_.\-]", "-", socket.gethostname())[:40] or "host"
    return f"{host}-{os.getpid()}-{secrets.token_hex(3)}"


#: Options whose environment variables are read as numbers (the rest stay text).
_NUMBERS = frozenset(
    {
        "max_message_size",
        "send_queue_size",
        "redis_timeout",
        "heartbeat_interval",
        "instance_ttl",
        "ping_interval",
        "idle_timeout",
    }
)


def from_environ(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The ``WSLB_*`` variables of ``environ`` (default ``os.environ``) as config values.

    For twelve-factor deployments: ``app.config.update(from_environ())``. Numeric options
    become ``int`` or ``float``; every other option stays text; unknown ``WSLB_*`` names
    are left out. A numeric option that is not a number raises ``ValueError``.
    """
    environ = os.environ if environ is None else environ
    config: dict[str, Any] = {}
    for name in DEFAULTS:
        value = environ.get(f"WSLB_{name.upper()}")
        if not value or name == "user":  # unset or empty: the default applies
            continue
        if name in _NUMBERS:
            try:
                config[f"WSLB_{name.upper()}"] = int(value)
            except ValueError:
                config[f"WSLB_{name.upper()}"] = float(value)
        else:
            config[f"WSLB_{name.upper()}"] = value
    return config


def resolve_settings(overrides: Mapping[str, Any], config: Mapping[str, Any]) -> Settings:
    """Merge one option at a time: argument (not ``None``) > config key > default."""
    values: dict[str, Any] = {}
    for name, default in DEFAULTS.items():
        value = overrides.get(name)
        if value is None:
            value = config.get(f"WSLB_{name.upper()}", default)
        values[name] = value
    if values["instance_id"] is None:
        values["instance_id"] = default_instance_id()
    return _validated(values)


def _validated(v: dict[str, Any]) -> Settings:
    if not isinstance(v["redis_url"], str) or not v["redis_url"]:
        raise ValueError("WSLB_REDIS_URL must be a non-empty string")
    validated_instance_id(v["instance_id"])
    validated_prefix(v["prefix"])
    for name in ("max_message_size", "send_queue_size"):
        if isinstance(v[name], bool) or not isinstance(v[name], int) or v[name] < 1:
            raise ValueError(f"WSLB_{name.upper()} must be a positive int")
    for name in ("redis_timeout", "heartbeat_interval", "instance_ttl"):
        if not _seconds(v[name]):
            raise ValueError(f"WSLB_{name.upper()} must be a positive number of seconds")
        v[name] = float(v[name])
    for name in ("ping_interval", "idle_timeout"):
        if v[name] is not None:
            if not _seconds(v[name]):
                raise ValueError(f"WSLB_{name.upper()} must be a positive number or None")
            v[name] = float(v[name])
    if (
        v["ping_interval"] is not None
        and v["idle_timeout"] is not None
        and v["idle_timeout"] <= v["ping_interval"]
    ):
        raise ValueError("WSLB_IDLE_TIMEOUT must be longer than WSLB_PING_INTERVAL")
    if not isinstance(v["ping_message"], str | bytes) or not v["ping_message"]:
        raise ValueError("WSLB_PING_MESSAGE must be a non-empty str or bytes")
    if v["instance_ttl"] <= v["heartbeat_interval"]:
        raise ValueError("WSLB_INSTANCE_TTL must be longer than WSLB_HEARTBEAT_INTERVAL")
    if v["queue_full"] not in ("close", "drop"):
        raise ValueError("WSLB_QUEUE_FULL must be 'close' or 'drop'")
    if v["user"] is not None and not callable(v["user"]):
        raise TypeError("WSLB_USER must be a callable or None")
    if v["secret"] is not None:
        v["secret"] = Keyring.parse(v["secret"])  # its errors never quote a secret
    return Settings(**v)


def validated_instance_id(value: object) -> str:
    """An instance (or emitter) id: 1-64 characters of ``A-Z a-z 0-9 _ . -``."""
    if not isinstance(value, str) or not _INSTANCE_RE.fullmatch(value):
        raise ValueError("WSLB_INSTANCE_ID must be 1-64 characters of A-Z a-z 0-9 _ . -")
    return value


def validated_prefix(value: object) -> str:
    """A key prefix: 1-64 characters of ``A-Z a-z 0-9 _ . - :``."""
    if not isinstance(value, str) or not _PREFIX_RE.fullmatch(value):
        raise ValueError("WSLB_PREFIX must be 1-64 characters of A-Z a-z 0-9 _ . - :")
    return value


def _seconds(value: object) -> bool:
    """Whether ``value`` is a finite, positive int or float (not a bool)."""
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    )
