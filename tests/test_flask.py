"""A Flask app pushes, through ``quart_wslb.flask``, to clients of real Quart instances."""

from __future__ import annotations

import asyncio
import json
import threading
from collections import Counter
from collections.abc import Callable

import pytest
from flask import Flask, current_app, request

from quart_wslb import MetadataSelector, UserSelector
from quart_wslb.flask import WsLoadBalance
from tests.cluster import Clients, Cluster

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]
StartCluster = Callable[..., Cluster]


def make_flask_app(redis_url: str, prefix: str, **config: str) -> Flask:
    app = Flask(__name__)
    app.config.update(WSLB_REDIS_URL=redis_url, WSLB_PREFIX=prefix, **config)
    WsLoadBalance(app)

    @app.post("/notify/<user>")
    def notify(user: str) -> dict[str, int]:
        routed = current_app.wslb.send(UserSelector(user), request.get_json())  # type: ignore[attr-defined]
        return {"routed": routed}

    @app.get("/online/<room>")
    def online(room: str) -> dict[str, object]:
        selector = MetadataSelector(room=room)
        wslb = current_app.wslb  # type: ignore[attr-defined]
        return {"count": wslb.count(selector), "users": sorted(wslb.users(selector))}

    return app


async def test_flask_view_sends_to_quart_clients(
    start_cluster: StartCluster, clients: Clients, redis_url: str, prefix: str
) -> None:
    cluster = start_cluster(2)
    alice, _ = await clients.join(cluster[0], "alice", "red")
    bob, _ = await clients.join(cluster[1], "bob", "red")
    app = make_flask_app(redis_url, prefix)
    web = app.test_client()
    answer = await asyncio.to_thread(web.post, "/notify/alice", json={"hi": "alice"})
    assert answer.get_json() == {"routed": 1}
    assert json.loads(await asyncio.wait_for(alice.recv(), 5)) == {"hi": "alice"}
    answer = await asyncio.to_thread(web.post, "/notify/nobody", json={})
    assert answer.get_json() == {"routed": 0}
    online = (await asyncio.to_thread(web.get, "/online/red")).get_json()
    assert online == {"count": 2, "users": ["alice", "bob"]}
    assert "wslb" in app.extensions
    app.extensions["wslb"].close()
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(bob.recv(), 0.3)


async def test_flask_with_the_cluster_secret_signs_its_sends(
    start_cluster: StartCluster, clients: Clients, redis_url: str, prefix: str
) -> None:
    secret = "k1:the-flask-and-quart-secret"
    cluster = start_cluster(1, WSLB_SECRET=secret)
    alice, _ = await clients.join(cluster[0], "alice", "red")
    app = make_flask_app(redis_url, prefix, WSLB_SECRET=secret)
    answer = await asyncio.to_thread(app.test_client().post, "/notify/alice", json=[1])
    assert answer.get_json() == {"routed": 1}
    assert json.loads(await asyncio.wait_for(alice.recv(), 5)) == [1]
    assert "dropped_unsigned" not in await cluster[0].stats()
    app.extensions["wslb"].close()


def test_flask_reads_only_the_options_it_uses(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Quart instances' options (pings, ids, queues) are none of a Flask app's
    business: a value that they would refuse does not fail it."""
    monkeypatch.setenv("WSLB_PING_INTERVAL", "soon")
    monkeypatch.setenv("WSLB_REDIS_TIMEOUT", "0.5")
    app = Flask(__name__)
    app.config.update(WSLB_PREFIX="flask", WSLB_IDLE_TIMEOUT=-1, WSLB_INSTANCE_ID="a:b")
    emitter = WsLoadBalance(app, redis_max_connections=5).emitter
    assert emitter is not None and emitter.options.prefix == "flask"
    assert (emitter.timeout, emitter.options.max_connections) == (0.5, 5)
    emitter.close()


@pytest.mark.parametrize("secret", ["", {}])
def test_flask_empty_secret_is_an_error(secret: object) -> None:
    app = Flask(__name__)
    app.config.update(WSLB_SECRET=secret)
    with pytest.raises(ValueError):
        WsLoadBalance(app)


async def test_flask_many_threads_each_message_arrives_once(
    start_cluster: StartCluster, clients: Clients, redis_url: str, prefix: str
) -> None:
    cluster = start_cluster(2)
    alice, _ = await clients.join(cluster[0], "alice")
    bob, _ = await clients.join(cluster[1], "bob")
    app = make_flask_app(redis_url, prefix)
    routed: list[int] = []
    lock = threading.Lock()

    def worker(n: int) -> None:
        web = app.test_client()
        for i in range(25):
            user = ("alice", "bob")[(n + i) % 2]
            answer = web.post(f"/notify/{user}", json={"n": n, "i": i})
            with lock:
                routed.append(answer.get_json()["routed"])

    def run_all() -> None:
        threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)

    await asyncio.to_thread(run_all)
    assert routed == [1] * 200
    got: Counter[tuple[int, int]] = Counter()
    for client in (alice, bob):
        for _ in range(100):
            message = json.loads(await asyncio.wait_for(client.recv(), 5))
            got[(message["n"], message["i"])] += 1
    assert set(got.values()) == {1} and len(got) == 200
    for client in (alice, bob):
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(client.recv(), 0.3)
    app.extensions["wslb"].close()
