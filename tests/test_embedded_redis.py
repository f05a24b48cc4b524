"""The embedded Redis: persistence across restarts, no orphan after the service is killed, adoption."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import redis

from service.embedded_redis import EmbeddedRedis

ROOT = Path(__file__).resolve().parents[1]


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
