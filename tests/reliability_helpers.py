"""Shared by the reliability tests and the long-run scripts (scripts/*.py): artefacts, a real service process,
and small HTTP helpers. The same scenario code runs CI-sized in tests/ and full-sized in scripts/."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MISSREC_SHARED", ROOT.parent / "shared"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----- artefacts (the scripts build them once under var/; the tests use the session fixtures) ---------------------
def build_scientific_bundle(out: Path, data: Path | None = None, epochs: int = 2) -> Path:
    """The same bundle as the ``scientific_bundle`` fixture: MISSRec trained on the REAL Scientific data."""
    from index_builder.build import build_index
    from missrec.data import load_dataset
    from missrec.runs import save_run, train_missrec
    from missrec.train import TrainOptions
    from model_export.onnx_export import export_bundle

    data = data or SHARED / "data" / "scientific"
    ds = load_dataset(data)
    run = train_missrec(ds, TrainOptions(epochs=epochs, progress=False), "inductive")
    save_run(run, ds, out / "run")
    export_bundle(out / "run" / "checkpoint.pt", data, out / "bundle", overwrite=True)
    build_index(out / "bundle", factory="Flat", device="cpu")
    return out / "bundle"


def script_artefacts(root: Path = ROOT / "var" / "reliability") -> tuple[Path, tuple[str, str]]:
    """(bundle, (clip model, checkpoint)) for the scripts: built once, reused while its checksums hold."""
    from missrec.clip_encoder import TINY_MODEL, save_random_init_checkpoint
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


# ----- the service as a real process ------------------------------------------------------------------------------
class ServiceProcess:
    """``uvicorn service.main:app`` in a child process (settings through MISSREC_* variables), so it can be
    SIGKILLed and restarted like a pod."""

    def __init__(self, env: dict[str, str], port: int | None = None, log_path: Path | None = None) -> None:
        self.env = env
        self.port = port or free_port()
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 120.0) -> float:
        """Start and wait for /readyz 200; returns the seconds it took."""
        env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", **self.env}
        out = self.log_path.open("ab") if self.log_path else subprocess.DEVNULL
        started = time.monotonic()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "service.main:app", "--host", "127.0.0.1", "--port", str(self.port)],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        deadline = started + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"service exited with {self.process.returncode} (log: {self.log_path})")
            try:
                if httpx.get(self.url + "/readyz", timeout=1.0).status_code == 200:
                    return time.monotonic() - started
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.kill()
        raise RuntimeError(f"service not ready within {timeout} s (log: {self.log_path})")

    def kill(self) -> None:
        """SIGKILL: no shutdown work, like an OOM kill or a node loss."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()
        self.process = None

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None


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


# ----- Redis outage under load ------------------------------------------------------------------------------------
@dataclass
class Call:
    kind: str
    start: float
    end: float
    status: int  # 0: the client got no HTTP answer (connection error or its own timeout)
    code: str | None = None
    user: str = ""  # events: the user (one per call) and the item written
    item: str = ""

    @property
    def seconds(self) -> float:
        return self.end - self.start


KINDS = ("recommend_user", "events", "recommend_history")


def _load_worker(url: str, ids: list[str], worker: int, stop: threading.Event, calls: list[Call]) -> None:
    user = f"outage-user-{worker}"
    with httpx.Client(base_url=url, timeout=10.0) as client:
        n = 0
        while not stop.is_set():
            kind = KINDS[n % len(KINDS)]
            n += 1
            started = time.monotonic()
            writer, item = (f"{user}-{n}", ids[n % len(ids)]) if kind == "events" else ("", "")
            try:
                if kind == "recommend_user":
                    r = client.post("/v1/recommend", json={"user_id": user, "k": 10})
                elif kind == "events":  # one user per call, so each write can be checked afterwards
                    r = client.post(f"/v1/users/{writer}/events", json={"item_ids": [item]})
                else:
                    r = client.post("/v1/recommend", json={"history": ids[:5], "k": 10})
                code = r.json().get("error", {}).get("code") if r.status_code >= 400 else None
                calls.append(Call(kind, started, time.monotonic(), r.status_code, code, writer, item))
            except httpx.HTTPError as exc:
                calls.append(Call(kind, started, time.monotonic(), 0, type(exc).__name__, writer, item))


def _poll_ready(url: str, stop: threading.Event, samples: list[tuple[float, int]]) -> None:
    with httpx.Client(base_url=url, timeout=5.0) as client:
        while not stop.is_set():
            try:
                samples.append((time.monotonic(), client.get("/readyz").status_code))
            except httpx.HTTPError:
                samples.append((time.monotonic(), 0))
            time.sleep(0.02)


@dataclass
class OutageReport:
    mode: str
    requests: int
    during_outage: int
    slowest_during_outage_s: float
    slowest_overall_s: float
    unexpected: list[Call]  # anything but 200 or 503 redis_unavailable (and 503 for by-history recommends)
    wrong_during_outage: list[Call]  # by-user recommends / events that did not get 503 redis_unavailable
    history_recommends_failed: int  # explicit-history recommends that failed at any time (decision: served)
    unready_after_s: float | None  # Redis down -> /readyz 503
    ready_after_s: float | None  # Redis back -> /readyz 200
    failed_after_return: int  # requests started after Redis was back that did not succeed
    recovered_after_s: float  # Redis back -> the last request (started after that) that failed ended
    events_acknowledged: int  # events answered 200
    acknowledged_found: int  # ... whose item is in the user's history exactly once afterwards
    events_refused: int  # events answered 503 (outcome unknown to the client)
    refused_applied: int  # ... whose write Redis applied anyway (sent before a pause, executed on resume)

    def lines(self) -> list[str]:
        fmt = lambda x: "never" if x is None else f"{x:.3f} s"  # noqa: E731
        return [
            f"mode {self.mode}: {self.requests} requests, {self.during_outage} during the outage",
            f"  slowest request during the outage {self.slowest_during_outage_s:.3f} s, overall "
            f"{self.slowest_overall_s:.3f} s",
            f"  unexpected answers {len(self.unexpected)}; by-user/events not 503 redis_unavailable during the "
            f"outage {len(self.wrong_during_outage)}; explicit-history recommends failed "
            f"{self.history_recommends_failed}",
            f"  /readyz unready {fmt(self.unready_after_s)} after Redis went down, ready {fmt(self.ready_after_s)} "
            f"after it came back; {self.failed_after_return} requests failed after it came back (all succeed again "
            f"{self.recovered_after_s:.3f} s after it came back)",
            f"  events acknowledged {self.events_acknowledged}, found exactly once {self.acknowledged_found}; "
            f"answered 503 {self.events_refused}, of which applied anyway {self.refused_applied}",
        ]


def run_outage(
    url: str,
    redis_server: RedisServer,
    ids: list[str],
    mode: str = "kill",
    workers: int = 6,
    before_s: float = 1.0,
    outage_s: float = 2.0,
    after_s: float = 2.0,
) -> OutageReport:
    """Load ``url`` from ``workers`` threads, take ``redis_server`` away for ``outage_s``
    (``kill``: SIGKILL then restart on the same port and data; ``stop``: SIGSTOP then SIGCONT, so calls time out
    instead of being refused), and measure failing fast, readiness and recovery."""
    stop = threading.Event()
    calls: list[Call] = []
    ready: list[tuple[float, int]] = []
    threads = [threading.Thread(target=_load_worker, args=(url, ids, w, stop, calls)) for w in range(workers)]
    threads.append(threading.Thread(target=_poll_ready, args=(url, stop, ready)))
    for t in threads:
        t.start()
    time.sleep(before_s)
    if mode == "kill":
        redis_server.kill()
    else:
        redis_server.pause()
    down = time.monotonic()
    time.sleep(outage_s)
    # From here Redis may answer before `up` is stamped (start() polls PING every 20 ms), so calls ending after
    # this are not "during the outage". With `up` as the boundary, one 10 s script run counted 8 by-user/events
    # calls "during" it that got a 200, which needs a live Redis: they ended in that gap.
    restarting = time.monotonic()
    if mode == "kill":
        redis_server.start()  # same port, same AOF: the data comes back
    else:
        redis_server.resume()
    up = time.monotonic()
    time.sleep(after_s)
    stop.set()
    for t in threads:
        t.join(30)

    def ok(c: Call) -> bool:
        return c.status == 200

    def outage_answer(c: Call) -> bool:
        return c.status == 503 and c.code == "redis_unavailable" and c.kind != "recommend_history"

    during = [c for c in calls if c.start >= down and c.end <= restarting]
    failed_after = [c for c in calls if c.start >= up and not ok(c)]
    acked = [c for c in calls if c.kind == "events" and c.status == 200]
    refused = [c for c in calls if c.kind == "events" and c.status == 503]
    with httpx.Client(base_url=url, timeout=10.0) as client:
        stored = {c.user: client.get(f"/v1/users/{c.user}/history").json()["item_ids"] for c in acked + refused}
    return OutageReport(
        mode=mode,
        requests=len(calls),
        during_outage=len(during),
        slowest_during_outage_s=max((c.seconds for c in during), default=0.0),
        slowest_overall_s=max((c.seconds for c in calls), default=0.0),
        unexpected=[c for c in calls if not (ok(c) or outage_answer(c))],
        wrong_during_outage=[c for c in during if c.kind != "recommend_history" and not outage_answer(c)],
        history_recommends_failed=sum(1 for c in calls if c.kind == "recommend_history" and not ok(c)),
        unready_after_s=next((t - down for t, s in ready if t >= down and s == 503), None),
        ready_after_s=next((t - up for t, s in ready if t >= up and s == 200), None),
        failed_after_return=len(failed_after),
        recovered_after_s=max((c.end - up for c in failed_after), default=0.0),
        events_acknowledged=len(acked),
        acknowledged_found=sum(1 for c in acked if stored[c.user] == [c.item]),
        events_refused=len(refused),
        refused_applied=sum(1 for c in refused if stored[c.user]),
    )
