"""The Lua scripts shipped in ``quart_wslb/lua``."""

from __future__ import annotations

from functools import cache
from importlib.resources import files


@cache
def source(name: str) -> str:
    """The text of ``lua/<name>.lua``."""
    return files("quart_wslb").joinpath("lua", f"{name}.lua").read_text("utf-8")
