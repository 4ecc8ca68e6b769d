"""Settings, one option at a time: keyword argument > ``app.config["WSLB_*"]`` >
environment variable ``WSLB_*`` > :data:`DEFAULTS`.

One name per option, ``WSLB_<OPTION>``, serves as both the config key and the environment
variable, and every way of running quart-wslb (the Quart extension, the emitters, the
Flask extension) reads both. Code wins over the environment: what an app sets is a
decision, what the environment holds is the deployment's default for what the app left
open (so a plain ``WsLoadBalance(app)`` takes ``WSLB_INSTANCE_ID`` from the environment).

A new option is one entry in :data:`DEFAULTS`, one field of :class:`Settings`, its check in
``_validated``, and, if it is a number, its name in ``_NUMBERS`` (environment variables
are text); its row in docs/reference.md's table; a keyword of ``WsLoadBalance``.
"""

from __future__ import annotations

import math
import os
import re
import secrets
import socket
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Literal, cast
from urllib.parse import parse_qsl, unquote_plus, urlsplit

from .keys import MAX_SHARDS
from .signing import Keyring

__all__ = (
    "DEFAULTS",
    "EmitterOptions",
    "QueueFullPolicy",
    "Settings",
    "UserGetter",
    "config_key",
    "emitter_options",
    "from_environ",
    "option",
    "redact_url",
    "resolve_settings",
)

#: A callable run in the websocket context that names the connection's user.
UserGetter = Callable[[], "str | None | Awaitable[str | None]"]
QueueFullPolicy = Literal["close", "drop"]

_INSTANCE_RE = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
_PREFIX_RE = re.compile(r"[A-Za-z0-9_.\-:]{1,64}")

#: Every option and its default; each is read from the config key and the environment
#: variable ``WSLB_<OPTION>`` (see :func:`config_key`).
DEFAULTS: dict[str, Any] = {
    "redis_url": "redis://127.0.0.1:6379/0",
    "instance_id": None,  # generated per process: host-pid-random
    "prefix": "wslb",
    # Hash-tag shards the keys are split over (docs/redis-schema.md). None: 1 on one
    # Redis, keys.CLUSTER_SHARDS on a Redis Cluster, to spread the work over its masters.
    "shards": None,
    "max_message_size": 1024 * 1024,
    "send_queue_size": 256,
    "queue_full": "close",
    "redis_timeout": 5.0,
    "redis_max_connections": 32,
    "heartbeat_interval": 2.0,
    "instance_ttl": 6.0,
    "ping_interval": None,  # seconds; None: no pings
    "ping_message": '{"type":"ping"}',
    "idle_timeout": None,  # seconds; None: never close for silence
    "user": None,
    # Recovery mode (ws_route(recovery=True), docs/recovery.md): entries of history kept
    # per shard, and seconds a session stays resumable (and history is kept) after use.
    "recovery_length": 10_000,
    "recovery_ttl": 120.0,
    # "kid1:secret1,kid0:secret0" or {kid: secret}: the first signs, all are accepted.
    # None: every publish under the prefix is trusted (docs/security.md).
    "secret": None,
}


#: Fewest Redis connections an instance works with: its subscriber holds one for good,
#: sends (batched) one, and the rest need one at a time.
MIN_REDIS_CONNECTIONS = 4


def redact_url(url: str) -> str:
    """``url`` with its credentials replaced by ``***``: the password (and user name) of
    the authority part, and every query parameter that names a password
    (``password=``, the TLS key's ``ssl_password=``, a Sentinel URL's
    ``sentinel_password=``...) or a user name, since they are all read. Everything else is
    kept as written."""
    try:
        parts = urlsplit(url)
        pairs = parse_qsl(parts.query, keep_blank_values=True)
    except ValueError:  # not a URL we can take apart: show none of it
        return "***"
    if "@" not in parts.netloc and not any(_secret_parameter(k) for k, _ in pairs):
        return url
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rpartition("@")[2]
    query = "&".join(_redacted_parameter(item) for item in parts.query.split("&"))
    # Spelled out: urlunsplit would write unix:///path as unix:/path.
    return f"{parts.scheme}://{netloc}{parts.path}" + (f"?{query}" if query else "")


def _secret_parameter(name: str) -> bool:
    """Whether a URL query parameter holds a credential: a user name or any password."""
    name = name.casefold()
    return name.endswith("username") or "password" in name


def _redacted_parameter(item: str) -> str:
    """One ``name=value`` of a query, its value hidden if it is a credential."""
    name = item.partition("=")[0]
    return f"{name}=***" if _secret_parameter(unquote_plus(name)) else item


def _redacted_url(value: object) -> str:
    return repr(redact_url(value)) if isinstance(value, str) else repr(value)


def _hidden(value: object) -> str:
    return "'***'" if value else repr(value)


#: Field metadata: how ``repr`` shows a field that holds a credential. Mark any new
#: option that holds one with ``field(metadata=SECRET)``.
SECRET: Mapping[str, Callable[[object], str]] = {"redact": _hidden}
URL: Mapping[str, Callable[[object], str]] = {"redact": _redacted_url}


@dataclass(frozen=True, slots=True, repr=False)
class Settings:
    """The resolved, validated options of one extension. Its ``repr`` shows no
    credential (the Redis URL's password, any field marked ``SECRET``)."""

    redis_url: str = field(metadata=URL)
    instance_id: str
    prefix: str
    shards: int | None
    max_message_size: int
    send_queue_size: int
    queue_full: QueueFullPolicy
    redis_timeout: float
    redis_max_connections: int
    heartbeat_interval: float
    instance_ttl: float
    ping_interval: float | None
    ping_message: str | bytes
    idle_timeout: float | None
    user: UserGetter | None
    recovery_length: int
    recovery_ttl: float
    #: The keys that sign and check envelopes; never shown (``repr`` leaves it out).
    secret: Keyring | None = field(default=None, metadata=SECRET)

    def __repr__(self) -> str:
        return _redacted_repr(self)

    def emitter_options(self) -> EmitterOptions:
        """The options of this instance's emitter: these settings, as they resolved."""
        return EmitterOptions(
            self.redis_url,
            self.prefix,
            self.redis_timeout,
            self.redis_max_connections,
            self.secret,
            self.shards,
        )


def _redacted_repr(options: Settings | EmitterOptions) -> str:
    """``Name(field=value, ...)``, each field shown as its metadata's ``redact`` says."""
    shown = []
    for option in fields(options):
        redact = option.metadata.get("redact", repr)
        shown.append(f"{option.name}={redact(getattr(options, option.name))}")
    return f"{type(options).__name__}({', '.join(shown)})"


def default_instance_id() -> str:
    """A process-unique instance id that is readable in logs: ``host-pid-random``."""
    host = re.sub(r"[^A-Za-z0-9_.\-]", "-", socket.gethostname())[:40] or "host"
    return f"{host}-{os.getpid()}-{secrets.token_hex(3)}"


#: Options whose environment variables are read as numbers (the rest stay text).
#: ``user`` (a callable) cannot come from the environment.
_NUMBERS = frozenset(
    {
        "shards",
        "max_message_size",
        "send_queue_size",
        "redis_timeout",
        "redis_max_connections",
        "heartbeat_interval",
        "instance_ttl",
        "ping_interval",
        "idle_timeout",
        "recovery_length",
        "recovery_ttl",
    }
)


def config_key(name: str) -> str:
    """The config key, and environment variable, of option ``name``: ``WSLB_<NAME>``."""
    return f"WSLB_{name.upper()}"


def from_environ(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The environment layer: the ``WSLB_*`` variables of ``environ`` (default
    ``os.environ``) as config values.

    :func:`resolve_settings` applies it itself, below ``app.config``; this shows what the
    environment sets. Numeric options become ``int`` or ``float``; every other option
    stays text; empty variables, ``WSLB_USER`` and unknown ``WSLB_*`` names are left out.
    A numeric option that is not a number raises ``ValueError`` naming the variable.
    """
    environ = os.environ if environ is None else environ
    layer = {config_key(name): _environ_value(name, environ) for name in DEFAULTS}
    return {key: value for key, value in layer.items() if value is not None}


def option(
    name: str,
    override: Any = None,
    config: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Any:
    """One option by the layers, not yet validated: ``override`` (unless ``None``) >
    ``config[WSLB_<NAME>]`` > the environment variable ``WSLB_<NAME>`` > the default."""
    if override is not None:
        return override
    key = config_key(name)
    if config is not None and key in config:
        return config[key]
    value = _environ_value(name, os.environ if environ is None else environ)
    return DEFAULTS[name] if value is None else value


def _environ_value(name: str, environ: Mapping[str, str]) -> Any:
    """Option ``name`` as the environment sets it; ``None`` where it does not."""
    key = config_key(name)
    value = environ.get(key)
    if not value or name == "user":  # unset or empty: the next layer applies
        return None
    if name not in _NUMBERS:
        return value
    try:
        return int(value)
    except ValueError:
        pass
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"{key} in the environment must be a number, not {value!r}") from None


def resolve_settings(
    overrides: Mapping[str, Any],
    config: Mapping[str, Any],
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Merge one option at a time (see :func:`option`): argument (not ``None``) > config
    key > environment variable (``environ``, default ``os.environ``) > default; then
    validate."""
    values = {name: option(name, overrides.get(name), config, environ) for name in DEFAULTS}
    if values["instance_id"] is None:
        values["instance_id"] = default_instance_id()
    return _validated(values)


def _validated(v: dict[str, Any]) -> Settings:
    validated_url(v["redis_url"])
    validated_instance_id(v["instance_id"])
    validated_prefix(v["prefix"])
    validated_shards(v["shards"])
    for name in ("max_message_size", "send_queue_size", "recovery_length"):
        if isinstance(v[name], bool) or not isinstance(v[name], int) or v[name] < 1:
            raise ValueError(f"WSLB_{name.upper()} must be a positive int")
    validated_max_connections(v["redis_max_connections"])
    for name in ("redis_timeout", "heartbeat_interval", "instance_ttl", "recovery_ttl"):
        v[name] = _validated_seconds(name, v[name])
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
    v["secret"] = _keyring(v["secret"])
    return Settings(**v)


def _keyring(secret: object) -> Keyring | None:
    """``WSLB_SECRET`` parsed; ``None`` only when none is set. An empty one (``""``,
    ``{}``) is a ``ValueError``, never a quiet "do not sign"; errors never quote it."""
    return None if secret is None else Keyring.parse(secret)


def validated_url(value: object) -> str:
    """A Redis URL: a non-empty string (redis-py checks the rest when it connects)."""
    if not isinstance(value, str) or not value:
        raise ValueError("WSLB_REDIS_URL must be a non-empty string")
    return value


def validated_instance_id(value: object) -> str:
    """An instance (or emitter) id: 1-64 characters of ``A-Z a-z 0-9 _ . -``."""
    if not isinstance(value, str) or not _INSTANCE_RE.fullmatch(value):
        raise ValueError("WSLB_INSTANCE_ID must be 1-64 characters of A-Z a-z 0-9 _ . -")
    return value


def validated_max_connections(value: object) -> int:
    """A bound of a Redis connection pool: an int of at least ``MIN_REDIS_CONNECTIONS``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < MIN_REDIS_CONNECTIONS:
        raise ValueError(f"WSLB_REDIS_MAX_CONNECTIONS must be an int >= {MIN_REDIS_CONNECTIONS}")
    return value


def validated_prefix(value: object) -> str:
    """A key prefix: 1-64 characters of ``A-Z a-z 0-9 _ . - :``."""
    if not isinstance(value, str) or not _PREFIX_RE.fullmatch(value):
        raise ValueError("WSLB_PREFIX must be 1-64 characters of A-Z a-z 0-9 _ . - :")
    return value


def validated_shards(value: object) -> int | None:
    """A count of hash-tag shards: an int from 1 to ``MAX_SHARDS``, or ``None`` (as fits
    the Redis: see :meth:`Keys.of <quart_wslb.keys.Keys.of>`)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_SHARDS:
        raise ValueError(f"WSLB_SHARDS must be an int from 1 to {MAX_SHARDS}")
    return value


def _validated_seconds(name: str, value: object) -> float:
    """Option ``name``'s positive, finite number of seconds, as a float."""
    if not _seconds(value):
        raise ValueError(f"{config_key(name)} must be a positive number of seconds")
    return float(cast(float, value))


def _seconds(value: object) -> bool:
    """Whether ``value`` is a finite, positive int or float (not a bool)."""
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    )


@dataclass(frozen=True, slots=True, repr=False)
class EmitterOptions:
    """An emitter's resolved, validated options (:func:`emitter_options`). Its ``repr``
    shows no credential."""

    redis_url: str = field(metadata=URL)
    prefix: str
    #: Seconds (``WSLB_REDIS_TIMEOUT``).
    timeout: float
    #: The bound of a pool built from ``redis_url`` (``WSLB_REDIS_MAX_CONNECTIONS``).
    max_connections: int
    #: Signs every message sent (``WSLB_SECRET``); ``None``: messages go unsigned.
    keyring: Keyring | None = field(metadata=SECRET)
    #: Hash-tag shards of the keys (``WSLB_SHARDS``): the instances' count; ``None``, as
    #: fits the Redis.
    shards: int | None = None

    def __repr__(self) -> str:
        return _redacted_repr(self)


def emitter_options(
    *,
    redis_url: str | None = None,
    prefix: str | None = None,
    timeout: float | None = None,
    max_connections: int | None = None,
    secret: object = None,
    shards: int | None = None,
    config: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> EmitterOptions:
    """The options of an emitter (:class:`~quart_wslb.AsyncEmitter`,
    :class:`~quart_wslb.Emitter`, the Flask extension), each by the layers argument (not
    ``None``) > ``config`` > environment variable > default, and validated.

    Reads and checks only these six options: an emitter uses no other, so an instance's
    option that is wrong for it (``WSLB_PING_INTERVAL``...) does not fail an emitter.
    """

    def layered(name: str, override: Any) -> Any:
        return option(name, override, config, environ)

    return EmitterOptions(
        redis_url=validated_url(layered("redis_url", redis_url)),
        prefix=validated_prefix(layered("prefix", prefix)),
        timeout=_validated_seconds("redis_timeout", layered("redis_timeout", timeout)),
        max_connections=validated_max_connections(
            layered("redis_max_connections", max_connections)
        ),
        keyring=_keyring(layered("secret", secret)),
        shards=validated_shards(layered("shards", shards)),
    )
