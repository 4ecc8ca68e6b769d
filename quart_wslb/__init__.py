"""quart-wslb: cluster-wide WebSocket messaging for Quart apps behind a load balancer."""

from __future__ import annotations

from . import signals
from .connection import Connection
from .decorator import ws_route
from .emitter import AsyncEmitter, Receipt
from .exceptions import (
    NoInstancesError,
    NotStartedError,
    RedisAuthenticationError,
    RedisUnavailableError,
    WsLoadBalanceError,
)
from .extension import WsLoadBalance
from .globals import current_connection
from .liveness import InstanceInfo
from .queries import Stream
from .records import ConnectionInfo, ConnectionRecord
from .selectors import (
    AllSelector,
    AndSelector,
    ConnectionSelector,
    CustomSelector,
    GroupSelector,
    MetadataSelector,
    OrSelector,
    PathSelector,
    Selector,
    UserSelector,
)
from .sync import Emitter

__all__ = (
    "AllSelector",
    "AndSelector",
    "AsyncEmitter",
    "Connection",
    "ConnectionInfo",
    "ConnectionRecord",
    "ConnectionSelector",
    "CustomSelector",
    "Emitter",
    "GroupSelector",
    "InstanceInfo",
    "MetadataSelector",
    "NoInstancesError",
    "NotStartedError",
    "OrSelector",
    "PathSelector",
    "Receipt",
    "RedisAuthenticationError",
    "RedisUnavailableError",
    "Selector",
    "Stream",
    "UserSelector",
    "WsLoadBalance",
    "WsLoadBalanceError",
    "current_connection",
    "signals",
    "ws_route",
)
