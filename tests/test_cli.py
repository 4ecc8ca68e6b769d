"""The ``wslb`` command line: arguments and errors through click's runner, and every
command against a live cluster of real Hypercorn processes; the entry points as real
processes."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import click
import pytest
import redis
from click.testing import CliRunner, Result
from websockets.exceptions import ConnectionClosed

from quart_wslb import AsyncEmitter, InstanceInfo, Receipt, Selector, WsLoadBalanceError
from quart_wslb.cli import NOBODY, cli
from quart_wslb.config import EmitterOptions
from quart_wslb.testing import RedisServer
from tests.cluster import ROOT, TOPOLOGIES, Clients, Cluster, Where, receive, where_of
from tests.test_imports import PACKAGE, imports_of

StartCluster = Callable[..., Cluster]
#: A port nothing listens on.
CLOSED_URL = "redis://127.0.0.1:1/0"
#: Generous bound for what an instance writes at its next heartbeat (every 2 s).
HEARTBEAT_BOUND = 15.0
SECRET = "k1:" + "s" * 16


def invoke(*args: str, input: str | bytes | None = None) -> Result:
    """Run ``wslb args`` in this process (click's runner), stderr kept apart."""
    return CliRunner().invoke(cli, list(args), input=input, catch_exceptions=False)


@pytest.fixture(name="where", params=TOPOLOGIES)
def fixture_where(request: pytest.FixtureRequest) -> Where:
    """One real Redis, the session's Redis Cluster or its Sentinel set: each URL form."""
    return where_of(request, request.param)


def test_cli_is_imported_by_no_module_but_main() -> None:
    """``import quart_wslb`` (an app) never loads the command line."""
    importers = {p.name for p in PACKAGE.glob("*.py") if "cli" in imports_of(p)}
    assert importers == {"__main__.py"}


def test_cli_help_lists_every_command() -> None:
    result = invoke("--help")
    assert result.exit_code == 0, result.output
    for command in ("instances", "connections", "count", "send", "disconnect", "watch"):
        assert f"  {command} " in result.output


def test_cli_options_resolve_as_an_emitter_does() -> None:
    seen: list[EmitterOptions] = []

    @cli.command("capture-options")
    def capture() -> None:
        seen.append(click.get_current_context().find_object(EmitterOptions))  # type: ignore[arg-type]

    try:
        args = ["--redis-url", "redis://h:1/2", "--prefix", "p1", "--secret", SECRET, "--timeout"]
        result = invoke(*args, "0.5", "capture-options")
    finally:
        cli.commands.pop("capture-options")
    assert result.exit_code == 0, result.output
    (options,) = seen
    assert (options.redis_url, options.prefix, options.timeout) == ("redis://h:1/2", "p1", 0.5)
    assert options.keyring is not None


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--prefix", "a b", "count"], "WSLB_PREFIX"),
        (["--secret", "", "count"], "WSLB_SECRET"),
        (["--timeout", "0", "count"], "--timeout"),
        (["--redis-url", "foo://x", "count"], "scheme"),
        (["send", "hi"], "--all"),
        (["send", "--user", "a", "--all", "hi"], "--all"),
        (["disconnect"], "--all"),
        (["disconnect", "--user", "a", "--code", "999"], "close code"),
        (["watch", "--count", "0"], "--count"),
        (["count", "--user", ""], "must not be empty"),
        (["count", "--group", ""], "must not be empty"),
        (["count", "--path", ""], "must not be empty"),
        (["count", "--id", ""], "must not be empty"),
        (["send", "--user", "", "hi"], "must not be empty"),
        # What Python makes of argv bytes that are not UTF-8 (b"\xff\xfe"): surrogates.
        (["count", "--user", "\udcff"], "not UTF-8"),
        (["send", "--all", "\udcff\udcfe"], "not UTF-8"),
        (["--prefix", "p\udcff", "count"], "not UTF-8"),
        (["--redis-url", "redis://h\udcff/0", "count"], "not UTF-8"),
        (["--secret", "k1:\udcff" + "s" * 16, "count"], "not UTF-8"),
        (["disconnect", "--all", "--reason", "\udcff"], "not UTF-8"),
    ],
)
def test_cli_usage_errors_exit_2(args: list[str], says: str) -> None:
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    assert says in result.output, result.output
    assert "Traceback" not in result.output


def test_cli_send_of_stdin_that_is_not_utf8_text_is_a_usage_error() -> None:
    result = invoke("--redis-url", CLOSED_URL, "send", "--all", "-", input=b"\xff\xfe")
    assert result.exit_code == 2, result.output
    assert "not UTF-8" in result.output and "--binary" in result.output, result.output


@pytest.mark.parametrize(("binary", "kind"), [(["--binary"], "binary"), ([], "text")])
def test_cli_send_reads_stdin_as_bytes(
    monkeypatch: pytest.MonkeyPatch, binary: list[str], kind: str
) -> None:
    """``-`` sends standard input's bytes verbatim: any bytes as a binary frame."""
    published: list[tuple[str, bytes]] = []

    async def publish(self: AsyncEmitter, selector: Selector, kind: str, data: bytes) -> Receipt:
        published.append((kind, data))
        return Receipt("m1", 1, 1, ())

    monkeypatch.setattr(AsyncEmitter, "publish", publish)
    data = b"\xff\xfe\x00" if binary else "é\r\n".encode()
    result = invoke("--redis-url", CLOSED_URL, "send", "--all", *binary, "-", input=data)
    assert result.exit_code == 0, result.output
    assert published == [(kind, data)]


@pytest.mark.integration
def test_cli_watch_goes_on_when_a_refresh_fails(private_redis: RedisServer) -> None:
    """A refresh that Redis answers too late shows its error, and the watch goes on."""
    args = ["--redis-url", private_redis.url, "--timeout", "0.3", "watch", "--json"]
    watching = threading.Thread(
        target=lambda: outcome.append(invoke(*args, "--interval", "0.2", "--count", "15"))
    )
    outcome: list[Result] = []
    admin = redis.Redis.from_url(private_redis.url)
    try:
        watching.start()
        time.sleep(0.6)  # a few refreshes answered first
        admin.client_pause(1000)
        watching.join(30)
    finally:
        admin.close()
    (result,) = outcome
    assert result.exit_code == 0, result.output
    readings = [json.loads(line) for line in result.output.splitlines()]
    assert len(readings) == 15
    kinds = "".join("e" if "error" in r else "i" for r in readings)
    assert re.fullmatch("i+e+i+", kinds), kinds
    failed = next(r for r in readings if "error" in r)
    assert "did not answer in time" in failed["error"], failed


def test_cli_watch_shows_a_failed_refresh_in_its_frame(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []

    async def instances(self: AsyncEmitter) -> list[InstanceInfo]:
        calls.append(1)
        if len(calls) == 2:
            raise WsLoadBalanceError("instances: Redis did not answer in time")
        return [InstanceInfo("i0", 1.0, 2, 5, 3.0)]

    monkeypatch.setattr(AsyncEmitter, "instances", instances)
    result = invoke("--redis-url", CLOSED_URL, "watch", "--interval", "0.1", "--count", "3")
    assert result.exit_code == 0, result.output
    frames = result.output.split("wslb watch: ")[1:]
    assert len(frames) == 3, result.output
    assert "error: instances: Redis did not answer in time" in frames[1]
    assert "i0" in frames[2] and "error" not in frames[2]


@pytest.mark.parametrize("command", [["count"], ["instances"], ["send", "--all", "x"], ["watch"]])
def test_cli_unreachable_redis_is_one_line_and_exit_1(command: list[str]) -> None:
    result = invoke("--redis-url", CLOSED_URL, "--timeout", "2", *command)
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert "Redis did not answer" in lines[0]


@pytest.mark.integration
def test_cli_wrong_prefix_is_an_error_for_queries_not_for_instances(
    redis_url: str, prefix: str
) -> None:
    base = ["--redis-url", redis_url, "--prefix", prefix]
    listed = invoke(*base, "instances")
    assert listed.exit_code == 0 and "no live instance" in listed.output, listed.output
    assert json.loads(invoke(*base, "instances", "--json").output) == []
    counted = invoke(*base, "count")
    assert counted.exit_code == 1 and "no instance has announced itself" in counted.output


async def wslb(where: Where, prefix: str, *args: str, input: str | bytes | None = None) -> Result:
    """``wslb`` on the cluster's Redis and prefix, off the event loop (it runs its own)."""
    base = ["--redis-url", where.url, "--prefix", prefix]
    return await asyncio.to_thread(functools.partial(invoke, *base, *args, input=input))


async def parsed(where: Where, prefix: str, *args: str) -> Any:
    """The JSON that ``wslb args --json`` printed (exit 0)."""
    result = await wslb(where, prefix, *args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


@pytest.mark.integration
@pytest.mark.timeout(120)
async def test_cli_commands_on_a_live_cluster(
    where: Where, prefix: str, start_cluster: StartCluster, clients: Clients
) -> None:
    cluster = start_cluster(2, url=where.url, **where.env)
    alice, alice_id = await clients.join(cluster[0], "alice")
    bob, bob_id = await clients.join(cluster[1], "bob")
    carol, carol_id = await clients.join(cluster[1], "carol", room="blue")
    await bob.send("join:team")
    assert (await receive(bob))["groups"] == ["team"]

    listed = await parsed(where, prefix, "instances")
    assert [(i["id"], i["connections"]) for i in listed] == [("i0", 1), ("i1", 2)]
    table = (await wslb(where, prefix, "instances")).output.splitlines()
    assert table[0].split()[0] == "INSTANCE" and [row.split()[0] for row in table[1:]] == [
        "i0",
        "i1",
    ], table

    (record,) = await parsed(where, prefix, "connections", "--user", "bob")
    assert (record["id"], record["instance"], record["groups"]) == (bob_id, "i1", ["team"])
    assert [r["id"] for r in await parsed(where, prefix, "connections", "--path", "/ws/blue")] == [
        carol_id
    ]
    rows = (await wslb(where, prefix, "connections", "--group", "team")).output.splitlines()
    assert len(rows) == 2 and rows[1].split()[:3] == [bob_id, "i1", "bob"], rows
    assert (await wslb(where, prefix, "count")).output == "3\n"
    assert await parsed(where, prefix, "count", "--user", "bob", "--group", "team") == {"count": 1}

    sent = await wslb(where, prefix, "send", "--user", "alice", "hello alice")
    assert sent.exit_code == 0, sent.output
    assert "sent to 1 connection on 1 instance" in sent.output
    assert await receive(alice) == "hello alice"
    nobody = await wslb(where, prefix, "send", "--user", "nobody", "x")
    assert nobody.exit_code == NOBODY, nobody.output
    receipt = await parsed(where, prefix, "send", "--path", "/ws/blue", '{"n": 1}')
    assert (receipt["routed"], receipt["instances"], receipt["unheard"]) == (1, 1, [])
    assert await receive(carol) == {"n": 1}
    piped = await wslb(where, prefix, "send", "--id", carol_id, "--binary", "-", input=b"\xff\n")
    assert piped.exit_code == 0, piped.output
    assert await receive(carol) == b"\xff\n"

    closed = await wslb(where, prefix, "disconnect", "--user", "bob", "--code", "4001")
    assert closed.exit_code == 0 and "told to close: 1 connection" in closed.output
    with pytest.raises(ConnectionClosed):
        await asyncio.wait_for(bob.recv(), 5)
    assert bob.close_code == 4001

    # Each instance counts what it took off its channels and writes it at its heartbeat.
    deadline = time.monotonic() + HEARTBEAT_BOUND
    while not enough(received := await received_by(where, prefix)):
        if time.monotonic() > deadline:
            raise AssertionError(f"after {HEARTBEAT_BOUND} s, instances received {received}")
        await asyncio.sleep(0.2)

    watched = await wslb(where, prefix, "watch", "--count", "2", "--interval", "0.2")
    assert watched.exit_code == 0, watched.output
    frames = watched.output.split("wslb watch: ")[1:]
    assert len(frames) == 2, watched.output
    for frame in frames:
        names = [line.split()[0] for line in frame.splitlines()[3:] if line.strip()]
        assert names == ["i0", "i1", "TOTAL"], frame
    # Rates are between heartbeats (every 2 s): 3 s of readings see at least two.
    readings = [json.loads(line) for line in (await wslb(
        where, prefix, "watch", "--count", "3", "--interval", "1.5", "--json"
    )).output.splitlines()]  # fmt: skip
    assert [[i["id"] for i in r["instances"]] for r in readings] == [["i0", "i1"]] * 3
    assert readings[0]["instances"][0]["rate"] is None  # nothing to compare with yet
    assert isinstance(readings[2]["instances"][0]["rate"], float)


@pytest.mark.integration
async def test_cli_send_is_signed_with_the_clusters_secret(
    redis_url: str,
    prefix: str,
    start_cluster: StartCluster,
    clients: Clients,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cluster = start_cluster(2, WSLB_SECRET=SECRET)
    alice, _ = await clients.join(cluster[1], "alice")
    base = ["--redis-url", redis_url, "--prefix", prefix, "send", "--user", "alice"]
    unsigned = await asyncio.to_thread(invoke, *base, "unsigned")
    assert unsigned.exit_code == 0, unsigned.output  # routed, and refused by the instance
    monkeypatch.setenv("WSLB_SECRET", SECRET)  # as on a host that runs an instance
    signed = await asyncio.to_thread(invoke, *base, "signed")
    assert signed.exit_code == 0, signed.output
    assert await receive(alice) == "signed"  # one channel, in order: the first never came


def enough(received: dict[str, int]) -> bool:
    """Whether each instance counted what the test sent it: alice's message on i0;
    carol's and bob's disconnect on i1."""
    return received["i0"] >= 1 and received["i1"] >= 2


async def received_by(where: Where, prefix: str) -> dict[str, int]:
    return {i["id"]: i["received"] for i in await parsed(where, prefix, "instances")}


def script() -> Path:
    """The ``wslb`` console script installed beside this interpreter."""
    return Path(sys.executable).parent / "wslb"


def run(command: Sequence[str | os.PathLike[str]]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=30)


@pytest.mark.integration
def test_cli_entry_points_run_as_processes(redis_url: str, prefix: str) -> None:
    as_module = run([sys.executable, "-m", "quart_wslb", "--redis-url", redis_url,
                     "--prefix", prefix, "instances", "--json"])  # fmt: skip
    assert (as_module.returncode, as_module.stdout) == (0, "[]\n"), as_module.stderr
    if not script().exists():
        pytest.skip(f"no wslb console script beside {sys.executable}: pip install -e .")
    failed = run([script(), "--redis-url", CLOSED_URL, "--timeout", "2", "count"])
    assert failed.returncode == 1 and failed.stdout == "", failed
    assert failed.stderr.startswith("Error: ") and len(failed.stderr.splitlines()) == 1


@pytest.mark.integration
def test_cli_watch_stops_quietly_on_ctrl_c(redis_url: str, prefix: str) -> None:
    command = [sys.executable, "-m", "quart_wslb", "--redis-url", redis_url, "--prefix",
               prefix, "watch", "--interval", "0.2", "--json"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    ) as process:
        assert process.stdout is not None
        first = process.stdout.readline()  # it runs: one reading printed
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=20)
    assert json.loads(first)["instances"] == []
    assert process.returncode == 0, stderr
    assert stderr == "", stderr
