"""Garbage-collector pauses: measured (``missrec_gc_seconds{generation}``) and kept off the tail.

A full (generation 2) collection walks every tracked object in the process. After start-up that is the web stack,
pydantic's schemas, ONNX Runtime's and numpy's Python objects, and open_clip/torch where ingestion uses them:
hundreds of thousands of objects that live as long as the process, walked again and again while requests wait.
``freeze`` (at the end of start-up, MISSREC_GC_FREEZE) moves them all to the permanent generation
(``gc.freeze``), so later collections walk only what requests created; the histogram shows what each generation
costs. Measured on the Scientific bundle (docs/benchmarks.md, issue 26) the pauses were small either way (at most
one full collection of ~2 ms per 15 s at half load), so the freeze is off by default: frozen objects that later
become cyclic garbage are never collected."""

from __future__ import annotations

import gc
import threading
import time
from typing import Any

from prometheus_client import Histogram


class GcWatch:
    """Times every collection into ``histogram`` (labelled by generation) while installed."""

    def __init__(self, histogram: Histogram) -> None:
        self.histogram = histogram
        self._started = threading.local()

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started.at = time.perf_counter()
        elif (at := getattr(self._started, "at", None)) is not None:
            self.histogram.labels(str(info.get("generation", "?"))).observe(time.perf_counter() - at)
            self._started.at = None

    def install(self) -> None:
        if self not in gc.callbacks:
            gc.callbacks.append(self)

    def remove(self) -> None:
        if self in gc.callbacks:
            gc.callbacks.remove(self)


def freeze() -> int:
    """Collect once, then move every surviving object to the permanent generation; returns how many were frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
