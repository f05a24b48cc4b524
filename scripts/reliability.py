"""Reliability scenarios at full size (the CI-sized versions are tests/harness/test_fuzz.py, test_reliability.py and
test_durability.py); their figures are in docs/reliability.md.

    flock /tmp/missrec-cpu.lock .venv/bin/python scripts/reliability.py fuzz [--examples 60] [--random]
    flock /tmp/missrec-cpu.lock .venv/bin/python scripts/reliability.py outage [--mode kill|stop|both] [--outage 10]
    flock /tmp/missrec-cpu.lock .venv/bin/python scripts/reliability.py durability [--rounds 4] [--threads 6]
    flock /tmp/missrec-cpu.lock .venv/bin/python scripts/reliability.py images [--vit] [--seconds 15]
    flock /tmp/missrec-cpu.lock .venv/bin/python scripts/reliability.py slow-bodies [--sockets 512] [--body-timeout 5]
    flock /tmp/missrec-cpu.lock .venv/bin/python scripts/reliability.py shadow-leak [--cycles 30]
    flock /tmp/missrec-cpu.lock .venv/bin/python scripts/reliability.py snapshot-memory [--events 3000000]
    flock /tmp/missrec-cpu.lock .venv/bin/python scripts/reliability.py overload [--factor 1.75] [--seconds 20]

Every scenario uses real components: a bundle trained on the real Scientific data (built once under
var/reliability/), a redis-server of its own (AOF, appendfsync always), the real ABO photos through open_clip
(random-init weights: none can be downloaded here), and the service as a real uvicorn process where it is killed.
"""

from __future__ import annotations

import tempfile
import time
import uuid
from pathlib import Path
from typing import Annotated

import typer

from harness.launch import ROOT, SHARED, RedisServer, ServiceProcess, bundle_ids, script_artefacts, service_env
from harness.outage import run_outage

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Reliability scenarios at full size: fuzz, outage, durability, images, and the attacks of issue 22 "
    "(slow-bodies, shadow-leak, snapshot-memory, overload).",
)
WORK = ROOT / "var" / "reliability"


def _workdir(name: str) -> Path:
    WORK.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"{name}-", dir=WORK))


@app.command()
def fuzz(
    examples: Annotated[int, typer.Option(help="Cases per operation and generation mode (17 of them).")] = 60,
    random: Annotated[bool, typer.Option("--random", help="A fresh random seed instead of the fixed one.")] = False,
    failures: Annotated[int, typer.Option(help="How many findings to print in full.")] = 10,
) -> None:
    """Schemathesis over every operation of the OpenAPI schema, positive and negative cases."""
    from harness.fuzz import run_fuzz
    from harness.launch import make_app

    bundle, clip = script_artefacts()
    work = _workdir("fuzz")
    redis_server = RedisServer(work / "redis").start()
    try:
        service = make_app(bundle, redis_server.url, "fuzz", clip, work)
        report = run_fuzz(service, bundle_ids(bundle)[1:], examples, derandomize=not random)
    finally:
        redis_server.stop()
    print(report.summary())
    for operation, n in sorted(report.by_operation.items()):
        print(f"  {operation}: {n}")
    for finding in report.failures[:failures]:
        print("----\n" + finding)
    if report.server_errors or report.schema_violations:
        raise typer.Exit(1)


@app.command()
def outage(
    mode: Annotated[
        str, typer.Option(help="kill (SIGKILL, restart on the same AOF), stop (SIGSTOP), or both.")
    ] = "both",
    workers: Annotated[int, typer.Option(help="Client threads.")] = 16,
    before: Annotated[float, typer.Option(help="Seconds of load before the outage.")] = 3.0,
    outage_s: Annotated[float, typer.Option("--outage", help="Seconds without Redis.")] = 10.0,
    after: Annotated[float, typer.Option(help="Seconds of load after Redis is back.")] = 5.0,
) -> None:
    """Take Redis away under load from the service running as a real process, then bring it back."""
    if mode not in ("kill", "stop", "both"):
        raise typer.BadParameter("kill, stop or both", param_hint="--mode")
    bundle, clip = script_artefacts()
    ids = bundle_ids(bundle)[1:50]
    bad = False
    for m in ("kill", "stop") if mode == "both" else (mode,):
        work = _workdir(f"outage-{m}")
        redis_server = RedisServer(work / "redis").start()
        service = ServiceProcess(
            service_env(bundle, redis_server.url, f"outage-{uuid.uuid4().hex[:6]}", clip, work),
            log_path=work / "service.log",
        )
        try:
            print(
                f"service ready in {service.start():.1f} s; {workers} workers, Redis away for {outage_s:g} s",
                flush=True,
            )
            report = run_outage(service.url, redis_server, ids, m, workers, before, outage_s, after)
        finally:
            service.stop()
            redis_server.stop()
        print("\n".join(report.lines()), flush=True)
        bad |= bool(report.unexpected or report.wrong_during_outage or report.failed_after_return)
        bad |= report.events_acknowledged != report.acknowledged_found or report.slowest_overall_s >= 1.0
    if bad:
        raise typer.Exit(1)


@app.command()
def durability(
    rounds: Annotated[int, typer.Option(help="SIGKILLs; every second one takes the redis-server down too.")] = 4,
    threads: Annotated[int, typer.Option(help="Threads streaming events (one more ingests and deletes).")] = 6,
    stream: Annotated[float, typer.Option(help="Seconds of writes before each SIGKILL (at least).")] = 5.0,
) -> None:
    """SIGKILL the service (and, every other round, Redis) during a stream of writes; restart; check every write."""
    from harness.durability import run_durability

    bundle, clip = script_artefacts()
    modes = tuple("service" if r % 2 == 0 else "service+redis" for r in range(rounds))
    started = time.monotonic()
    report = run_durability(
        bundle, clip, SHARED / "data" / "abo-samples", _workdir("durability"), modes, threads, stream, min_acks=5
    )
    print("\n".join(report.lines()))
    print(f"total {time.monotonic() - started:.1f} s")
    for line in report.missing[:20] + report.deleted_served[:20] + report.log_leaks[:5]:
        print("  !", line)
    if report.missing or report.duplicated or report.deleted_served or report.log_leaks:
        raise typer.Exit(1)
    if report.live_items_index != report.live_items_redis:
        raise typer.Exit(1)


# ----- adversarial images ----------------------------------------------------------------------------------------
def _png(image, **kw) -> bytes:
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG", **kw)
    return buf.getvalue()


def adversarial_images(abo: Path) -> list[tuple[str, bytes]]:
    """(name, bytes): extreme aspect ratios, 1-bit / palette / 16-bit, animated, EXIF-rotated, huge and tiny."""
    import io

    import numpy as np
    from PIL import Image

    photo = sorted(abo.glob("*/*.jpg"))[0]
    ramp = np.linspace(0, 255, 4096, dtype=np.float32)
    images = [
        ("real ABO photo (898x1024 JPEG)", photo.read_bytes()),
        ("1 x 50,000 PNG", _png(Image.new("L", (1, 50_000), 128))),
        ("50,000 x 1 PNG", _png(Image.new("L", (50_000, 1), 128))),
        ("6 x 5,000,000 PNG (30 Mpx)", _png(Image.new("L", (6, 5_000_000), 90))),
        ("1-bit 5,000 x 5,000 PNG", _png(Image.new("1", (5_000, 5_000), 1))),
        ("palette + transparency 4,000 x 4,000 PNG", _png(Image.new("P", (4_000, 4_000), 3), transparency=3)),
        (
            "16-bit grey 4,096 x 4,096 PNG",
            _png(Image.fromarray(np.outer(ramp, ramp).astype(np.uint16))),
        ),
    ]
    frames = [Image.new("P", (512, 512), n % 200) for n in range(200)]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:], duration=10, loop=0)
    images.append(("animated GIF, 200 frames 512 x 512", gif.getvalue()))
    with Image.open(photo) as im:
        exif = im.getexif()
        exif[0x0112] = 6  # orientation: rotate 90 degrees
        jpeg = io.BytesIO()
        im.save(jpeg, format="JPEG", exif=exif.tobytes())
    images.append(("EXIF-rotated JPEG (orientation 6)", jpeg.getvalue()))
    side = 5_477  # 30.0 Mpx, the pixel limit
    grad = np.linspace(0, 255, side, dtype=np.uint8)
    rgba = np.dstack([np.broadcast_to(grad, (side, side))] * 3 + [np.full((side, side), 200, np.uint8)])
    images.append(("huge RGBA PNG 5,477 x 5,477 (30 Mpx)", _png(Image.fromarray(rgba, mode="RGBA"))))
    big = io.BytesIO()
    Image.fromarray(rgba[..., :3]).save(big, format="JPEG", quality=80)
    images.append(("huge JPEG 5,477 x 5,477", big.getvalue()))
    images.append(("over the limit: 1-bit 6,300 x 6,300 PNG", _png(Image.new("1", (6_300, 6_300)))))
    images.append(("tiny 1 x 1 PNG", _png(Image.new("RGB", (1, 1), "red"))))
    images.append(("bomb: 1-bit 20,000 x 20,000 PNG", _png(Image.new("1", (20_000, 20_000)))))
    return images


def _kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(field + ":"))


def measure_encode(encoder, data: bytes) -> tuple[float, float, str]:
    """(peak RSS growth MiB, seconds, outcome) of one encode; the kernel's peak is reset first (clear_refs)."""
    import ctypes

    from clip_features.torch_encoder import ImageDecodeError

    ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed memory back first, so the growth is this encode's
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    before = _kib("VmRSS")
    started = time.perf_counter()
    try:
        encoder.encode_image(data)
        outcome = "encoded"
    except ImageDecodeError as exc:
        outcome = f"rejected: {str(exc)[:60]}"
    seconds = time.perf_counter() - started
    return (_kib("VmHWM") - before) / 1024, seconds, outcome


def _latencies(url: str, ids: list[str], seconds: float, threads: int = 2) -> list[float]:
    import threading

    import httpx

    out: list[float] = []
    stop = time.monotonic() + seconds

    def worker(w: int) -> None:
        with httpx.Client(base_url=url, timeout=30) as client:
            n = w
            while time.monotonic() < stop:
                history = [ids[(n + j) % len(ids)] for j in range(5)]
                started = time.perf_counter()
                r = client.post("/v1/recommend", json={"history": history, "k": 10})
                out.append(time.perf_counter() - started)
                assert r.status_code == 200, r.text
                n += threads

    pool = [threading.Thread(target=worker, args=(w,)) for w in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return out


def _ingest_loop(url: str, images: list[tuple[str, bytes]], stop, counts: dict[int, int], w: int) -> None:
    import httpx

    with httpx.Client(base_url=url, timeout=60) as client:
        n = 0
        while not stop.is_set():
            name, data = images[(n + w) % len(images)]
            r = client.post("/v1/items", data={"item_id": f"adv-{w}-{n}", "text": name}, files={"image": ("x", data)})
            counts[r.status_code] = counts.get(r.status_code, 0) + 1
            n += 1


@app.command()
def images(
    vit: Annotated[bool, typer.Option(help="Also measure ViT-B-32 (random init, the same open_clip path).")] = False,
    seconds: Annotated[float, typer.Option(help="Seconds of recommend load per phase.")] = 15.0,
    ingesters: Annotated[int, typer.Option(help="Concurrent adversarial ingest clients.")] = 4,
) -> None:
    """Adversarial images: peak RSS growth and encode time each; recommend p99 alone and under adversarial ingests."""
    import statistics
    import threading

    from clip_features.torch_encoder import TINY_MODEL, ClipEncoder

    abo = SHARED / "data" / "abo-samples"
    adversarial = adversarial_images(abo)
    models = [TINY_MODEL] + (["ViT-B-32"] if vit else [])
    encoders = {m: ClipEncoder.random_init(m, seed=0) for m in models}
    header = "| image | bytes | " + " | ".join(f"{m}: peak RSS +MiB, s" for m in models) + " | outcome |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    worst = {m: (0.0, 0.0) for m in models}
    for name, data in adversarial:
        cells, outcome = [], ""
        for m in models:
            measure_encode(encoders[m], data)  # first call warms caches; report the second
            peak, secs, outcome = measure_encode(encoders[m], data)
            worst[m] = (max(worst[m][0], peak), max(worst[m][1], secs))
            cells.append(f"{peak:.0f}, {secs:.3f}")
        print(f"| {name} | {len(data):,} | " + " | ".join(cells) + f" | {outcome} |", flush=True)
    for m in models:
        print(f"worst {m}: peak RSS +{worst[m][0]:.0f} MiB, {worst[m][1]:.3f} s")
    del encoders

    bundle, clip = script_artefacts()
    ids = bundle_ids(bundle)[1:200]
    work = _workdir("images")
    redis_server = RedisServer(work / "redis").start()
    service = ServiceProcess(
        service_env(bundle, redis_server.url, f"img-{uuid.uuid4().hex[:6]}", clip, work), log_path=work / "service.log"
    )
    try:
        print(f"service ready in {service.start():.1f} s", flush=True)
        _latencies(service.url, ids, 3.0)  # warm-up
        alone = _latencies(service.url, ids, seconds)
        stop, counts = threading.Event(), {}
        pool = [
            threading.Thread(target=_ingest_loop, args=(service.url, adversarial[1:], stop, counts, w))
            for w in range(ingesters)
        ]
        for t in pool:
            t.start()
        loaded = _latencies(service.url, ids, seconds)
        stop.set()
        for t in pool:
            t.join(120)
        again = _latencies(service.url, ids, seconds)
    finally:
        service.stop()
        redis_server.stop()

    def q(xs: list[float], p: float) -> float:
        return statistics.quantiles(xs, n=100)[p - 1] * 1000 if len(xs) >= 100 else max(xs) * 1000

    print("| recommend (2 client threads) | requests | p50 ms | p99 ms |\n|---|---|---|---|")
    phases = (("alone", alone), (f"with {ingesters} adversarial ingest clients", loaded), ("alone again", again))
    for label, xs in phases:
        print(f"| {label} | {len(xs)} | {q(xs, 50):.1f} | {q(xs, 99):.1f} |")
    print(f"adversarial ingest answers: {dict(sorted(counts.items()))}")


# ----- the attacks of issue 22 at full size (docs/reliability.md section 9) -----------------------------------------
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
    at its default (512)."""
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


def _fill_histories(url: str, prefix: str, ids: list[str], events: int, users: int) -> dict:
    """One user with ``events`` history events and ``users`` users with 20 each, written as the service writes
    them (service.store.histories: RPUSH of '<timestamp repr>\\x1f<item id>' to P:u:{tag}:hist, the id in
    P:u:{tag}:id), pipelined."""
    import random

    import redis

    from service.store.histories import SEP, user_tag

    t0 = 1_700_000_000.0
    client = redis.Redis.from_url(url)
    heavy = f"{prefix}:u:{{{user_tag('heavy-user')}}}"
    client.set(f"{heavy}:id", "heavy-user")
    chunk = 10_000
    pipe = client.pipeline(transaction=False)
    for start in range(0, events, chunk):
        n = range(start, min(events, start + chunk))
        pipe.rpush(f"{heavy}:hist", *[f"{t0 + j!r}{SEP}{ids[j % len(ids)]}" for j in n])
        if len(pipe) >= 20:
            pipe.execute()
    rng = random.Random(0)
    for u in range(users):
        key = f"{prefix}:u:{{{user_tag(f'user-{u}')}}}"
        pipe.set(f"{key}:id", f"user-{u}")
        pipe.rpush(f"{key}:hist", *[f"{t0 + 60 * j!r}{SEP}{rng.choice(ids)}" for j in range(20)])
        if len(pipe) >= 200:
            pipe.execute()
    pipe.execute()
    info = {"heavy_events": client.llen(f"{heavy}:hist"), "used_memory": client.info("memory")["used_memory_human"]}
    client.close()
    return info


def _run_measured(args: list[str], log_path: Path, limit_mib: float) -> tuple[int, float, float, bool]:
    """Run ``args`` (output to ``log_path``); (exit status, wall seconds, peak RSS MiB from wait4's rusage, killed
    by the watchdog because its RSS passed ``limit_mib``)."""
    import os
    import signal
    import subprocess
    import threading

    from harness.launch import ROOT

    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    began = time.monotonic()
    with log_path.open("wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    killed = threading.Event()

    def watch() -> None:
        while not killed.is_set():
            try:
                if _rss_mib(proc.pid) > limit_mib:
                    killed.set()
                    os.kill(proc.pid, signal.SIGKILL)
            except (OSError, StopIteration):
                return
            time.sleep(0.05)

    watchdog = threading.Thread(target=watch, daemon=True)
    watchdog.start()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.monotonic() - began
    proc.returncode = os.waitstatus_to_exitcode(status)
    was_killed = killed.is_set()
    killed.set()
    return proc.returncode, seconds, usage.ru_maxrss / 1024, was_killed


@app.command("snapshot-memory")
def snapshot_memory(
    events: Annotated[int, typer.Option(help="History events of the one heavy user (the issue: 3,000,000).")] = (
        3_000_000
    ),
    users: Annotated[int, typer.Option(help="Normal users (20 events each).")] = 2_000,
    caps: Annotated[
        str, typer.Option(help="--max-user-events of each run (comma-separated); 0 = the default (10,000), unset.")
    ] = "0,100000,300000,3000000",
    limit_gb: Annotated[float, typer.Option(help="Kill a snapshot whose RSS passes this (GB).")] = 3.0,
) -> None:
    """`missrec snapshot` (the CLI, a subprocess) over a Redis holding one user with ``events`` events: wall time and
    peak RSS, with the default --max-user-events and with it raised (up to ``events``: every event read)."""
    import json
    import sys

    bundle, _ = script_artefacts()
    ids = bundle_ids(bundle)[1:]
    work = _workdir("snapshot-memory")
    redis_server = RedisServer(work / "redis", aof=False).start()
    prefix = f"snap-{uuid.uuid4().hex[:6]}"
    rows = []
    try:
        began = time.monotonic()
        info = _fill_histories(redis_server.url, prefix, ids, events, users)
        print(f"Redis filled in {time.monotonic() - began:.1f} s: {info}", flush=True)
        for cap in [int(c) or None for c in caps.split(",")]:
            out = work / f"snap-{cap or 'default'}"
            args = [sys.executable, "-m", "missrec_cli.main", "snapshot", "--redis", redis_server.url]
            args += ["--bundle", str(bundle), "--data", str(SHARED / "data" / "scientific"), "--out", str(out)]
            args += ["--prefix", prefix] + (["--max-user-events", str(cap)] if cap else [])
            code, seconds, peak, killed = _run_measured(args, work / f"snap-{cap or 'default'}.log", limit_gb * 1024)
            counts = {}
            if code == 0:
                counts = json.loads((out / "snapshot.json").read_text())["counts"]
            rows.append((cap, code, seconds, peak, killed, counts))
            print(f"cap {cap or 'default (10,000)'}: exit {code}, {seconds:.1f} s, peak RSS {peak:.0f} MiB", flush=True)
    finally:
        redis_server.stop()
    print("| --max-user-events | exit | wall s | peak RSS MiB | users written | events read | events beyond the cap |")
    print("|---|---|---|---|---|---|---|")
    for cap, code, seconds, peak, killed, counts in rows:
        status = f"{code} (killed above {limit_gb:g} GB)" if killed else str(code)
        label = f"{cap:,}" if cap else "default (10,000)"
        got = [f"{counts[k]:,}" if k in counts else "-" for k in ("users_written", "events_read", "events_beyond_cap")]
        print(f"| {label} | {status} | {seconds:.1f} | {peak:.0f} | " + " | ".join(got) + " |")
    if any(code != 0 for _, code, *_ in rows[:1]):
        raise typer.Exit(1)


@app.command()
def overload(
    factor: Annotated[float, typer.Option(help="Open-loop rate as a multiple of the measured capacity.")] = 1.5,
    seconds: Annotated[float, typer.Option(help="Seconds of the open-loop run (after a 3 s warm-up).")] = 20.0,
    probe: Annotated[float, typer.Option(help="Seconds of the closed-loop capacity run (after 2 s warm-up).")] = 8.0,
    users: Annotated[int, typer.Option(help="Closed-loop clients of the capacity run.")] = 32,
    max_queue_ms: Annotated[float, typer.Option(help="MISSREC_MAX_QUEUE_MS of the service (default 500).")] = 500.0,
    max_concurrency: Annotated[
        int, typer.Option(help="MISSREC_MAX_CONCURRENCY of the service (0: its default, 64).")
    ] = 0,
    mix: Annotated[str, typer.Option(help="The locustfile's request mix (the bench's; no ingests here).")] = (
        "user=80,history=7.5,events=12"
    ),
) -> None:
    """Above capacity, open loop: the service's capacity measured closed loop (locust, loadtest/locustfile.py), then
    ``factor`` times that rate for ``seconds``: admitted requests and their latency, the 503s, their latency and
    Retry-After. The real Scientific users' histories are seeded first through the events API (the bench's
    seed_histories). With 2+ cores the service runs on CPU 1, locust, Redis and this script on CPU 0 (as the
    bench)."""
    import asyncio
    import csv
    import json
    import os

    import httpx
    import numpy as np

    from loadtest import procs
    from loadtest.bench import seed_histories
    from loadtest.stats import read_samples, stage_deltas
    from loadtest.traffic import build_traffic, write_traffic

    bundle, clip = script_artefacts()
    work = _workdir("overload")
    real = build_traffic(SHARED / "data" / "scientific", bundle_ids(bundle), None)
    traffic = write_traffic(work / "traffic.json", real)
    service_cpus, client_cpus = ([1], [0]) if (os.cpu_count() or 1) >= 2 else (None, None)
    if client_cpus:
        os.sched_setaffinity(0, client_cpus)
    redis_server = RedisServer(work / "redis").start()
    procs.pin(redis_server.process.pid, client_cpus)
    env = service_env(bundle, redis_server.url, f"over-{uuid.uuid4().hex[:6]}", clip, work, max_queue_ms=max_queue_ms)
    env |= {"MISSREC_MAX_CONCURRENCY": str(max_concurrency)} if max_concurrency else {}
    service = ServiceProcess(env | procs.thread_env(service_cpus), log_path=work / "service.log")
    try:
        print(f"service ready in {service.start():.1f} s; MISSREC_MAX_QUEUE_MS={max_queue_ms:g}, "
              f"MISSREC_MAX_CONCURRENCY={max_concurrency or 'default'}, mix {mix}", flush=True)  # fmt: skip
        procs.pin(service.child.pid, service_cpus)
        print(f"seeded {asyncio.run(seed_histories(service.url, real['users']))} real users' histories", flush=True)
        with procs.CpuMeter({"service": service.child.pid}) as meter:
            runs = work / "runs"
            common = {"mix": mix, "cpus": client_cpus, "meter": meter}
            closed = procs.run_locust(
                service.url, traffic, runs / "capacity", rate=0, users=users, duration=probe + 2, tag="cap", **common
            )
            capacity = read_samples(closed, 2.0)
            print(f"capacity (closed loop, {users} clients): {capacity.achieved:.0f} req/s, p50 {capacity.p50:.1f} ms, "
                  f"p99 {capacity.p99:.1f} ms, {capacity.errors} errors", flush=True)  # fmt: skip
            rate = round(factor * capacity.achieved)
            before = httpx.get(f"{service.url}/metrics", timeout=30).text
            opened = procs.run_locust(
                service.url, traffic, runs / "overload", rate=rate, users=4, duration=seconds + 3, tag="over", **common
            )
            stats = read_samples(opened, 3.0)
            stages = stage_deltas(before, httpx.get(f"{service.url}/metrics", timeout=30).text)
            cpu = (
                meter.usage("service", stats.t_start, stats.t_stop),
                meter.usage("locust", stats.t_start, stats.t_stop),
            )
    finally:
        service.stop()
        redis_server.stop()
    with opened.open(newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if float(r["sched_s"]) >= 3.0]
    meta = json.loads(opened.with_suffix(".json").read_text())

    def lat(status: int, column: str = "latency_ms") -> np.ndarray:
        return np.array([float(r[column]) for r in rows if int(r["status"]) == status])

    def pct(a: np.ndarray, q: float) -> str:
        return f"{np.percentile(a, q):.1f}" if a.size else "-"

    ok, shed = lat(200), lat(503)
    print(f"open loop at {rate} req/s ({factor:g} x capacity) for {stats.window_s:.0f} s: {len(rows)} requests, "
          f"statuses {_statuses([int(r['status']) for r in rows])}; generator lag p99 {stats.lag_p99:.1f} ms; "
          f"CPU service {cpu[0] or 0:.2f}, locust {cpu[1] or 0:.2f} cores")  # fmt: skip
    print("| answer | count | per s | p50 ms | p99 ms | max ms | p99 from the scheduled send ms |")
    print("|---|---|---|---|---|---|---|")
    for label, code, a in (("200 admitted", 200, ok), ("503 shed", 503, shed)):
        sched = lat(code, "latency_sched_ms")
        top = f"{a.max():.1f}" if a.size else "-"
        print(f"| {label} | {a.size} | {a.size / stats.window_s:.0f} | {pct(a, 50)} | {pct(a, 99)} | {top} | "
              f"{pct(sched, 99)} |")  # fmt: skip
    for stage in ("queue", "request"):  # inside the service, from its histograms (bucket estimates)
        h = stages.get(f"stage:{stage}")
        if h is not None:
            print(f"service-side {stage} stage of the open-loop run: {h.count:.0f} observed, "
                  f"p50 {1000 * h.quantile(0.5):.1f} ms, p99 {1000 * h.quantile(0.99):.1f} ms")  # fmt: skip
    print(f"503 answers in the whole run (warm-up included): {meta.get('status_503')}, without Retry-After: "
          f"{meta.get('status_503_without_retry_after')}")  # fmt: skip


if __name__ == "__main__":
    app()
