"""The edge middleware over real sockets (uvicorn, the real Scientific bundle, real Redis): clients that send a body
slowly, or never finish it, hold no concurrency slot and are answered 408 and closed after the body timeout; a
saturated replica says so on /readyz."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import httpx
import pytest

from harness.launch import InProcessServer, bundle_ids
from tests.service_helpers import make_app

SLOTS = 4


def _slow_body(port: int, declared: int = 100_000) -> socket.socket:
    """A connection that sends the headers of a recommend call and one byte of its declared body, then nothing."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    head = (
        f"POST /v1/recommend HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        f"Content-Length: {declared}\r\n\r\n{{"
    )
    sock.sendall(head.encode())
    return sock


def _read_until_closed(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


@pytest.fixture
def server_of(scientific_bundle, redis_url, key_prefix, tiny_clip, tmp_path):
    running: list[InProcessServer] = []

    def start(**settings) -> InProcessServer:
        app = make_app(scientific_bundle, redis_url, key_prefix, tiny_clip, tmp_path, warmup=False, **settings)
        server = InProcessServer(app).__enter__()
        running.append(server)
        return server

    yield start
    for server in running:
        server.__exit__(None, None, None)


def test_slow_bodies_hold_no_slot_and_are_closed_after_the_body_timeout(server_of, scientific_bundle):
    server = server_of(max_concurrency=SLOTS, body_timeout_seconds=1.0)
    history = bundle_ids(scientific_bundle)[1:4]
    held = [_slow_body(server.port) for _ in range(4 * SLOTS)]
    try:
        time.sleep(0.3)  # every held request has reached the app
        with httpx.Client(base_url=server.url, timeout=10) as client:
            for _ in range(3):
                r = client.post("/v1/recommend", json={"history": history, "k": 5})
                assert r.status_code == 200, r.text
            assert client.get("/readyz").status_code == 200
        for sock in held:  # answered 408 and closed by the server (recv returns b"" before the 30 s socket timeout)
            answer = _read_until_closed(sock)
            assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
            assert b'"code":"body_timeout"' in answer.replace(b" ", b"")
    finally:
        for sock in held:
            sock.close()


def test_readyz_says_when_the_replica_is_saturated(server_of, scientific_bundle):
    server = server_of(max_concurrency=1)
    app = server.server.config.app
    release = threading.Event()

    async def hold() -> dict:  # a request that stays in processing until the test releases it
        await asyncio.to_thread(release.wait, 30)
        return {}

    app.add_api_route("/test/hold", hold, methods=["GET"])
    holder = threading.Thread(target=lambda: httpx.get(f"{server.url}/test/hold", timeout=30))
    holder.start()
    try:
        with httpx.Client(base_url=server.url, timeout=10) as client:
            deadline = time.monotonic() + 10
            while app.state.load.in_flight < 1:
                assert time.monotonic() < deadline, "the held request never reached the app"
                time.sleep(0.01)
            ready = client.get("/readyz")
            assert ready.status_code == 503
            assert ready.json()["checks"]["load"].startswith("saturated")
            busy = client.post("/v1/recommend", json={"history": bundle_ids(scientific_bundle)[1:3], "k": 5})
            assert busy.status_code == 503 and busy.json()["error"]["code"] == "overloaded"
            assert busy.headers["retry-after"] == "1"
            release.set()
            holder.join(10)
            assert client.get("/readyz").status_code == 200
    finally:
        release.set()
        holder.join(10)


def test_every_answer_says_nosniff_and_binary_ones_run_nothing(server_of):
    """A thumbnail (here of a JPEG whose comment is a script), JSON, /metrics and the middleware's own errors carry
    ``X-Content-Type-Options: nosniff`` and a CSP that runs nothing; the console keeps its own CSP."""
    from tests.service.test_thumbnail import SCRIPT, _jpeg_with_metadata

    server = server_of()
    with httpx.Client(base_url=server.url, timeout=30) as client:
        r = client.post("/v1/items", data={"item_id": "polyglot", "text": "a red square"},
                        files={"image": ("p.jpg", _jpeg_with_metadata(), "image/jpeg")})  # fmt: skip
        assert r.status_code == 201, r.text
        image = client.get("/v1/items/polyglot/image")
        assert image.status_code == 200 and image.headers["content-type"] == "image/jpeg"
        assert SCRIPT not in image.content
        answers = [
            image,
            client.get("/metrics"),
            client.get("/v1/items/no-such-item"),
            client.post("/v1/recommend", content=b"{}", headers={"content-encoding": "gzip"}),  # middleware's 415
        ]
        for answer in answers:
            assert answer.headers["x-content-type-options"] == "nosniff", answer.request.url
            assert answer.headers["content-security-policy"] == "default-src 'none'; frame-ancestors 'none'; sandbox"
        console = client.get("/console/")
        assert console.headers["x-content-type-options"] == "nosniff"
        assert "script-src" in console.headers["content-security-policy"]
