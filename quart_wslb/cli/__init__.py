"""``wslb`` (``python -m quart_wslb``): look at and act on a running cluster from a shell.

Every command works through an :class:`~quart_wslb.AsyncEmitter`, made with the options
the instances use (``WSLB_REDIS_URL``, ``WSLB_PREFIX``, ``WSLB_SECRET``...; the global
options override them). Exit codes: 0 done, 1 an error (Redis out of reach, no instance
under the prefix), 2 a usage error, 3 a send or disconnect that matched no connection.
See docs/cli.md.
"""

from __future__ import annotations

import asyncio
import functools
import operator
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import click

from ..config import EmitterOptions, emitter_options, redact_url
from ..emitter import EVERYONE, AsyncEmitter, Receipt
from ..envelope import Kind, close_payload
from ..exceptions import REDIS_FAILURES, WsLoadBalanceError, describe
from ..selectors import ConnectionSelector, GroupSelector, PathSelector, Selector, UserSelector
from .output import (
    CONNECTION_HEADERS,
    INSTANCE_HEADERS,
    connection_json,
    connection_rows,
    instance_json,
    instance_rows,
    json_text,
    table,
)
from .watch import Rates, error_frame, error_json, frame, frame_json

__all__ = ("NOBODY", "cli", "main")

T = TypeVar("T")
#: The exit code of a send or disconnect that matched no connection.
NOBODY = 3

_json = click.option("--json", "as_json", is_flag=True, help="Print JSON, for scripts.")


def _utf8(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """An option's or argument's value if it encodes as UTF-8 (what goes to Redis must):
    bad input is a usage error, never a traceback. A shell argument of bytes that are
    not UTF-8 reaches Python as lone surrogates, which do not encode."""
    if value is not None:
        try:
            value.encode()
        except UnicodeEncodeError:
            shown = value.encode("utf-8", "surrogateescape")
            raise click.BadParameter(f"not UTF-8 text: {shown!r}", ctx, param) from None
    return value


def _name(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """:func:`_utf8`, and not empty (no user, group, path or id is)."""
    if value == "":
        raise click.BadParameter("must not be empty", ctx, param)
    return _utf8(ctx, param, value)


def _selection(command: Callable[..., Any]) -> Callable[..., Any]:
    """The options that pick connections; several at once must all match."""
    for name, help in reversed(
        (
            ("--user", "Connections of this user."),
            ("--group", "Connections in this group."),
            ("--path", "Connections on this websocket path, such as /ws/lobby."),
            ("--id", "The connection of this id."),
        )
    ):
        command = click.option(name, callback=_name, metavar="TEXT", help=help)(command)
    return command


def _selector(user: str | None, group: str | None, path: str | None, id: str | None) -> Selector:
    """The selector of the options given (all must match); everyone if none is."""
    kinds: list[tuple[str | None, Callable[[str], Selector]]] = [
        (user, UserSelector),
        (group, GroupSelector),
        (path, PathSelector),
        (id, ConnectionSelector),
    ]
    try:
        picked = [kind(value) for value, kind in kinds if value is not None]
    except (ValueError, TypeError) as error:  # _name checks first: this is a safety net
        raise click.UsageError(str(error)) from None
    return functools.reduce(operator.and_, picked) if picked else EVERYONE


def _target(options: dict[str, str | None], everyone: bool) -> Selector:
    """The selector of a send or disconnect: some option, or ``--all``, never by default."""
    given = any(value is not None for value in options.values())
    if given == everyone:
        raise click.UsageError("give --user, --group, --path or --id, or --all (not both)")
    return _selector(**options)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--redis-url",
    callback=_utf8,
    metavar="URL",
    help="The cluster's Redis: redis://, rediss://, unix://, redis+sentinel:// or a node "
    "of a Redis Cluster [default: $WSLB_REDIS_URL, else redis://127.0.0.1:6379/0].",
)
@click.option(
    "--prefix", callback=_utf8, help="The cluster's key prefix [default: $WSLB_PREFIX, else wslb]."
)
@click.option(
    "--secret",
    callback=_utf8,
    metavar="KID:SECRET",
    help="Signs what is sent, as instances with a secret require [default: $WSLB_SECRET].",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    metavar="SECONDS",
    help="Seconds each Redis exchange may take [default: $WSLB_REDIS_TIMEOUT, else 5].",
)
@click.pass_context
def cli(
    ctx: click.Context,
    redis_url: str | None,
    prefix: str | None,
    secret: str | None,
    timeout: float | None,
) -> None:
    """Look at and act on a quart-wslb cluster through its Redis."""
    try:
        ctx.obj = emitter_options(
            redis_url=redis_url, prefix=prefix, timeout=timeout, secret=secret
        )
    except (ValueError, TypeError) as error:
        raise click.UsageError(str(error)) from None


#: What a command reports as an error (exit 1): ours, and Redis's that no emitter call
#: wrapped.
FAILURES = (WsLoadBalanceError, *REDIS_FAILURES)


def _failure(error: BaseException) -> str:
    """One of :data:`FAILURES` as one line."""
    return str(error) if isinstance(error, WsLoadBalanceError) else f"Redis: {describe(error)}"


def _run(work: Callable[[AsyncEmitter], Awaitable[T]]) -> T:
    """``work`` done with an emitter of the command's options; our errors and Redis's
    become one line and exit code 1."""
    options = _options()

    async def run() -> T:
        try:
            emitter = AsyncEmitter.from_options(options)
        except ValueError as error:  # a URL that redis-py cannot read
            raise click.UsageError(str(error)) from None
        try:
            return await work(emitter)
        finally:
            await emitter.aclose()

    try:
        return asyncio.run(run())
    except FAILURES as error:
        raise click.ClickException(_failure(error)) from None


@cli.command()
@_json
def instances(as_json: bool) -> None:
    """List the live instances.

    Each with its start time, connections and messages received so far.

    Empty (exit 0) when none is live.
    """
    found = _run(lambda emitter: emitter.instances())
    if as_json:
        click.echo(json_text([instance_json(info) for info in found]))
    elif not found:
        click.echo(f"no live instance under prefix {_options().prefix!r}")
    else:
        click.echo(table(INSTANCE_HEADERS, instance_rows(found)))


@cli.command()
@_selection
@_json
def connections(
    user: str | None, group: str | None, path: str | None, id: str | None, as_json: bool
) -> None:
    """List connections: all, or those the options pick."""
    selector = _selector(user, group, path, id)
    found = _run(lambda emitter: emitter.connections(selector))
    if as_json:
        click.echo(json_text([connection_json(record) for record in found]))
    elif not found:
        click.echo("no connection")
    else:
        click.echo(table(CONNECTION_HEADERS, connection_rows(found)))


@cli.command()
@_selection
@_json
def count(
    user: str | None, group: str | None, path: str | None, id: str | None, as_json: bool
) -> None:
    """Count connections: all, or those the options pick."""
    selector = _selector(user, group, path, id)
    found = _run(lambda emitter: emitter.count(selector))
    click.echo(json_text({"count": found}) if as_json else str(found))


@cli.command()
@_selection
@click.option("--all", "everyone", is_flag=True, help="Send to every connection.")
@click.option("--binary", is_flag=True, help="Send MESSAGE's UTF-8 bytes as a binary frame.")
@_json
@click.argument("message", callback=_utf8)
def send(
    user: str | None,
    group: str | None,
    path: str | None,
    id: str | None,
    everyone: bool,
    binary: bool,
    as_json: bool,
    message: str,
) -> None:
    """Send MESSAGE to the connections the options pick.

    MESSAGE goes as a text frame, as written (JSON is text: quote it for the shell),
    or with --binary as a binary frame of its UTF-8 bytes; - reads it, verbatim, from
    standard input: any bytes with --binary, UTF-8 text without. Exits 3 if no
    connection matched.
    """
    selector = _target({"user": user, "group": group, "path": path, "id": id}, everyone)
    kind: Kind = "binary" if binary else "text"
    payload = _stdin(binary) if message == "-" else message.encode()
    receipt = _run(lambda emitter: emitter.publish(selector, kind, payload))
    _report(receipt, "sent to", as_json)


def _stdin(binary: bool) -> bytes:
    """Standard input's bytes, as they are (a text frame's must be UTF-8)."""
    data: bytes = sys.stdin.buffer.read()
    if not binary:
        try:
            data.decode()
        except UnicodeDecodeError as error:
            message = f"standard input is not UTF-8 text ({error.reason}): send it with --binary"
            raise click.UsageError(message) from None
    return data


@cli.command()
@_selection
@click.option("--all", "everyone", is_flag=True, help="Close every connection.")
@click.option(
    "--code", type=int, default=1000, show_default=True, help="Close code: 1000 or 3000-4999."
)
@click.option(
    "--reason", callback=_utf8, default="", help="Close reason, at most 123 UTF-8 bytes."
)
@_json
def disconnect(
    user: str | None,
    group: str | None,
    path: str | None,
    id: str | None,
    everyone: bool,
    code: int,
    reason: str,
    as_json: bool,
) -> None:
    """Close connections, on whichever instance holds them.

    Exits 3 if no connection matched.
    """
    selector = _target({"user": user, "group": group, "path": path, "id": id}, everyone)
    try:
        payload = close_payload(code, reason)
    except ValueError as error:
        raise click.UsageError(str(error)) from None
    receipt = _run(lambda emitter: emitter.publish(selector, "disconnect", payload))
    _report(receipt, "told to close:", as_json)


def _report(receipt: Receipt, done: str, as_json: bool) -> None:
    """What a send or disconnect did; exit 3 if it matched no connection."""
    if as_json:
        click.echo(
            json_text(
                {
                    "message_id": receipt.message_id,
                    "routed": receipt.routed,
                    "instances": receipt.instances,
                    "unheard": list(receipt.unheard),
                }
            )
        )
    else:
        click.echo(
            f"{done} {_plural(receipt.routed, 'connection')} on "
            f"{_plural(receipt.instances, 'instance')} (message {receipt.message_id})"
        )
    for instance in receipt.unheard:
        click.echo(f"warning: instance {instance} did not hear it (dead or cut off)", err=True)
    if receipt.routed == 0:
        click.get_current_context().exit(NOBODY)


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


@cli.command()
@click.option(
    "--interval",
    type=click.FloatRange(min=0.1),
    metavar="SECONDS",
    default=2.0,
    show_default=True,
    help="Seconds between refreshes.",
)
@click.option(
    "--count",
    "times",
    type=click.IntRange(min=1),
    metavar="N",
    help="Stop after this many refreshes [default: until Ctrl-C].",
)
@_json
def watch(interval: float, times: int | None, as_json: bool) -> None:
    """Watch instances, connections and message rates.

    The view is refreshed in place.

    MSG/S is messages received per second by each instance, from the counts the
    instances write at each heartbeat. With --json, one JSON object per refresh.

    A refresh that fails (Redis slow or out of reach) shows its error, as {"error": ...}
    with --json, and the watch goes on; only a failure of the first refresh ends it
    (exit 1), since nothing was watched yet: most likely a wrong URL.
    """
    heading = f"wslb watch: prefix {_options().prefix!r} on {redact_url(_options().redis_url)}"
    try:
        _run(lambda emitter: _watch(emitter, heading, interval, times, as_json))
    except KeyboardInterrupt:  # the way to stop it: no traceback, no "Aborted!"
        pass


async def _watch(
    emitter: AsyncEmitter, heading: str, interval: float, times: int | None, as_json: bool
) -> None:
    rates = Rates()
    shown = 0
    while times is None or shown < times:
        started = time.monotonic()
        try:
            found = await emitter.instances()
        except FAILURES as error:
            if shown == 0:  # not one reading yet: most likely a wrong URL, so say so
                raise
            now = time.time()
            if as_json:
                click.echo(json_text(error_json(_failure(error), now)))
            else:
                click.clear()
                click.echo(error_frame(_failure(error), _stamped(heading, now), interval))
        else:
            now = time.time()
            per_instance = rates.update(found)
            if as_json:
                click.echo(json_text(frame_json(found, per_instance, now)))
            else:
                click.clear()  # cursor home and clear, on a terminal only
                click.echo(frame(found, per_instance, _stamped(heading, now), now))
        shown += 1
        if times is None or shown < times:
            await asyncio.sleep(max(0.0, interval - (time.monotonic() - started)))


def _stamped(heading: str, now: float) -> str:
    return f"{heading} at {time.strftime('%H:%M:%S', time.gmtime(now))} UTC"


def _options() -> EmitterOptions:
    """The options that the group resolved."""
    options = click.get_current_context().find_object(EmitterOptions)
    if options is None:  # a command invoked without the group: a bug
        raise RuntimeError("no options: run the commands through the wslb group")
    return options


def main(argv: Sequence[str] | None = None) -> None:
    """The ``wslb`` console script."""
    cli.main(args=argv, prog_name="wslb")
