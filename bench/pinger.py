"""A PING loop on a Redis connection of its own, in a process of its own.

``python -m bench.pinger URL OUT [--interval S]`` sends ``PING`` every ``S`` seconds
(default 0.001), one at a time, and times each reply; on SIGTERM it writes every sample
to ``OUT`` as pairs of signed 64-bit integers: the ``time.time_ns()`` at which the PING
was sent, then its round trip in ns. A script that keeps Redis busy delays every
command behind it, and this loop sees that delay; being a process of its own, it is not
delayed by the benchmark's event loop (which holds thousands of websocket clients).
Only URLs without credentials are supported (the benchmark's private Redis).
"""

from __future__ import annotations

import argparse
import signal
import socket
import sys
import time
from array import array
from types import FrameType
from urllib.parse import urlsplit

__all__ = ("main",)

PING = b"*1\r\n$4\r\nPING\r\n"
PONG = b"+PONG\r\n"


def _connect(url: str) -> socket.socket:
    parts = urlsplit(url)
    if parts.username or parts.password:
        raise ValueError("bench.pinger supports Redis URLs without credentials only")
    sock = socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 6379))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _ping(sock: socket.socket) -> None:
    sock.sendall(PING)
    reply = b""
    while len(reply) < len(PONG):
        chunk = sock.recv(64)
        if not chunk:
            raise ConnectionError("Redis closed the connection")
        reply += chunk
    if reply != PONG:
        raise ValueError(f"unexpected reply {reply!r}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.pinger", description=__doc__)
    parser.add_argument("url")
    parser.add_argument("out")
    parser.add_argument("--interval", type=float, default=0.001)
    args = parser.parse_args(argv)
    running = True

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal running
        running = False

    signal.signal(signal.SIGTERM, stop)
    samples = array("q")
    sock = _connect(args.url)
    try:
        while running:
            sent, start = time.time_ns(), time.perf_counter_ns()
            _ping(sock)
            elapsed = time.perf_counter_ns() - start
            samples.extend((sent, elapsed))
            pause = args.interval - elapsed / 1e9
            if pause > 0:
                time.sleep(pause)
    finally:
        sock.close()
        with open(args.out, "wb") as out:
            samples.tofile(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
