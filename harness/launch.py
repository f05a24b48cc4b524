"""Launchers shared by the tests, the load tests and the scripts: free ports, a redis-server of one's own, the
service as a real process or in this process behind uvicorn, the Scientific artefacts, small HTTP helpers.

Scripts import this installed package, never ``tests/``; the same scenario code (harness.outage, .fuzz,
.durability) runs CI-sized in tests/ and full-sized in scripts/."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from harness.ports import free_port

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MISSREC_SHARED", ROOT.parent / "shared"))


# ----- artefacts (the scripts build them once under var/; the tests use the session fixtures) ---------------------
def build_scientific_bundle(out: Path, data: Path | None = None, epochs: int = 2) -> Path:
    """The same bundle as the ``scientific_bundle`` fixture: MISSRec trained on the REAL Scientific data."""
    from missrec_cli.pipeline import train_export_index

    bundle, _, _ = train_export_index(data or SHARED / "data" / "scientific", out, epochs=epochs, progress=False)
    return bundle


def script_artefacts(root: Path = ROOT / "var" / "reliability") -> tuple[Path, tuple[str, str]]:
    """(bundle, (clip model, checkpoint)) for the scripts: built once, reused while its checksums hold."""
    from clip_features.torch_encoder import TINY_MODEL, save_random_init_checkpoint
    from serving_core.bundle import BundleError, verify_checksums

    bundle = root / "bundle"
    try:
        verify_checksums(bundle)
    except BundleError:
        print(f"building a bundle on the real Scientific data under {root} (once)", flush=True)
        build_scientific_bundle(root)
    clip = root / "clip-tiny.pt"
    if not clip.is_file():
        save_random_init_checkpoint(TINY_MODEL, clip, seed=0)
    return bundle, (TINY_MODEL, str(clip))


def bundle_ids(bundle: Path) -> list[str]:
    """External item ids of a bundle; row 0 is padding."""
    return json.loads((bundle / "items" / "ids.json").read_text())


# ----- child processes: the one launcher of the tests, the load tests and the scripts --------------------------
@dataclass
class Child:
    """A child process with its log file; stop() sends SIGTERM, then SIGKILL after a grace period."""

    name: str
    proc: subprocess.Popen
    log_path: Path | None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, grace: float = 15.0) -> None:
        if self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop in %.0f s: killing it", self.name, grace)
            self.proc.kill()
            self.proc.wait()

    def kill(self) -> None:
        """SIGKILL and reap (a no-op when it already exited)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def tail(self, n: int = 30) -> str:
        if self.log_path is None:
            return ""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def start(
    name: str, args: list[str], output: Path | None, env: dict[str, str] | None = None, cpus: list[int] | None = None
) -> Child:
    """Start ``args`` in the repository root with this checkout first on PYTHONPATH (prefixed with taskset when
    ``cpus`` are given), output to ``output`` (a folder: ``output/<name>.log``; a ``.log`` file: appended; None:
    discarded)."""
    log_path = None if output is None else (output if output.suffix == ".log" else output / f"{name}.log")
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
    if cpus and shutil.which("taskset"):
        args = ["taskset", "-c", ",".join(map(str, cpus)), *args]
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    with log_path.open("ab") if log_path is not None else contextlib.nullcontext(subprocess.DEVNULL) as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=full_env, cwd=ROOT)
    log.info("started %s (pid %d)%s: %s", name, proc.pid, f" on cpus {cpus}" if cpus else "", " ".join(args[-8:]))
    return Child(name, proc, log_path)


def wait_ready(url: str, child: Child | None = None, timeout: float = 600.0, poll: float = 0.25) -> float:
    """Wait until GET url/readyz is 200; returns the seconds it took. RuntimeError as soon as the child died,
    TimeoutError after ``timeout``."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if child is not None and not child.alive():
            raise RuntimeError(f"{child.name} exited ({child.proc.returncode}):\n{child.tail()}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2.0).status_code == 200:
                return time.monotonic() - started
        except httpx.HTTPError:
            pass
        time.sleep(poll)
    raise TimeoutError(f"{url} was not ready within {timeout:.0f} s")


# ----- the service as a real process ------------------------------------------------------------------------------
class ServiceProcess:
    """``uvicorn service.main:app`` in a child process (settings through MISSREC_* variables), so it can be
    SIGKILLed and restarted like a pod. Launched by :func:`start`, like every child of the tests and tools."""

    def __init__(self, env: dict[str, str], port: int | None = None, log_path: Path | None = None) -> None:
        self.env = env
        self.port = port or free_port()
        self.log_path = log_path
        self.child: Child | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def process(self) -> subprocess.Popen | None:
        return self.child.proc if self.child is not None else None

    def start(self, timeout: float = 120.0) -> float:
        """Start and wait for /readyz 200; returns the seconds it took."""
        args = [sys.executable, "-m", "uvicorn", "service.main:app", "--host", "127.0.0.1", "--port", str(self.port)]
        self.child = start("service", args, self.log_path, {"OPENBLAS_NUM_THREADS": "1", **self.env})
        try:
            return wait_ready(self.url, self.child, timeout, poll=0.1)
        except TimeoutError:
            self.kill()
            raise RuntimeError(f"service not ready within {timeout} s (log: {self.log_path})") from None

    def kill(self) -> None:
        """SIGKILL: no shutdown work, like an OOM kill or a node loss."""
        if self.child is not None:
            self.child.kill()
        self.child = None

    def stop(self) -> None:
        if self.child is not None:
            self.child.stop(grace=15.0)
        self.child = None


def service_env(bundle: Path, redis_url: str, prefix: str, clip: tuple[str, str], data_dir: Path, **extra: str):
    env = {
        "MISSREC_BUNDLE": str(bundle),
        "MISSREC_REDIS_URL": redis_url,
        "MISSREC_KEY_PREFIX": prefix,
        "MISSREC_CLIP_MODEL": clip[0],
        "MISSREC_CLIP_PRETRAINED": clip[1],
        "MISSREC_DATA_DIR": str(data_dir),
        "MISSREC_MAX_WAIT_MS": "1",
    }
    return env | {f"MISSREC_{k.upper()}": str(v) for k, v in extra.items()}


# ----- error shape ----------------------------------------------------------------------------------------------
def is_error_body(body: object) -> bool:
    """True when ``body`` is the service's one error shape ``{"error": {"code", "message", "details"}}``."""
    if not isinstance(body, dict) or set(body) != {"error"} or not isinstance(body["error"], dict):
        return False
    err = body["error"]
    return (
        set(err) == {"code", "message", "details"}
        and isinstance(err["code"], str)
        and isinstance(err["message"], str)
        and bool(err["message"])
        and isinstance(err["details"], dict)
    )


# ----- a redis-server of the test's own ------------------------------------------------------------------------------
class RedisServer:
    """A real redis-server on a TCP port with AOF (``appendfsync always``) in ``data_dir``, which a test may kill,
    restart (same port, same data), pause (SIGSTOP) and resume; ``aof=False``: no persistence (restarts empty).

    Started with a plain ``subprocess.Popen`` (vfork/posix_spawn): a fork() with Python code in the child would
    run OpenBLAS's at-fork handler, which hangs a matrix product running at that moment in another thread of the
    test process (measured: the in-process service froze on its first recommend after a restart)."""

    def __init__(self, data_dir: Path, port: int | None = None, aof: bool = True) -> None:
        self.data_dir = Path(data_dir)
        self.port = port or free_port()
        self.aof = aof
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        import redis

        from service.embedded_redis import redis_server_binary

        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [redis_server_binary(), "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.data_dir)]
        args += ["--appendonly", "yes" if self.aof else "no", "--appendfsync", "always", "--save", ""]
        args += ["--logfile", "redis.log"]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with redis.Redis.from_url(self.url, socket_timeout=0.5) as client:
                    client.ping()
                return self
            except (redis.ConnectionError, redis.TimeoutError):
                time.sleep(0.02)
        raise RuntimeError(f"redis-server on port {self.port} did not answer within {timeout} s")

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def pause(self) -> None:
        os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.process.pid, signal.SIGCONT)

    def stop(self) -> None:
        if self.process is not None:
            self.resume()
            self.process.terminate()
            self.process.wait(10)
            self.process = None


# ----- the service in this process, behind a real HTTP server ---------------------------------------------------
class InProcessServer:
    """uvicorn serving ``app`` on a free port from a background thread (lifespan included)."""

    def __init__(self, app: object, port: int | None = None) -> None:
        import uvicorn

        self.port = port or free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> InProcessServer:
        self.thread.start()
        deadline = time.monotonic() + 120
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the in-process server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(30)


# ----- the service in this process --------------------------------------------------------------------------------
def make_app(bundle: Path, redis_url: str, key_prefix: str, tiny_clip: tuple[str, str], tmp: Path, **extra: Any):
    """The service app on ``bundle`` (ingestion with the given open_clip model and checkpoint), 1 ms linger."""
    from service.app import create_app
    from service.settings import Settings

    settings = Settings(
        bundle=bundle,
        redis_url=redis_url,
        key_prefix=key_prefix,
        clip_model=tiny_clip[0],
        clip_pretrained=tiny_clip[1],
        data_dir=tmp,
        **({"max_wait_ms": 1.0} | extra),
    )
    return create_app(settings)
