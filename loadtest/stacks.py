"""py-spy collapsed stacks (``py-spy record --format raw``) grouped into named buckets, and the top functions.

A collapsed-stack line is the frames of one sampled stack, root first, joined by ``;``, then a space and how many
samples had that exact stack::

    _run_once (asyncio/base_events.py:1922);_run (asyncio/events.py:80);run_asgi (uvicorn/...py:409) 3

A Python frame is ``function (file:line)``; a native frame (``--native``) is ``symbol (library)`` or
``symbol (source.c:line)``, or ``0x7f... (library)`` when the symbol is unknown. A stack lands in ONE bucket, by the
rows of :data:`RULES`, in two passes:

1. rows of scope ``stack``, top to bottom: the first whose patterns match ANY frame of the stack. These are the
   libraries the request path calls into and that own whatever runs beneath them (ONNX Runtime, FAISS, Redis,
   logging, pydantic, JSON): Redis's own use of asyncio streams is Redis time, a ``json.dumps`` under starlette is
   JSON time.
2. else rows of scope ``frame``: the INNERMOST frame that matches one of them (rows tried top to bottom for each
   frame). These are the layers every request passes through (the service's middleware and routes, starlette,
   uvicorn, the event loop): a stack is charged to the deepest layer it was in.

A stack neither pass places is "other".

Waiting is not work: py-spy leaves idle threads out, but a thread that was just woken (runnable, waiting for the
CPU) or is blocked where py-spy cannot tell is still sampled at its wait. With ``--native`` the innermost named
frame shows it (``epoll_pwait``, ``pthread_cond_timedwait``, a lock acquire): such stacks are counted as
"waiting" (:data:`WAITING`), shown on their own, and left out of the buckets' shares and of the top functions.
The inclusive table lists Python functions only and leaves out the launch chain every stack starts with
(:data:`ENTRY`: typer, ``uvicorn.run``, the event loop's runner, thread bootstrap).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

OTHER = "other"
WAITING_BUCKET = "waiting (runnable or blocked at a wait)"

STACK, FRAME = "stack", "frame"
# (bucket, scope, file pattern, function pattern): regular expressions searched in a frame's file (or native
# library / C source) and in its function name; an empty pattern matches anything. Scopes: see the docstring.
RULES: tuple[tuple[str, str, str, str], ...] = (
    # -- CPython's cyclic garbage collector runs wherever an allocation triggers it: its own bucket ------------
    ("Python garbage collector", STACK, r"libpython", r"^(gc_collect|collect_with_callback|collect_generations)"),
    # -- the model's work (stack scope) ----------------------------------------------------------------------
    ("ONNX Runtime (towers)", STACK, r"onnxruntime", ""),
    ("user tower feeds (numpy gather)", STACK, r"serving_core/towers\.py", ""),
    ("FAISS search", STACK, r"faiss", ""),
    ("numpy exact re-scoring / top-k", STACK, r"serving_core/(topk|scoring|fusion)\.py", ""),
    # -- libraries the request path calls (stack scope) ------------------------------------------------------
    ("logging / access log", STACK, r"(^|/)logging/|uvicorn/logging\.py", ""),
    ("metrics / prometheus / telemetry", STACK, r"prometheus_client|service/metrics\.py", ""),
    ("Redis client + history store", STACK, r"(^|/)redis/|hiredis|service/store(\.py|/)", ""),
    ("pydantic validation", STACK, r"pydantic", ""),
    ("JSON serialisation", STACK, r"(^|/)json/|_json|orjson|fastapi/encoders\.py", ""),
    ("JSON serialisation", STACK, r"starlette/responses\.py", r"^render$"),
    # -- layers every request passes through (frame scope: the innermost one) --------------------------------
    # FastAPI's telemetry middleware wraps every request; OpenTelemetry is a namespace package, so py-spy
    # shortens its files to trace/..., context/...
    ("metrics / prometheus / telemetry", FRAME, r"fastapi/telemetry|opentelemetry|^(trace|context|propagate)/", ""),
    ("micro-batch / asyncio event loop / threads", FRAME, r"service/micro_batch\.py", ""),
    ("service code (middleware, routes, use cases, catalogue)", FRAME, r"(^|/)(service|serving_core)/", ""),
    ("FastAPI/starlette routing + dependencies", FRAME, r"(^|/)(fastapi|starlette)/", ""),
    ("HTTP (uvicorn + h11/httptools)", FRAME, r"(^|/)(uvicorn|h11|httptools)/|httptools", ""),
    # uvloop's Cython and libuv frames are named by their C sources (loop.c, core.c, ...)
    (
        "micro-batch / asyncio event loop / threads",
        FRAME,
        r"(^|/)(asyncio|anyio|concurrent|uvloop)/|uvloop|_asynciomodule\.c|_queuemodule|threading\.py|selectors"
        r"|^(loop|core|linux|loop-watcher|uv-common|stream|tcp|poll|timer|async)\.c$|^(queue|heap-inl)\.h$",
        "",
    ),
)
_COMPILED = {
    scope: tuple((bucket, re.compile(f), re.compile(fn)) for bucket, sc, f, fn in RULES if sc == scope)
    for scope in (STACK, FRAME)
}
BUCKETS: tuple[str, ...] = (*dict.fromkeys(b for b, _, _, _ in RULES), OTHER)  # report order

# The innermost named frame of a stack that waits (native symbols; unknown ones, '?', are skipped when looking).
WAITING = re.compile(
    r"^(epoll_p?wait|select|poll|ppoll|pthread_cond_(timed)?wait|PyThread_acquire_lock_timed|sem_(timed|clock)?wait"
    r"|futex_wait.*|__futex_abstimed_wait.*|(clock_)?nanosleep|accept4?|_queue_SimpleQueue_get(_impl)?)$"
)
# Launch-chain frames left out of the inclusive table (files, searched like RULES).
ENTRY = re.compile(
    r"(^|/)(typer|click)/|^missrec$|missrec_cli/|uvicorn/(main|server|_compat)\.py|asyncio/(runners|base_events|events)"
    r"\.py|threading\.py|concurrent/futures/thread\.py"
)

_FRAME = re.compile(r"^(?P<name>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


@dataclass(frozen=True)
class Frame:
    """One frame of a sampled stack: function (or native symbol) and file (or native library)."""

    function: str
    file: str

    @property
    def key(self) -> str:
        """``function (file)``: the frame without its line, the unit of the top-function tables."""
        return f"{self.function} ({self.file})"


def parse_frame(text: str) -> Frame:
    """``'run (serving_core/towers.py:212)'`` -> Frame('run', 'serving_core/towers.py'); unknown native symbols
    (``0x7f... (libc.so.6)``) become ``'?'`` so that they add up per library."""
    m = _FRAME.match(text.strip())
    if m is None:
        return Frame(text.strip(), "")
    name = m["name"]
    return Frame("?" if re.fullmatch(r"0x[0-9a-fA-F]+", name) else name, m["file"])


def parse_collapsed(lines: Iterable[str]) -> list[tuple[tuple[Frame, ...], int]]:
    """Collapsed-stack lines -> [(frames root first, samples)]; blank lines are skipped, a malformed one raises."""
    stacks = []
    for n, raw in enumerate(lines, 1):
        line = raw.rstrip("\n").rstrip()
        if not line:
            continue
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            raise ValueError(f"line {n} is not a collapsed stack ('frame;frame;... count'): {line[:120]!r}")
        stacks.append((tuple(parse_frame(f) for f in stack.split(";")), int(count)))
    return stacks


def is_waiting(frames: tuple[Frame, ...]) -> bool:
    """Whether the innermost named frame of a stack is a wait (WAITING)."""
    named = next((f for f in reversed(frames) if f.function != "?"), None)
    return named is not None and WAITING.match(named.function) is not None


def is_python(frame: Frame) -> bool:
    return frame.file.endswith(".py") or frame.file.startswith("<")


def bucket_of(frames: Iterable[Frame]) -> str:
    """The bucket of one stack (root first): waiting (WAITING), else the first stack-scope row that matches any
    frame, else the frame-scope row of the innermost frame one matches, else "other"."""
    frames = tuple(frames)
    if is_waiting(frames):
        return WAITING_BUCKET
    for bucket, file_re, fn_re in _COMPILED[STACK]:
        if any(file_re.search(f.file) and fn_re.search(f.function) for f in frames):
            return bucket
    for f in reversed(frames):
        for bucket, file_re, fn_re in _COMPILED[FRAME]:
            if file_re.search(f.file) and fn_re.search(f.function):
                return bucket
    return OTHER


@dataclass(frozen=True)
class Profile:
    """Samples per bucket and per function, over the stacks that work (waiting ones counted apart). Self: the
    stack's leaf frame; inclusive: Python functions anywhere in the stack (once per stack), ENTRY frames left out."""

    samples: int  # every sample, waiting included
    waiting: int
    buckets: dict[str, int]  # working samples per bucket
    self_samples: Counter[str]
    inclusive: Counter[str]

    @property
    def working(self) -> int:
        return self.samples - self.waiting

    def bucket_table(self) -> list[dict[str, object]]:
        """Every bucket in report order (empty ones too) with its samples and % of the working samples, then the
        waiting samples (% of all samples)."""
        rows = [
            {"bucket": b, "samples": self.buckets.get(b, 0), "pct": _pct(self.buckets.get(b, 0), self.working)}
            for b in BUCKETS
        ]
        waiting = {"bucket": WAITING_BUCKET, "samples": self.waiting, "pct_of_all": _pct(self.waiting, self.samples)}
        return [*rows, waiting]

    def top(self, which: str, n: int = 25) -> list[dict[str, object]]:
        """The n functions with the most self (``which="self"``) or inclusive samples, % of working samples."""
        counts = self.self_samples if which == "self" else self.inclusive
        return [{"function": f, "samples": c, "pct": _pct(c, self.working)} for f, c in counts.most_common(n)]


def _pct(part: int, whole: int) -> float:
    return round(100 * part / max(1, whole), 1)


def summarise(stacks: list[tuple[tuple[Frame, ...], int]]) -> Profile:
    """Group parsed stacks (:func:`parse_collapsed`) into a Profile."""
    buckets: Counter[str] = Counter()
    self_samples: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    waiting = 0
    for frames, count in stacks:
        bucket = bucket_of(frames)
        if bucket == WAITING_BUCKET:
            waiting += count
            continue
        buckets[bucket] += count
        if frames:
            self_samples[frames[-1].key] += count
        for key in {f.key for f in frames if is_python(f) and not ENTRY.search(f.file)}:
            inclusive[key] += count
    return Profile(sum(c for _, c in stacks), waiting, dict(buckets), self_samples, inclusive)
