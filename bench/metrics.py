"""``python -m bench.metrics``: what the ``metrics`` extra costs, off against on.

    python -m bench.metrics            # 10,000 sends per figure, 5 rounds
    python -m bench.metrics --smoke    # seconds

Send path: one private ``redis-server``; ``--users`` connections of instance ``i0``
registered through ``Registry`` (no socket) and a ``redis-cli`` hearing ``i0``'s channel,
as in :mod:`bench.recovery`. Two ``AsyncEmitter`` on that prefix send ``--messages``
texts of ``--payload`` characters to those users: ``off`` (``timestamps`` False: every
app without :class:`~quart_wslb.metrics.Metrics`) and ``on`` (``timestamps`` True: what
``Metrics`` turns on, each message carrying its send time). Two regimes: one send in
flight and ``--senders`` in flight; the order of the ways flips every round. Per way:
sends per second and this process's CPU µs per send.

Per message, in this process alone (CPU time, best of several rounds): the opening of a
send's envelope entry (``AsyncEmitter._fragment``, the only part of a send that
``timestamps`` changes) off and on; ``decode`` of a
one-message envelope without ``t`` and with it; and what a connection's writer does
after writing a frame, with nothing listening (every app without ``Metrics``: two
checks) and with ``Metrics`` listening (``message_delivered`` and ``message_timed``
sent, a counter and the histogram moved). Writes ``metrics.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from prometheus_client import CollectorRegistry
from quart import Quart
from quart.wrappers import Websocket
from redis.asyncio import Redis

from bench.fire import user_name
from bench.recovery import INSTANCE, run_senders, setup_prefix
from bench.scenario import wait_subscribed
from bench.sender import listener
from bench.signing import best
from quart_wslb import UserSelector, WsLoadBalance, signals
from quart_wslb.connection import Connection, Membership
from quart_wslb.emitter import AsyncEmitter
from quart_wslb.envelope import Envelope, decode, encode
from quart_wslb.keys import Keys
from quart_wslb.metrics import Metrics
from quart_wslb.outgoing import Outgoing
from quart_wslb.signal_sender import SignalSender
from quart_wslb.testing import RedisServer

__all__ = ("main",)

OUT = Path(__file__).resolve().parent / "out"
PREFIX = "bench-metrics"
WAYS = ("off", "on")
#: Sends of each way before the first round (scripts loaded, connections made).
WARMUP = 200
#: Messages per round of the in-process figures.
PER_ROUND = 20_000


async def send_rounds(args: argparse.Namespace) -> dict[str, Any]:
    """Sends/s and CPU µs/send of each way, per regime, per round."""
    text = "x" * args.payload
    regimes = {"1 in flight": 1, f"{args.senders} in flight": args.senders}
    with RedisServer() as server:
        admin = Redis.from_url(server.url)
        hearing = listener(server.url, Keys(PREFIX).channel(INSTANCE))
        clients = {way: Redis.from_url(server.url) for way in WAYS}
        emitters = {way: AsyncEmitter(clients[way], prefix=PREFIX) for way in WAYS}
        emitters["on"].timestamps = True
        try:
            await setup_prefix(admin, PREFIX, args.users)
            await wait_subscribed(server.url, {Keys(PREFIX).channel(INSTANCE): 1})
            selectors = [UserSelector(user_name(i)) for i in range(args.users)]

            def sender(emitter: AsyncEmitter) -> Callable[[int], Any]:
                return lambda i: emitter.send(selectors[i % args.users], text)

            for way in WAYS:
                await run_senders(sender(emitters[way]), WARMUP, 1)
            rounds = []
            for number in range(args.repeat):
                order = WAYS if number % 2 == 0 else WAYS[::-1]
                row: dict[str, Any] = {}
                for regime, senders in regimes.items():
                    row[regime] = {}
                    for way in order:
                        cpu = time.process_time()
                        elapsed = await run_senders(sender(emitters[way]), args.messages, senders)
                        row[regime][way] = {
                            "sends_per_s": args.messages / elapsed,
                            "cpu_us": (time.process_time() - cpu) * 1e6 / args.messages,
                        }
                rounds.append(row)
            return {"regimes": list(regimes), "rounds": rounds}
        finally:
            for way in WAYS:
                await emitters[way].aclose()
                await clients[way].aclose()
            await admin.aclose()
            hearing.terminate()
            hearing.wait(10)


def decoding(sent: int | None) -> Callable[[], int]:
    raw = encode(Envelope("0123456789abcdef", "i1", "text", ["i0:abc"], "x" * 64, sent=sent))

    def run() -> int:
        for _ in range(PER_ROUND):
            decode(raw)
        return PER_ROUND

    return run


def fragment(emitter: AsyncEmitter) -> Callable[[], int]:
    """A round of the part of a send that ``timestamps`` changes: its entry's opening."""
    program = UserSelector("u").compile(emitter.keys)

    def run() -> int:
        for _ in range(PER_ROUND):
            emitter._fragment("0123456789abcdef", "text", b"x", program)
        return PER_ROUND

    return run


def writer_tail(connection: Connection) -> Callable[[], int]:
    """What ``Connection._write_wire`` does after each write of one frame, a round of it."""
    delivered, timed = signals.message_delivered, signals.message_timed
    message = Outgoing("x", time.time_ns() // 1000)

    async def rounds() -> None:
        batch = [message]
        for _ in range(PER_ROUND):
            if delivered.receivers or timed.receivers:
                await connection._delivered(batch)

    def run() -> int:
        asyncio.run(rounds())
        return PER_ROUND

    return run


def in_process(repeat: int) -> dict[str, float]:
    """µs per message: decode without and with ``t``; the writer's report, off and on."""
    app = Quart(__name__)
    wslb = WsLoadBalance(app, prefix=PREFIX)
    connection = Connection(  # never written to, nor joins a group: no socket, no Redis
        id="i0:c", user="u", path="/ws", instance="i0", metadata={},
        websocket=cast(Websocket, None), queue_size=8, policy="drop",
        sender=SignalSender(wslb), membership=cast(Membership, None),
    )  # fmt: skip
    emitter = AsyncEmitter(Redis(), prefix=PREFIX)  # never connects
    figures = {"fragment_us": best(repeat, fragment(emitter))}
    emitter.timestamps = True
    figures |= {
        "fragment_timed_us": best(repeat, fragment(emitter)),
        "decode_us": best(repeat, decoding(None)),
        "decode_timed_us": best(repeat, decoding(time.time_ns() // 1000)),
    }
    if signals.message_delivered.receivers or signals.message_timed.receivers:
        raise RuntimeError("something listens already: the off figure would not be off")
    figures["writer_off_us"] = best(repeat, writer_tail(connection))
    metrics = Metrics(app, registry=CollectorRegistry())
    try:
        figures["writer_on_us"] = best(repeat, writer_tail(connection))
    finally:
        metrics.disconnect()
    observed = metrics.registry.get_sample_value("wslb_delivery_latency_seconds_count") or 0
    if observed < PER_ROUND:
        raise RuntimeError("Metrics did not observe the timed frames")
    return figures


def median_range(values: list[float]) -> str:
    mid = statistics.median(values)
    digits = 0 if mid >= 100 else 2
    if len(values) == 1:
        return f"{mid:,.{digits}f}"
    return f"{mid:,.{digits}f} ({min(values):,.{digits}f}-{max(values):,.{digits}f})"


def report(results: dict[str, Any]) -> str:
    sends, rounds = results["sends"], results["sends"]["rounds"]
    lines = [
        f"{len(rounds)} round(s) of {results['params']['messages']:,} sends per figure; "
        "median (min-max)",
        "",
        f"{'regime':<16}{'way':<6}{'sends/s':>26}{'CPU µs/send':>22}",
    ]
    for regime in sends["regimes"]:
        for way in WAYS:
            rows = [r[regime][way] for r in rounds]
            lines.append(
                f"{regime:<16}{way:<6}"
                f"{median_range([row['sends_per_s'] for row in rows]):>26}"
                f"{median_range([row['cpu_us'] for row in rows]):>22}"
            )
        ratio = [r[regime]["on"]["sends_per_s"] / r[regime]["off"]["sends_per_s"] for r in rounds]
        cpu = [r[regime]["on"]["cpu_us"] - r[regime]["off"]["cpu_us"] for r in rounds]
        lines.append(
            f"{'':<16}on/off sends/s {median_range(ratio)}; CPU µs/send on-off {median_range(cpu)}"
        )
    local = results["in_process"]
    lines += [
        "",
        "per message, this process, best of rounds (CPU µs):",
        f"  a send's entry opening (_fragment): {local['fragment_us']:.3f} timestamps off, "
        f"{local['fragment_timed_us']:.3f} on",
        f"  decode, one-message envelope:    {local['decode_us']:.3f} without t, "
        f"{local['decode_timed_us']:.3f} with t",
        f"  writer's report of one frame:    {local['writer_off_us']:.3f} nothing listening, "
        f"{local['writer_on_us']:.3f} with Metrics",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.metrics",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--smoke", action="store_true", help="the smallest run (seconds)")
    parser.add_argument("--messages", type=int, default=10_000, help="sends per figure")
    parser.add_argument("--senders", type=int, default=32, help="sends in flight")
    parser.add_argument("--users", type=int, default=1_000, help="connections of i0")
    parser.add_argument("--payload", type=int, default=64, help="characters per message")
    parser.add_argument("--repeat", type=int, default=5, help="rounds")
    parser.add_argument("--out", type=Path, default=OUT, help="output folder")
    args = parser.parse_args(argv)
    if args.smoke:
        args.messages, args.users, args.repeat = 300, 50, 1
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    results: dict[str, Any] = {
        "params": {k: v for k, v in vars(args).items() if k != "out"},
        "sends": asyncio.run(send_rounds(args)),
        "in_process": in_process(1 if args.smoke else 7),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "metrics.json").write_text(json.dumps(results, indent=1))
    print(report(results))


if __name__ == "__main__":
    main()
