"""The Lua scripts shipped in ``quart_wslb/lua``."""

from __future__ import annotations

from functools import cache
from importlib.resources import files


def _read(name: str) -> str:
    return files("quart_wslb").joinpath("lua", f"{name}.lua").read_text("utf-8")


#: The scripts that read records, after the helpers they share (``lua/_common.lua``).
_SHARED = frozenset({"register", "unregister", "send", "count", "match", "membership"})


@cache
def source(name: str) -> str:
    """The text of ``lua/<name>.lua`` (with the shared helpers, if it reads records)."""
    return (_read("_common") if name in _SHARED else "") + _read(name)
