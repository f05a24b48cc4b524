"""Numbers of one load-test run: exact percentiles from the per-request samples, the service's per-stage histograms
(Prometheus text, differenced between two scrapes) and quantiles estimated from their buckets."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

SUSTAINED_FRACTION = 0.97  # achieved >= 97 % of the target rate ...
MAX_ERROR_RATE = 0.01  # ... with < 1 % errors: the rate is sustained


@dataclass
class RunStats:
    """One locust run, measured over [warm-up, end) of its schedule."""

    target: float  # req/s (0 = closed loop)
    window_s: float
    requests: int
    errors: int
    achieved: float  # successful responses per second
    p50: float
    p95: float
    p99: float
    lag_p99: float  # generator lag: actual - scheduled send (open loop)
    in_flight_at_stop: int
    t_start: float = 0.0  # wall clock of the measured window (after warm-up) ...
    t_stop: float = 0.0  # ... and of the end of the run
    kinds: dict[str, dict[str, float]] = field(default_factory=dict)
    latencies: np.ndarray | None = None

    @property
    def error_rate(self) -> float:
        return self.errors / max(1, self.requests)

    @property
    def sustained(self) -> bool:
        if self.target <= 0:
            return self.error_rate < MAX_ERROR_RATE
        return self.achieved >= SUSTAINED_FRACTION * self.target and self.error_rate < MAX_ERROR_RATE

    def row(self) -> dict[str, Any]:
        return {
            "target_rps": self.target,
            "achieved_rps": round(self.achieved, 1),
            "requests": self.requests,
            "errors": self.errors,
            "p50_ms": round(self.p50, 2),
            "p95_ms": round(self.p95, 2),
            "p99_ms": round(self.p99, 2),
            "lag_p99_ms": round(self.lag_p99, 2),
            "sustained": self.sustained,
        }


def _pct(a: np.ndarray, q: float) -> float:
    return float(np.percentile(a, q)) if a.size else math.nan


def read_samples(path: Path, warmup_s: float) -> RunStats:
    """RunStats of a locustfile samples CSV (and its .json meta), dropping requests scheduled in the warm-up."""
    meta = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
    with path.open(newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if float(r["sched_s"]) >= warmup_s]
    window = max(1e-9, float(meta["duration_s"]) - warmup_s)
    ok = [r for r in rows if 200 <= int(r["status"]) < 300]
    lat = np.array([float(r["latency_ms"]) for r in ok])
    lag = np.array([float(r["lag_ms"]) for r in rows])
    kinds: dict[str, dict[str, float]] = {}
    for kind in sorted({r["kind"] for r in rows}):
        mine = [r for r in rows if r["kind"] == kind]
        good = np.array([float(r["latency_ms"]) for r in mine if 200 <= int(r["status"]) < 300])
        kinds[kind] = {
            "requests": len(mine),
            "errors": len(mine) - good.size,
            "rps": round(good.size / window, 1),
            "p50_ms": round(_pct(good, 50), 2),
            "p95_ms": round(_pct(good, 95), 2),
            "p99_ms": round(_pct(good, 99), 2),
        }
    return RunStats(
        target=float(meta["rate"]),
        window_s=window,
        requests=len(rows),
        errors=len(rows) - len(ok),
        achieved=len(ok) / window,
        p50=_pct(lat, 50),
        p95=_pct(lat, 95),
        p99=_pct(lat, 99),
        lag_p99=_pct(lag, 99),
        in_flight_at_stop=int(meta.get("in_flight_at_stop", 0)),
        t_start=float(meta["t0"]) + warmup_s,
        t_stop=float(meta["stopped"]),
        kinds=kinds,
        latencies=lat,
    )


# ----- the service's own metrics ----------------------------------------------------------------------------------
@dataclass
class Histogram:
    buckets: list[tuple[float, float]]  # (upper bound, cumulative count), +inf last
    total: float
    count: float

    def minus(self, other: Histogram | None) -> Histogram:
        if other is None:
            return self
        before = dict(other.buckets)
        buckets = [(le, c - before.get(le, 0.0)) for le, c in self.buckets]
        return Histogram(buckets, self.total - other.total, self.count - other.count)

    def quantile(self, q: float) -> float:
        """Linear interpolation inside the bucket that holds the q-quantile (seconds); the last finite bound if
        it lies in the +inf bucket."""
        if self.count <= 0:
            return math.nan
        rank, prev_le, prev_c = q * self.count, 0.0, 0.0
        for le, c in self.buckets:
            if c >= rank:
                if math.isinf(le):
                    return prev_le
                return prev_le + (le - prev_le) * (rank - prev_c) / max(c - prev_c, 1e-12)
            prev_le, prev_c = le, c
        return prev_le

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count > 0 else math.nan


def parse_histograms(text: str) -> dict[str, Histogram]:
    """{"stage:<name>": ..., "gc:<generation>": ..., "batch_size": ...} from the service's /metrics text."""
    out: dict[str, Histogram] = {}
    for family in text_string_to_metric_families(text):
        if family.name not in ("missrec_stage_seconds", "missrec_batch_size", "missrec_gc_seconds"):
            continue
        parts: dict[str, dict[str, Any]] = {}
        for s in family.samples:
            if "stage" in s.labels:
                key = f"stage:{s.labels['stage']}"
            else:
                key = f"gc:{s.labels['generation']}" if "generation" in s.labels else "batch_size"
            h = parts.setdefault(key, {"buckets": [], "sum": 0.0, "count": 0.0})
            if s.name.endswith("_bucket"):
                h["buckets"].append((float(s.labels["le"]), float(s.value)))
            elif s.name.endswith("_sum"):
                h["sum"] = float(s.value)
            elif s.name.endswith("_count"):
                h["count"] = float(s.value)
        for key, h in parts.items():
            out[key] = Histogram(sorted(h["buckets"]), h["sum"], h["count"])
    return out


def stage_deltas(before: str, after: str) -> dict[str, Histogram]:
    """Per-stage histograms of what happened between two scrapes of /metrics."""
    a, b = parse_histograms(before), parse_histograms(after)
    return {key: h.minus(a.get(key)) for key, h in b.items() if h.minus(a.get(key)).count > 0}
