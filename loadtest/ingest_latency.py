"""Ingest -> visible-in-recommendations latency, on the replica that ingests and on other replicas.

For each of n new items (a real product photo + its text, made unique): t0 = just before ``POST /v1/items`` to the
primary replica; then every replica is polled (each from its own thread, from the moment the 201 arrives) with
``POST /v1/recommend {"history": [new id], "k": K, "exclude_seen": false}``. Before a replica has the item that call
is a 400 (unknown item); the visible time is the end of the first 200 answer: the replica adds an item to its
live table and to its FAISS index in one locked step, so from then on every recommendation scores it. As a check
that it is really retrievable, the report also counts how often the new item is in its own top-K.

    python -m loadtest.ingest_latency --primary http://127.0.0.1:8000 --other http://127.0.0.1:8001 \\
        --abo ../shared/data/abo-samples --n 100
"""

from __future__ import annotations

import argparse
import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from harness.abo import abo_photos


def _poll(client: httpx.Client, item_id: str, k: int, t0: float, poll_s: float, timeout_s: float) -> dict[str, Any]:
    """Poll one replica until it recommends from item_id; visible time in ms since t0 (None: not within timeout)."""
    body = {"history": [item_id], "k": k, "exclude_seen": False}
    deadline = time.perf_counter() + timeout_s
    while time.perf_counter() < deadline:
        r = client.post("/v1/recommend", json=body)
        if r.status_code == 200:
            ranked = item_id in {i["item_id"] for i in r.json()["items"]}
            return {"visible_ms": (time.perf_counter() - t0) * 1e3, "in_own_topk": ranked}
        time.sleep(poll_s)
    return {"visible_ms": None, "in_own_topk": False}


def measure(
    primary: str,
    others: list[str],
    products: list[dict[str, Any]],
    n: int = 100,
    k: int = 100,
    tag: str | None = None,
    poll_s: float = 0.002,
    timeout_s: float = 5.0,
    pause_s: float = 0.02,
) -> dict[str, Any]:
    """Ingest n items on ``primary``; per replica the ingest -> visible latencies (ms) and how many never showed."""
    if not products:
        raise ValueError("no products to ingest")
    tag = tag or f"probe-{uuid.uuid4().hex[:8]}"
    urls = [primary, *others]
    clients = [httpx.Client(base_url=u, timeout=30.0) for u in urls]
    ingest_ms: list[float] = []
    visible: dict[str, list[float | None]] = {u: [] for u in urls}
    ranked: dict[str, int] = dict.fromkeys(urls, 0)
    failures = 0
    try:
        with ThreadPoolExecutor(len(urls)) as pool:
            for i in range(n):
                p = products[i % len(products)]
                item_id = f"{tag}-{i}"
                body = {"item_id": item_id, "text": f"{p['text']} (probe {i})", "image_base64": p["image_base64"]}
                t0 = time.perf_counter()
                r = clients[0].post("/v1/items", json=body)
                if r.status_code != 201:
                    failures += 1
                    continue
                ingest_ms.append((time.perf_counter() - t0) * 1e3)
                probe = partial(_poll, item_id=item_id, k=k, t0=t0, poll_s=poll_s, timeout_s=timeout_s)
                results = pool.map(probe, clients)
                for u, res in zip(urls, results, strict=True):
                    visible[u].append(res["visible_ms"])
                    ranked[u] += int(res["in_own_topk"])
                time.sleep(pause_s)
    finally:
        for c in clients:
            c.close()
    report: dict[str, Any] = {"n": n, "k": k, "ingest_failures": failures, "ingest_ms": _stats(ingest_ms)}
    for role, u in zip(["same", *[f"other{j + 1}" for j in range(len(others))]], urls, strict=True):
        seen = [v for v in visible[u] if v is not None]
        report[role] = {"url": u, "not_visible": len(visible[u]) - len(seen), "in_own_topk": ranked[u]} | _stats(seen)
    return report


def _stats(values: list[float]) -> dict[str, float]:
    if not values:
        return {"count": 0}
    a = np.asarray(values)
    return {
        "count": int(a.size),
        "p50_ms": round(float(np.percentile(a, 50)), 2),
        "p99_ms": round(float(np.percentile(a, 99)), 2),
        "max_ms": round(float(a.max()), 2),
        "mean_ms": round(float(a.mean()), 2),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtest.ingest_latency", description=__doc__.split("\n")[0])
    parser.add_argument("--primary", required=True, help="base URL of the replica that ingests")
    parser.add_argument("--other", action="append", default=[], help="base URL of another replica (repeatable)")
    parser.add_argument("--abo", type=Path, required=True, help="ABO sample products folder (real photos)")
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--json", type=Path, help="write the report here")
    args = parser.parse_args(argv)
    report = measure(args.primary, args.other, abo_photos(args.abo), n=args.n, k=args.k)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
