"""Resident memory of the service on a bundle: after readiness, after recommend requests, after ingests and deletes.

    nice -n 19 .venv/bin/python -m loadtest.memory --bundle runs/bundle-1000000 --data ../shared/data/scientific \\
        --requests 2000 --ingest 200 --out runs/loadtest/memory-1m [--env MISSREC_MMAP_ITEMS=false]

Starts the service (`missrec serve`, 1 worker; Redis: --redis-url, else an embedded one) and reads
/proc/PID/status at each step: VmRSS (resident), RssAnon (anonymous: the heap, the FAISS index, what the process
owns), RssFile (file-backed: the memory-mapped bundle arrays' pages touched so far, and the libraries; clean
pages the kernel can drop and re-read), RssShmem, VmHWM (peak resident), and bundle_mapped (the resident part of
the file mappings under the bundle directory, from /proc/PID/smaps: the mapped item arrays). Steps: ``ready``
(after /readyz), ``requests`` (after --requests recommends by the real users' test histories of --data, or
random histories of bundle items without it, sequential, k=10), ``ingest`` (after --ingest text-only items
through POST /v1/items with a random-init CLIP encoder, --delete of them deleted again: the service then serves
appended rows), ``requests again`` (another --requests recommends). Prints a table, writes OUT/memory.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from harness.launch import wait_ready
from harness.ports import free_port
from loadtest import procs
from loadtest.bench import clip_checkpoint

log = logging.getLogger("loadtest.memory")
FIELDS = ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM")


def status_mib(pid: int) -> dict[str, float]:
    """The memory fields of /proc/PID/status (FIELDS), MiB."""
    fields = dict(ln.split(":", 1) for ln in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in ln)
    return {f: round(int(fields[f].split()[0]) / 1024, 1) for f in FIELDS if f in fields}


def mapped_mib(pid: int, under: Path) -> float:
    """Resident MiB of the file mappings of files under ``under`` (the bundle's memory-mapped arrays), from smaps."""
    total_kb, inside = 0, False
    try:
        lines = Path(f"/proc/{pid}/smaps").read_text().splitlines()
    except OSError:
        return float("nan")
    for line in lines:
        head = line.split()
        if head and "-" in head[0] and len(head) >= 5 and ":" not in head[0]:  # a mapping's header line
            inside = len(head) >= 6 and head[5].startswith(str(under) + "/")
        elif inside and line.startswith("Rss:"):
            total_kb += int(head[1])
    return round(total_kb / 1024, 1)


def memory(pid: int, bundle: Path) -> dict[str, float]:
    return status_mib(pid) | {"bundle_mapped": mapped_mib(pid, bundle)}


def histories(bundle: Path, data: Path | None, count: int, seed: int = 0) -> list[list[str]]:
    """``count`` histories (external ids, oldest first): the real users' test histories (cycled), else random."""
    ids = json.loads((bundle / "items/ids.json").read_text(encoding="utf-8"))
    if data is not None:
        from loadtest.traffic import build_traffic

        users = build_traffic(data, ids, None)["users"]
        if users:
            return [users[i % len(users)]["history"] for i in range(count)]
        log.warning("no user of %s has all its items in the bundle: random histories", data)
    rng = np.random.default_rng(seed)
    return [[ids[int(r)] for r in rng.integers(1, len(ids), int(rng.integers(5, 51)))] for _ in range(count)]


def recommend(client: httpx.Client, hists: list[list[str]]) -> dict[str, float]:
    times = []
    for h in hists:
        started = time.perf_counter()
        r = client.post("/v1/recommend", json={"history": h, "k": 10})
        r.raise_for_status()
        times.append(time.perf_counter() - started)
    t = 1e3 * np.asarray(times)
    return {
        "requests": len(times),
        "p50_ms": round(float(np.percentile(t, 50)), 2),
        "mean_ms": round(float(t.mean()), 2),
    }


def ingest(client: httpx.Client, count: int, delete: int, tag: str) -> dict[str, int]:
    words = ["solder", "beaker", "caliper", "magnet", "resistor", "flask", "pipette", "microscope", "lens", "clamp"]
    rng = np.random.default_rng(1)
    made = []
    for i in range(count):
        text = " ".join(words[int(j)] for j in rng.integers(0, len(words), 6))
        r = client.post("/v1/items", data={"item_id": f"{tag}-{i}", "text": text})
        if r.status_code != 201:
            raise RuntimeError(f"ingest {i}: {r.status_code} {r.text[:300]}")
        made.append(f"{tag}-{i}")
    for item in made[:delete]:
        r = client.delete(f"/v1/items/{item}")
        if r.status_code != 204:
            raise RuntimeError(f"delete {item}: {r.status_code} {r.text[:300]}")
    return {"ingested": count, "deleted": min(delete, count)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m loadtest.memory", description=__doc__.split("\n")[0])
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--data", type=Path, default=None, help="dataset of the real users whose histories are sent")
    p.add_argument("--requests", type=int, default=1000, help="recommends per request step")
    p.add_argument("--ingest", type=int, default=100, help="items ingested (0: no ingest step)")
    p.add_argument("--delete", type=int, default=20, help="of the ingested items, deleted again")
    p.add_argument("--clip-model", default="missrec-tiny-512", help="open_clip architecture for ingestion")
    p.add_argument("--redis-url", default=None, help="use this Redis (default: start an embedded one)")
    p.add_argument("--env", action="append", default=[], help="extra service setting, e.g. MISSREC_MMAP_ITEMS=false")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    bundle = args.bundle.resolve()
    tag = f"mem{uuid.uuid4().hex[:8]}"
    hists = histories(bundle, args.data, args.requests)
    redis_server = None
    svc = None
    steps: list[dict[str, Any]] = []
    try:
        url_redis = args.redis_url
        if not url_redis:
            from service.embedded_redis import EmbeddedRedis

            redis_server = EmbeddedRedis(out / "redis", port=free_port())
            url_redis = redis_server.start()
        env = {
            "MISSREC_REDIS_URL": url_redis, "MISSREC_KEY_PREFIX": tag, "MISSREC_DATA_DIR": str(out / "state"),
            "MISSREC_CLIP_MODEL": args.clip_model, "MISSREC_CLIP_PRETRAINED": clip_checkpoint(args.clip_model, out),
        }  # fmt: skip
        env |= dict(e.split("=", 1) for e in args.env)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        svc = procs.serve_service(bundle, port, out / "logs", env, None)
        ready_s = wait_ready(url, svc)
        steps.append({"step": "ready", "seconds": round(ready_s, 1), **memory(svc.pid, bundle)})
        with httpx.Client(base_url=url, timeout=60.0) as client:
            steps.append({"step": "requests", **recommend(client, hists), **memory(svc.pid, bundle)})
            if args.ingest:
                done = ingest(client, args.ingest, args.delete, tag)
                steps.append({"step": "ingest", **done, **memory(svc.pid, bundle)})
                steps.append({"step": "requests again", **recommend(client, hists), **memory(svc.pid, bundle)})
    finally:
        if svc is not None:
            svc.stop()
        if redis_server is not None:
            redis_server.stop()
    items = len(json.loads((bundle / "items/ids.json").read_text(encoding="utf-8")))
    summary = {"bundle": str(bundle), "items": items, "settings": args.env, "steps": steps}
    (out / "memory.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(f"{bundle} ({items} items) {' '.join(args.env)}; MiB from /proc/PID/status")
    columns = (*FIELDS, "bundle_mapped")
    print(f"{'step':<15}" + "".join(f"{f:>14}" for f in columns))
    for s in steps:
        print(f"{s['step']:<15}" + "".join(f"{s.get(f, float('nan')):>14.1f}" for f in columns))
    return summary


if __name__ == "__main__":
    main()
