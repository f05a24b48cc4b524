"""The embedded Redis: persistence across restarts, no orphan after the service is killed, adoption."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import redis

from service.embedded_redis import EmbeddedRedis
from tests.paths import ROOT

pytestmark = pytest.mark.slow  # the process tier: services and redis-servers as subprocesses, killed


def test_acknowledged_writes_survive_a_restart(tmp_path):
    server = EmbeddedRedis(tmp_path)
    client = redis.Redis.from_url(server.start())
    client.rpush("k", "a", "b")
    client.close()
    server.kill()  # SIGKILL: no shutdown work; the append-only file (fsync always) must hold the write
    client = redis.Redis.from_url(server.start())
    assert client.lrange("k", 0, -1) == [b"a", b"b"]
    client.close()
    server.stop()
    assert (tmp_path / "appendonly.aof").exists() or (tmp_path / "appendonlydir").exists()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_server_dies_with_a_killed_service_and_is_not_started_twice(tmp_path):
    code = (
        f"import sys, time; sys.path.insert(0, {str(ROOT)!r})\n"
        "from service.embedded_redis import EmbeddedRedis\n"
        f"e = EmbeddedRedis({str(tmp_path)!r}); e.start(); print(e.process.pid, flush=True); time.sleep(60)\n"
    )
    service = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    redis_pid = int(service.stdout.readline())
    os.kill(service.pid, signal.SIGKILL)
    service.wait()
    deadline = time.monotonic() + 5
    while _alive(redis_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(redis_pid), "the embedded redis-server outlived the killed service"
    # a server that is still running (another process owns it) is adopted, not duplicated
    owner = EmbeddedRedis(tmp_path)
    owner.start()
    second = EmbeddedRedis(tmp_path)
    assert second.start() == owner.url and second.process is None
    owner.stop()


def test_service_restarts_a_killed_embedded_redis(scientific_bundle, tiny_clip, tmp_path):
    """SIGKILL the embedded redis-server under a running service: it comes back by itself on the same AOF (before:
    /readyz 503 and writes 503 for good, /healthz 200, the child a zombie), and no acknowledged write is lost."""
    from fastapi.testclient import TestClient

    from tests.service_helpers import make_app

    app = make_app(scientific_bundle, None, "embedded", tiny_clip, tmp_path, warmup=False)
    with TestClient(app) as c:
        item = c.post("/v1/recommend", json={"history": [], "k": 1}).json()["items"][0]["item_id"]
        for n in range(5):
            assert c.post(f"/v1/users/u{n}/events", json={"item_ids": [item]}).status_code == 200
        killed = app.state.service.embedded.process.pid
        os.kill(killed, signal.SIGKILL)
        down = time.monotonic()
        while c.get("/readyz").status_code == 200 and time.monotonic() - down < 5:
            time.sleep(0.01)
        while c.get("/readyz").status_code != 200:
            assert time.monotonic() - down < 15, "the service did not bring its embedded Redis back in 15 s"
            time.sleep(0.05)
        print(f"embedded Redis SIGKILLed: ready again after {time.monotonic() - down:.2f} s")  # docs/reliability.md
        assert c.get("/healthz").status_code == 200
        assert not _alive(killed) and not os.path.exists(f"/proc/{killed}"), "the killed child was not reaped"
        for n in range(5):
            assert c.get(f"/v1/users/u{n}/history").json()["item_ids"] == [item]
        assert c.post("/v1/users/u-after/events", json={"item_ids": [item]}).status_code == 200


def test_ctrl_c_stops_the_service_without_restarting_its_embedded_redis(scientific_bundle, tmp_path):
    """Ctrl-C in a terminal sends SIGINT to the whole foreground process group: the embedded redis-server must not
    get it (it would die first, and the supervisor restart it during the shutdown); the service stops the
    supervisor, then Redis."""
    from harness.launch import wait_ready
    from harness.ports import free_port

    port = free_port()
    env = {
        **os.environ, "PYTHONPATH": str(ROOT), "MISSREC_BUNDLE": str(scientific_bundle),
        "MISSREC_DATA_DIR": str(tmp_path), "MISSREC_CLIP_PRETRAINED": "", "MISSREC_WARMUP": "false",
    }  # fmt: skip
    env.pop("MISSREC_REDIS_URL", None)
    log = tmp_path / "service.log"
    with log.open("wb") as out:
        service = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "service.main:app", "--port", str(port)],
            stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True,  # a terminal's job
        )  # fmt: skip
    try:
        wait_ready(f"http://127.0.0.1:{port}", None, 120)
        os.killpg(service.pid, signal.SIGINT)  # what Ctrl-C does
        assert service.wait(60) == 0
    finally:
        if service.poll() is None:
            service.kill()
            service.wait()
    text = log.read_text(errors="replace")
    assert "restarting it on its append-only file" not in text and "embedded Redis restarted" not in text, text
