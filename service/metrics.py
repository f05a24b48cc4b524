"""Prometheus metrics of one app instance (own registry, so several apps can live in one process, e.g. tests).

Names (all prefixed ``missrec_``):
    stage_seconds{stage}   histogram: history_read, queue, user_tower, search, rescore, request, ingest_encode, similar
    batch_size                 histogram: requests per micro-batch of the user tower + search
    requests_total{route,status}
    ingest_total{result}       created, replaced, failed
    item_events_total{op,origin}  item changes applied to this replica's index (origin: local, stream)
    fallback_total             recommendations served from popularity (no history)
    redis_errors_total         Redis calls that failed or timed out
    live_items                 gauge: items servable right now (bundle + ingested - deleted)
    bundle_info{version}       gauge: 1 for the bundle this replica serves (0 for the ones it served before)
    bundle_generation          gauge: announcement generation this replica serves (0: MISSREC_BUNDLE, none announced)
    bundle_loading             gauge: 1 while a swap loads, warms up and re-embeds
    bundle_swaps_total{result}  switched, unchanged (already served), failed, superseded (a newer one came first)
    bundle_swap_seconds        histogram: announcement seen -> new snapshot serving
    bundle_reembedded_total    ingested items re-embedded with a new item tower at a swap
    shadow_active              gauge: 1 while a shadow candidate bundle is scored beside the serving one
    shadow_requests_total{result}  recommendations scored by the shadow candidate: scored, dropped (busy), failed
    shadow_overlap             histogram: overlap@k of the serving and the candidate top-k of one request
    shadow_seconds{model}      histogram: user tower + search of one shadowed request, model = serving|candidate
    gc_seconds{generation}     histogram: pauses of the garbage collector (service.gc_pauses)
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

OVERLAP_BUCKETS = tuple(i / 10 for i in range(11))
LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.002,
    0.003,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.02,
    0.03,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)
SWAP_BUCKETS = (0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.stage = Histogram(
            "missrec_stage_seconds", "Latency per stage", ["stage"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.batch_size = Histogram("missrec_batch_size", "Requests per micro-batch", buckets=BATCH_BUCKETS, registry=r)
        self.requests = Counter("missrec_requests_total", "HTTP requests", ["route", "status"], registry=r)
        self.ingest = Counter("missrec_ingest_total", "Cold-start ingests", ["result"], registry=r)
        self.item_events = Counter("missrec_item_events_total", "Item changes applied", ["op", "origin"], registry=r)
        self.fallback = Counter("missrec_fallback_total", "Popularity fallbacks", registry=r)
        self.rescore_rows = Counter(
            "missrec_rescore_rows_total", "Candidate rows re-scored, by the precision read", ["dtype"], registry=r
        )
        self.experiment = Counter(
            "missrec_experiment_total", "Experiment impressions, attributed interactions and hits counted here",
            ["experiment", "variant", "kind"], registry=r,
        )  # fmt: skip
        self.redis_errors = Counter("missrec_redis_errors_total", "Failed Redis calls", registry=r)
        self.live_items = Gauge("missrec_live_items", "Servable items", registry=r)
        self.bundle_info = Gauge("missrec_bundle_info", "Bundle served (1)", ["version"], registry=r)
        self.bundle_generation = Gauge("missrec_bundle_generation", "Announcement generation served", registry=r)
        self.bundle_loading = Gauge("missrec_bundle_loading", "1 while a bundle swap is in progress", registry=r)
        self.bundle_swaps = Counter("missrec_bundle_swaps_total", "Bundle swaps", ["result"], registry=r)
        self.bundle_swap_seconds = Histogram(
            "missrec_bundle_swap_seconds", "Announcement seen -> serving", buckets=SWAP_BUCKETS, registry=r
        )
        self.bundle_reembedded = Counter("missrec_bundle_reembedded_total", "Items re-embedded at swaps", registry=r)
        self.shadow_active = Gauge("missrec_shadow_active", "1 while a shadow candidate is scored", registry=r)
        self.shadow_requests = Counter(
            "missrec_shadow_requests_total", "Recommendations scored by the shadow candidate", ["result"], registry=r
        )
        self.shadow_overlap = Histogram(
            "missrec_shadow_overlap", "overlap@k, serving vs candidate", buckets=OVERLAP_BUCKETS, registry=r
        )
        self.shadow_seconds = Histogram(
            "missrec_shadow_seconds", "Shadowed request, per model", ["model"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.gc_seconds = Histogram(
            "missrec_gc_seconds", "Garbage-collector pauses", ["generation"], buckets=LATENCY_BUCKETS, registry=r
        )

    @contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.stage.labels(stage).observe(time.perf_counter() - start)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def summary(self) -> dict[str, Any]:
        """The same numbers as :meth:`render`, as plain values: histograms (per stage, batch size) with cumulative
        bucket counts, requests per route, error responses, ingests by result (the console's overview)."""
        stages: dict[str, dict[str, Any]] = {}
        batch: dict[str, Any] = _empty_histogram(BATCH_BUCKETS)
        requests: dict[str, int] = {}
        errors = 0
        ingest: dict[str, int] = {}
        for family in self.registry.collect():
            for sample in family.samples:
                name, labels, value = sample.name, sample.labels, sample.value
                if family.name == "missrec_stage_seconds":
                    stage = stages.setdefault(labels["stage"], _empty_histogram(LATENCY_BUCKETS))
                    _add_sample(stage, name, labels, value)
                elif family.name == "missrec_batch_size":
                    _add_sample(batch, name, labels, value)
                elif name == "missrec_requests_total":
                    requests[labels["route"]] = requests.get(labels["route"], 0) + int(value)
                    errors += int(value) if labels["status"][:1] in ("4", "5") else 0
                elif name == "missrec_ingest_total":
                    ingest[labels["result"]] = int(value)
        return {"stages": stages, "batch_size": batch, "requests": requests, "errors": errors, "ingest": ingest}


def _empty_histogram(buckets: tuple[float, ...]) -> dict[str, Any]:
    bounds = [float(b) for b in buckets]
    return {"upper_bounds": bounds, "cumulative_counts": [0] * (len(bounds) + 1), "count": 0, "sum": 0.0}


def _add_sample(hist: dict[str, Any], name: str, labels: dict[str, str], value: float) -> None:
    if name.endswith("_bucket"):
        le = float(labels["le"])
        slot = len(hist["upper_bounds"]) if math.isinf(le) else hist["upper_bounds"].index(le)
        hist["cumulative_counts"][slot] = int(value)
    elif name.endswith("_count"):
        hist["count"] = int(value)
    elif name.endswith("_sum"):
        hist["sum"] = float(value)
