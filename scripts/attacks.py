"""The attacks of issue 22 at full size, against the service as a real uvicorn process with a redis-server of its own
and the bundle scripts/reliability.py builds on the real Scientific data; their figures are in docs/reliability.md
(section 9, "At full size").

    flock /tmp/missrec-cpu.lock .venv/bin/python scripts/attacks.py slow-bodies [--sockets 512] [--body-timeout 5]
    flock /tmp/missrec-cpu.lock .venv/bin/python scripts/attacks.py shadow-leak [--cycles 30]

snapshot-memory and overload are scripts/attacks_load.py (this file's helpers shared).
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated

import typer
from reliability import _workdir  # scripts/reliability.py, beside this file (the scenarios' work folders)

from harness.launch import RedisServer, ServiceProcess, bundle_ids, script_artefacts, service_env

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="The attacks of issue 22 at full size: slow-bodies, shadow-leak (snapshot-memory, overload: attacks_load.py).",
)


API_KEY = "reliability-admin-key-0123456789"


def _ms(xs: list[float], p: float) -> str:
    """The p-th percentile of seconds, in ms ('-' without samples)."""
    import numpy as np

    return f"{1000 * float(np.percentile(xs, p)):.1f}" if xs else "-"


def _rss_mib(pid: int, field: str = "VmRSS") -> float:
    with open(f"/proc/{pid}/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(field + ":")) / 1024


def _statuses(codes: list) -> str:
    """'value: count, ...' of status codes (or status lines), in order."""
    from collections import Counter

    return ", ".join(f"{code}: {n}" for code, n in sorted(Counter(codes).items(), key=lambda kv: str(kv[0]))) or "-"


def _recommend_clients(url: str, ids: list[str], stop, out: list[tuple[float, int, float]], threads: int) -> list:
    """``threads`` clients sending recommend requests back to back until ``stop``: (start time, status, seconds)."""
    import threading

    import httpx

    def worker(w: int) -> None:
        with httpx.Client(base_url=url, timeout=30) as client:
            n = w
            while not stop.is_set():
                history = [ids[(n + j) % len(ids)] for j in range(5)]
                began = time.monotonic()
                try:
                    status = client.post("/v1/recommend", json={"history": history, "k": 10}).status_code
                except httpx.HTTPError:
                    status = 0
                out.append((began, status, time.monotonic() - began))
                n += threads

    pool = [threading.Thread(target=worker, args=(w,), daemon=True) for w in range(threads)]
    for t in pool:
        t.start()
    return pool


def _readyz_poller(url: str, stop, out: list[tuple[float, int]], every: float = 0.1):
    import threading

    import httpx

    def poll() -> None:
        with httpx.Client(base_url=url, timeout=5) as client:
            while not stop.wait(every):
                began = time.monotonic()
                try:
                    out.append((began, client.get("/readyz").status_code))
                except httpx.HTTPError:
                    out.append((began, 0))

    t = threading.Thread(target=poll, daemon=True)
    t.start()
    return t


def _hold_slow_bodies(port: int, n: int, seconds: float) -> tuple[list[tuple[int, float, str]], list[float]]:
    """Keep ``n`` connections open for ``seconds``, each having sent the headers of a recommend POST declaring a
    100 kB body and 1 byte of it; a connection the server closes is replaced at once. Returns (opening order,
    lifetime, the status line the server sent before closing) of every closed one and the ages of those still open
    at the end."""
    import selectors
    import socket

    head = (
        f"POST /v1/recommend HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        "Content-Length: 100000\r\n\r\n{"
    ).encode()
    sel = selectors.DefaultSelector()
    opened = iter(range(1 << 30))

    def open_one() -> None:
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.sendall(head)
        sock.setblocking(False)
        sel.register(sock, selectors.EVENT_READ, {"n": next(opened), "opened": time.monotonic(), "answer": b""})

    for _ in range(n):
        open_one()
    closed: list[tuple[int, float, str]] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for key, _ in sel.select(0.05):
            sock, info = key.fileobj, key.data
            try:
                chunk = sock.recv(4096)
            except BlockingIOError:
                continue
            except OSError:
                chunk = b""
            if chunk:
                info["answer"] += chunk[:200]
                continue
            now = time.monotonic()
            line = info["answer"].split(b"\r\n", 1)[0].decode("latin-1") or "(closed without an answer)"
            closed.append((info["n"], now - info["opened"], line))
            sel.unregister(sock)
            sock.close()
            open_one()
    now = time.monotonic()
    still = [now - key.data["opened"] for key in list(sel.get_map().values())]
    for key in list(sel.get_map().values()):
        sel.unregister(key.fileobj)
        key.fileobj.close()
    return closed, still


@app.command("slow-bodies")
def slow_bodies(
    sockets: Annotated[int, typer.Option(help="Connections held at once (the issue: 512).")] = 512,
    body_timeout: Annotated[
        float, typer.Option(help="MISSREC_BODY_TIMEOUT_SECONDS of the service (default 10; short here to be quick).")
    ] = 5.0,
    attack: Annotated[float, typer.Option(help="Seconds the attacker keeps the sockets held (reconnecting).")] = 15.0,
    clients: Annotated[int, typer.Option(help="Real clients sending recommend requests back to back.")] = 4,
) -> None:
    """512 connections each sending a recommend POST's headers plus 1 byte of a declared 100 kB body, held open
    and reopened as the server closes them, while real clients send recommend requests; MISSREC_MAX_CONCURRENCY
    at its default."""
    import resource
    import threading

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4 * sockets:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4 * sockets + 1024), hard))
    bundle, clip = script_artefacts()
    ids = bundle_ids(bundle)[1:200]
    work = _workdir("slow-bodies")
    redis_server = RedisServer(work / "redis").start()
    env = service_env(
        bundle, redis_server.url, f"slow-{uuid.uuid4().hex[:6]}", clip, work, body_timeout_seconds=body_timeout
    )
    service = ServiceProcess(env, log_path=work / "service.log")
    try:
        print(
            f"service ready in {service.start():.1f} s; fd limit {resource.getrlimit(resource.RLIMIT_NOFILE)[0]}, "
            f"MISSREC_BODY_TIMEOUT_SECONDS={body_timeout:g}, MISSREC_MAX_CONCURRENCY default",
            flush=True,
        )
        stop = threading.Event()
        requests: list[tuple[float, int, float]] = []
        probes: list[tuple[float, int]] = []
        pool = _recommend_clients(service.url, ids, stop, requests, clients)
        pool.append(_readyz_poller(service.url, stop, probes))
        time.sleep(3.0)
        attack_from = time.monotonic()
        closed, still = _hold_slow_bodies(service.port, sockets, attack)
        attack_to = time.monotonic()
        time.sleep(3.0)
        stop.set()
        for t in pool:
            t.join(60)
        service_alive = service.child is not None and service.child.alive()
    finally:
        service.stop()
        redis_server.stop()

    def phase(t: float) -> str:
        return "before" if t < attack_from else "during the attack" if t < attack_to else "after"

    print("| phase | recommend requests (status: count) | p50 ms | p99 ms | /readyz (status: count) |")
    print("|---|---|---|---|---|")
    for name in ("before", "during the attack", "after"):
        mine = [r for r in requests if phase(r[0]) == name]
        ok = [r[2] for r in mine if r[1] == 200]
        ready = [p[1] for p in probes if phase(p[0]) == name]
        print(f"| {name} | {_statuses([r[1] for r in mine])} | {_ms(ok, 50)} | {_ms(ok, 99)} | {_statuses(ready)} |")
    first_wave = [c for c in closed if c[0] < sockets]
    print(
        f"\nattack: {sockets} held sockets for {attack:g} s, each replaced when closed: {sockets + len(closed)} opened"
    )
    print("| held sockets | closed by the server | their answer (count) | lifetime min / p50 / max s |")
    print("|---|---|---|---|")
    for label, group in (("first wave (opened at the start)", first_wave), ("all", closed)):
        life = sorted(c[1] for c in group)
        answers = _statuses([c[2] for c in group])
        span = f"{life[0]:.2f} / {life[len(life) // 2]:.2f} / {life[-1]:.2f}" if life else "-"
        print(f"| {label} | {len(group)} | {answers} | {span} |")
    print(
        f"still open at the end of the attack: {len(still)} (oldest {max(still, default=0):.2f} s); "
        f"service alive: {service_alive}"
    )
    during = [r for r in requests if phase(r[0]) == "during the attack"]
    if not service_alive or not during or any(r[1] != 200 for r in during) or max(still, default=0) > body_timeout + 2:
        raise typer.Exit(1)


def _shadow_state(client) -> dict:
    r = client.get("/v1/admin/shadow")
    r.raise_for_status()
    return r.json()


@app.command("shadow-leak")
def shadow_leak(
    cycles: Annotated[int, typer.Option(help="Start-a-shadow-and-stop-it-while-it-loads cycles (the issue: 30).")] = 30,
    every: Annotated[int, typer.Option(help="Print the service's RSS every this many cycles.")] = 5,
) -> None:
    """Start a shadow of a candidate bundle (a copy of the serving one) and stop it while it loads, ``cycles`` times,
    one text-only ingest per cycle (a leaked candidate would follow it); the service's RSS (VmRSS) as it goes."""
    import shutil

    import httpx

    bundle, clip = script_artefacts()
    candidate = bundle.parent / "candidate"  # inside the default bundle root (the serving bundle's parent)
    if not candidate.is_dir():
        shutil.copytree(bundle, candidate)
    work = _workdir("shadow-leak")
    redis_server = RedisServer(work / "redis").start()
    env = service_env(bundle, redis_server.url, f"shadow-{uuid.uuid4().hex[:6]}", clip, work, api_key=API_KEY)
    service = ServiceProcess(env, log_path=work / "service.log")
    rows: list[tuple[str, float, str, str]] = []
    try:
        print(f"service ready in {service.start():.1f} s", flush=True)
        pid = service.child.pid
        with httpx.Client(base_url=service.url, headers={"X-API-Key": API_KEY}, timeout=60) as client:
            rows.append(("start", _rss_mib(pid), _shadow_state(client)["state"], "-"))
            began = time.monotonic()  # one complete load first: how long a load takes, and the warm baseline
            assert client.put("/v1/admin/shadow", json={"bundle": "candidate", "fraction": 1.0}).status_code == 202
            while (state := _shadow_state(client)["state"]) == "loading":
                time.sleep(0.01)
            load_s = time.monotonic() - began
            assert state == "active", state
            assert client.delete("/v1/admin/shadow").status_code == 204
            rows.append((f"after one complete load ({load_s:.2f} s) and stop", _rss_mib(pid), "off", "-"))
            loading_at_stop = 0
            for n in range(1, cycles + 1):
                r = client.put("/v1/admin/shadow", json={"bundle": "candidate", "fraction": 1.0})
                assert r.status_code == 202, r.text
                time.sleep(load_s * (0.1 + 0.8 * ((n * 7) % 10) / 10))  # somewhere inside the load
                loading_at_stop += _shadow_state(client)["state"] == "loading"
                assert client.delete("/v1/admin/shadow").status_code == 204
                item = {"item_id": f"shadow-leak-{n}", "text": f"an item ingested in cycle {n}"}
                assert client.post("/v1/items", json=item).status_code == 201
                if n % every == 0 or n == cycles:
                    rows.append((f"cycle {n}", _rss_mib(pid), _shadow_state(client)["state"], str(loading_at_stop)))
            time.sleep(2.0)
            final = _shadow_state(client)
            rows.append(("2 s after the last cycle", _rss_mib(pid), final["state"], str(loading_at_stop)))
    finally:
        service.stop()
        redis_server.stop()
    print("| when | service RSS MiB | GET /v1/admin/shadow state | stops that found it loading |")
    print("|---|---|---|---|")
    for when, rss, state, loading in rows:
        print(f"| {when} | {rss:.0f} | {state} | {loading} |")
    base = rows[1][1]
    print(f"RSS growth over {cycles} cycles: {rows[-1][1] - base:+.0f} MiB (from the warm baseline); final: {final}")


if __name__ == "__main__":
    app()
