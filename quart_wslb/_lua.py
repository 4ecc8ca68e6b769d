"""The Lua scripts shipped in ``quart_wslb/lua``, each headed by the contract's constants.

Every script starts with :func:`header`: one ``local`` per constant of
:data:`quart_wslb.contract.LUA` (``local VERSION = 3``, ``local W_USERS = 'users'``, ...),
so that no script spells a value that Python also defines. The scripts that read records
then get ``lua/_common.lua``: how a script learns ``ROOT`` (checked), the one reader of
selector programs (``fold``), the one grouping of ids by instance, and the record and
index helpers.
"""

from __future__ import annotations

from functools import cache
from importlib.resources import files

from .contract import LUA


def _read(name: str) -> str:
    return files("quart_wslb").joinpath("lua", f"{name}.lua").read_text("utf-8")


#: The scripts that read records, after the helpers they share (``lua/_common.lua``).
_SHARED = frozenset({"register", "unregister", "send", "count", "match", "membership"})


def _literal(value: str | int) -> str:
    """``value`` as a Lua literal: a number, or a plain ASCII string in single quotes."""
    if isinstance(value, int):
        return str(value)
    if not (value.isascii() and value.isprintable()) or "'" in value or "\\" in value:
        raise ValueError(f"no plain Lua literal for {value!r}")
    return f"'{value}'"


@cache
def header(sharded: bool = False) -> str:
    """The Lua locals of every constant the scripts share with Python, and ``PUBLISH``:
    the command that publishes on an instance's channels, ``SPUBLISH`` where they are
    sharded channels (a Redis Cluster), else ``PUBLISH``."""
    lines = ["-- Generated from quart_wslb/contract.py by quart_wslb/_lua.py."]
    lines += [f"local {name} = {_literal(value)}" for name, value in LUA.items()]
    lines.append(f"local PUBLISH = {_literal('SPUBLISH' if sharded else 'PUBLISH')}")
    return "\n".join(lines) + "\n"


@cache
def source(name: str, sharded: bool = False) -> str:
    """The text of ``lua/<name>.lua``, after the :func:`header` (and the shared helpers,
    if it reads records)."""
    return header(sharded) + (_read("_common") if name in _SHARED else "") + _read(name)
