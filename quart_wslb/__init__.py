"""quart-wslb: cluster-wide WebSocket messaging for Quart apps behind a load balancer."""

from __future__ import annotations

from . import signals
from .connection import Connection, ConnectionInfo
from .exceptions import NotStartedError, RedisUnavailableError, WsLoadBalanceError
from .extension import WsLoadBalance
from .globals import current_connection
from .route import ws_route
from .selectors import (
    AllSelector,
    AndSelector,
    ConnectionSelector,
    MetadataSelector,
    OrSelector,
    PathSelector,
    Selector,
    UserSelector,
)

__all__ = (
    "AllSelector",
    "AndSelector",
    "Connection",
    "ConnectionInfo",
    "ConnectionSelector",
    "MetadataSelector",
    "NotStartedError",
    "OrSelector",
    "PathSelector",
    "RedisUnavailableError",
    "Selector",
    "UserSelector",
    "WsLoadBalance",
    "WsLoadBalanceError",
    "current_connection",
    "signals",
    "ws_route",
)
