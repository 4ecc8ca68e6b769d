"""What signing costs per message, on the send and the receive path (no Redis, no extras).

    python -m bench.signing            # prints a table of µs per message
    python -m bench.signing --quick    # fewer rounds

Send: the Python work of one send before its script call (``pack``, message id,
compiled selector), without a secret and with one (plus ``Keyring.fragment``). Receive:
``decode`` of envelopes of 1 and of 32 messages, without a secret and with one (plus
the receiver's checks: MAC, freshness, replay set, each target against the signed
selector). Every figure is the best of several rounds, per message, in CPU time.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from quart_wslb import UserSelector
from quart_wslb.envelope import Envelope, decode, encode, pack
from quart_wslb.keys import Keys
from quart_wslb.records import ConnectionRecord
from quart_wslb.signing import Keyring, Verifier, canonical, message

__all__ = ("main",)

KEYS = Keys("bench")
RING = Keyring.parse("k1:a-bench-secret-of-32-characters,k0:an-older-bench-secret")
ORIGIN = "instance-1"
PAYLOAD = {"type": "chat", "room": "lobby", "from": "user-17", "text": "hello there, all"}
#: Messages per round: below ``signing.RECENT``, so no round narrows the replay window.
PER_ROUND = 3_200


@dataclass(frozen=True)
class Figure:
    what: str
    single: float
    batched: float | None


def best(rounds: int, run: Callable[[], int]) -> float:
    """The best of ``rounds`` runs, in µs of this process's CPU time per message (so
    that other processes on a busy machine do not count); ``run`` returns its count."""
    out = float("inf")
    for _ in range(rounds):
        started = time.process_time_ns()
        count = run()
        out = min(out, (time.process_time_ns() - started) / 1000 / count)
    return out


def send_path(signed: bool) -> Callable[[], int]:
    """A round of the Python work of ``PER_ROUND`` sends to one user."""

    def run() -> int:
        for n in range(PER_ROUND):
            kind, payload = pack(PAYLOAD)
            message_id = os.urandom(8).hex()
            program = UserSelector(f"user-{n}").compile(KEYS)
            signature = b""
            if signed:
                signature = RING.fragment(ORIGIN, message_id, kind, payload, canonical(program))
            args = [message_id, kind, payload, signature, *program.ops]
            assert len(args) == 5
        return PER_ROUND

    return run


def envelopes(size: int, signed: bool) -> list[bytes]:
    """``PER_ROUND`` messages as publishes of ``size`` messages, to ``user-<n>``."""
    _, payload = pack(PAYLOAD)
    text = payload.decode()
    now = time.time_ns() // 1_000_000
    out = []
    for start in range(0, PER_ROUND, size):
        batch = []
        for n in range(start, start + size):
            envelope = Envelope(f"{n:016x}", ORIGIN, "json", [f"{ORIGIN}:c{n}"], text)
            if signed:
                envelope.ts, envelope.sel = now, [f"Uuser-{n}"]
                data = message(ORIGIN, envelope.id, "json", now, f"Uuser-{n}", payload)
                envelope.sig = RING.sign(data)
            batch.append(envelope)
        out.append(encode(*batch))
    return out


def receive_path(raws: list[bytes], verify: bool) -> Callable[[], int]:
    """A round of decoding ``raws`` and, if ``verify``, the checks of a secret."""
    local = {
        f"{ORIGIN}:c{n}": ConnectionRecord(
            f"{ORIGIN}:c{n}", f"user-{n}", "/ws", ORIGIN, {}, frozenset(), 0.0
        )
        for n in range(PER_ROUND)
    }

    def run() -> int:
        verifier = Verifier(RING, KEYS)  # a fresh replay set: every message is new
        count = 0
        for raw in raws:
            now = time.time_ns() // 1_000_000 if verify else 0  # as Receiver.dispatch does
            for envelope in decode(raw):
                count += 1
                if not verify:
                    continue
                if verifier.check(envelope, now) is not None:
                    raise AssertionError("a benchmark message was refused")
                match = verifier.selects(envelope.sel or [])  # as Receiver._admit does
                if match is None:
                    raise AssertionError("a benchmark selector was refused")
                for target in envelope.targets or ():
                    connection = local.get(target)
                    if connection is not None and not match(connection):
                        raise AssertionError("a benchmark target was refused")
        return count

    return run


def measure(rounds: int) -> list[Figure]:
    unsigned_send = best(rounds, send_path(False))
    signed_send = best(rounds, send_path(True))
    receive: dict[tuple[bool, int], float] = {}
    for size in (1, 32):
        receive[False, size] = best(rounds, receive_path(envelopes(size, False), False))
        receive[True, size] = best(rounds, receive_path(envelopes(size, True), True))
    return [
        Figure("send, no secret", unsigned_send, None),
        Figure("send, signed", signed_send, None),
        Figure("send: signing", signed_send - unsigned_send, None),
        Figure("receive, no secret", receive[False, 1], receive[False, 32]),
        Figure("receive, signed and checked", receive[True, 1], receive[True, 32]),
        Figure(
            "receive: checking",
            receive[True, 1] - receive[False, 1],
            receive[True, 32] - receive[False, 32],
        ),
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.signing", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="3 rounds instead of 15")
    args = parser.parse_args(argv)
    figures = measure(3 if args.quick else 15)
    print(f"{'µs per message':<30}{'1-message envelopes':>22}{'32-message envelopes':>22}")
    for figure in figures:
        batched = "-" if figure.batched is None else f"{figure.batched:.2f}"
        print(f"{figure.what:<30}{figure.single:>22.2f}{batched:>22}")


if __name__ == "__main__":
    main()
