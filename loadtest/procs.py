"""What a load test adds to the harness's launcher (:func:`harness.launch.start`): CPU sets to pin the service,
the bare app and locust to, CPU meters, the locust command line. Everything here talks to processes and HTTP
only; nothing imports the service.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import psutil

from harness.launch import Child, start

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[1]


def parse_cpus(text: str | None) -> list[int] | None:
    """'0' / '0,1' / '0-3' -> [0] / [0, 1] / [0, 1, 2, 3]; None or '' -> None (no pinning)."""
    if not text:
        return None
    cpus: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        cpus += list(range(int(lo), int(hi or lo) + 1))
    return cpus


def begin_run(
    out: Path, prefix: str, service_cpus: str, client_cpus: str
) -> tuple[Path, str, list[int] | None, list[int] | None]:
    """What every load tool does first: (resolved output folder with its logs/ made, a run id ``<prefix>MMDDhhmmss``
    plus 4 random hex digits, the service's CPUs, the clients' CPUs); this process moves onto the clients' CPUs."""
    out = out.resolve()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    run_id = f"{prefix}{datetime.now(UTC):%m%d%H%M%S}{uuid.uuid4().hex[:4]}"
    service, clients = parse_cpus(service_cpus), parse_cpus(client_cpus)
    if clients:
        os.sched_setaffinity(0, clients)
    return out, run_id, service, clients


def pin(pid: int, cpus: list[int] | None) -> None:
    """Pin every thread of a running process to cpus (taskset -a), when given."""
    if cpus and shutil.which("taskset"):
        subprocess.run(["taskset", "-a", "-cp", ",".join(map(str, cpus)), str(pid)], check=True, capture_output=True)


def thread_env(cpus: list[int] | None) -> dict[str, str]:
    """Thread counts that match a pinned CPU set (ONNX Runtime, OpenMP/FAISS, torch, BLAS)."""
    if not cpus:
        return {}
    n = str(len(cpus))
    return {"MISSREC_ONNX_THREADS": n, "OMP_NUM_THREADS": n, "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": n}


def serve_service(
    bundle: Path,
    port: int,
    log_dir: Path,
    env: dict[str, str],
    cpus: list[int] | None,
    name: str = "service",
    workers: int = 1,
) -> Child:
    """`missrec serve` (``workers`` uvicorn worker processes), the production command."""
    exe = str(Path(sys.executable).with_name("missrec"))
    args = [exe, "serve", "--bundle", str(bundle), "--host", "127.0.0.1", "--port", str(port)]
    args += ["--workers", str(workers)] if workers != 1 else []
    return start(name, args, log_dir, env | thread_env(cpus), cpus)


def serve_bare(port: int, log_dir: Path, cpus: list[int] | None) -> Child:
    """The bare app served like the service (uvicorn, 1 worker, log level info, no access log: the service's
    default since MISSREC_ACCESS_LOG; the bare endpoint gets every saving the service gets)."""
    args = [sys.executable, "-m", "uvicorn", "loadtest.bare_app:app", "--host", "127.0.0.1", "--port", str(port)]
    args += ["--workers", "1", "--log-level", "info", "--no-access-log", "--timeout-graceful-shutdown", "10"]
    return start("bare", args, log_dir, thread_env(cpus), cpus)


@dataclass
class CpuMeter:
    """Samples the CPU time (user + system, all threads) of some processes every ``period`` seconds."""

    pids: dict[str, int]
    period: float = 0.2
    samples: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __post_init__(self) -> None:
        self._procs = {name: psutil.Process(pid) for name, pid in self.pids.items()}
        self.samples = {name: [] for name in self.pids}

    def add(self, name: str, pid: int) -> None:
        self._procs[name] = psutil.Process(pid)
        self.samples[name] = []

    def _sample(self) -> None:
        now = time.time()
        for name, p in list(self._procs.items()):
            try:
                t = p.cpu_times()
                total = t.user + t.system
                for child in p.children(recursive=True):  # uvicorn --workers N: the workers are children
                    with contextlib.suppress(psutil.Error):
                        c = child.cpu_times()
                        total += c.user + c.system
                self.samples[name].append((now, total))
            except psutil.Error:
                pass

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self._sample()

    def __enter__(self) -> CpuMeter:
        self._sample()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()

    def usage(self, name: str, t_from: float, t_to: float) -> float | None:
        """Mean CPU use (1.0 = one core) of ``name`` between two wall-clock times (None without samples)."""
        s = [x for x in self.samples.get(name, []) if t_from <= x[0] <= t_to]
        if len(s) < 2 or s[-1][0] - s[0][0] <= 0:
            return None
        return (s[-1][1] - s[0][1]) / (s[-1][0] - s[0][0])

    def seconds(self, name: str, t_from: float, t_to: float) -> float | None:
        s = [x for x in self.samples.get(name, []) if t_from <= x[0] <= t_to]
        return s[-1][1] - s[0][1] if len(s) >= 2 else None


def locust_args(
    host: str, traffic: Path, out_prefix: Path, *, rate: float, users: int, duration: float, mix: str, tag: str, k: int
) -> list[str]:
    """The headless locust command line of one run (samples to out_prefix.csv, locust's CSVs next to it)."""
    args = [sys.executable, "-m", "locust", "-f", str(ROOT / "loadtest/locustfile.py"), "--headless"]
    args += ["-u", str(users), "-r", str(users), "-t", f"{duration:.0f}s", "--host", host, "--only-summary"]
    args += ["--loglevel", "WARNING", "--csv", str(out_prefix), "--traffic", str(traffic), "--rate", str(rate)]
    args += ["--samples-out", str(out_prefix.with_suffix(".csv")), "--mix", mix, "--tag", tag, "--k", str(k)]
    return args


def run_locust(
    host: str,
    traffic: Path,
    out_prefix: Path,
    *,
    rate: float,
    users: int,
    duration: float,
    mix: str,
    tag: str,
    cpus: list[int] | None,
    meter: CpuMeter,
    k: int = 10,
) -> Path:
    """One headless locust run (open loop at ``rate``, closed loop with ``users`` clients when rate is 0).

    Writes out_prefix.csv (every request), out_prefix.json, out_prefix_stats.csv etc. (locust's own CSVs) and
    returns the samples path. The generator's CPU is metered as 'locust'.
    """
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    samples = out_prefix.with_suffix(".csv")
    args = locust_args(host, traffic, out_prefix, rate=rate, users=users, duration=duration, mix=mix, tag=tag, k=k)
    child = start(out_prefix.name, args, out_prefix.parent / "logs", {}, cpus)
    meter.add("locust", child.pid)
    try:
        child.proc.wait(duration + 120)
    finally:
        child.stop()
    if not samples.is_file():
        raise RuntimeError(f"locust wrote no samples ({child.proc.returncode}):\n{child.tail()}")
    return samples
