"""Reliability scenarios at full size (the CI-sized versions are tests/harness/test_fuzz.py, test_reliability.py and
test_durability.py); their figures are in docs/reliability.md.

    flock /tmp/missrec-cpu.lock .venv/bin/python scripts/reliability.py fuzz [--examples 60] [--random]
    flock /tmp/missrec-cpu.lock .venv/bin/python scripts/reliability.py outage [--mode kill|stop|both] [--outage 10]
    flock /tmp/missrec-cpu.lock .venv/bin/python scripts/reliability.py durability [--rounds 4] [--threads 6]
    flock /tmp/missrec-cpu.lock .venv/bin/python scripts/reliability.py images [--vit] [--seconds 15]

The attacks of issue 22 at full size (slow bodies, shadow leak, snapshot memory, overload) are scripts/attacks.py.

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
    help="Reliability scenarios at full size: fuzz, outage, durability, images (the attacks: scripts/attacks.py).",
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


if __name__ == "__main__":
    app()
