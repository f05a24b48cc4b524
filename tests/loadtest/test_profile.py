"""loadtest.profile and loadtest.stacks: real py-spy stacks of the service land in the right buckets; the command
profiles a real service (real py-spy, real ONNX Runtime, real Redis) and finds the tower and the HTTP layer."""

from __future__ import annotations

import json
import os

import pytest

from loadtest.stacks import (
    BUCKETS,
    ENTRY,
    OTHER,
    RULES,
    WAITING,
    WAITING_BUCKET,
    Frame,
    bucket_of,
    parse_collapsed,
    parse_frame,
    summarise,
)
from tests.paths import TEST_DATA

STACKS = TEST_DATA / "py-spy-service-stacks.txt"
CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}

# The bucket of each line of STACKS (py-spy 0.4.3 --native, `missrec serve` under loadtest.profile), read by hand
# from the stack's frames; the comment says what the stack was doing.
EXPECTED = [
    "FastAPI/starlette routing + dependencies",  # FastAPI.__call__ itself, under uvicorn
    "numpy exact re-scoring / top-k",  # top_k in serving_core/topk.py
    "service code (middleware, routes, use cases, catalogue)",  # recommender.search's own line
    "Redis client + history store",  # Store.read_events (the replicator)
    "Redis client + history store",  # a Redis command written on the uvloop transport (write(2))
    WAITING_BUCKET,  # an executor thread in SimpleQueue.get, unknown libc frames below
    "HTTP (uvicorn + h11/httptools)",  # RequestResponseCycle.run_asgi's own line
    "pydantic validation",  # pydantic_core under TypeAdapter.dump_json (the response)
    "logging / access log",  # uvicorn's access log: Logger.info
    "JSON serialisation",  # json.loads of the request body (starlette Request.json)
    "metrics / prometheus / telemetry",  # prometheus_client Histogram.observe in Metrics.timed
    "ONNX Runtime (towers)",  # native frames under InferenceSession.run
    "Python garbage collector",  # gc_collect_main triggered under starlette
    WAITING_BUCKET,  # pthread_cond_timedwait
    WAITING_BUCKET,  # the event loop in epoll_pwait
    "user tower feeds (numpy gather)",  # numpy under towers.interest_ids
    "FAISS search",  # faiss.downcast_index under topk._flat_matrix
]


@pytest.fixture(scope="module")
def stacks() -> list[tuple[tuple[Frame, ...], int]]:
    return parse_collapsed(STACKS.read_text(encoding="utf-8").splitlines())


def test_real_stacks_land_in_their_buckets(stacks):
    assert [bucket_of(frames) for frames, _ in stacks] == EXPECTED


def test_frames_parse_python_native_and_unknown():
    assert parse_frame("UserTower.run (serving_core/towers.py:238)") == Frame("UserTower.run", "serving_core/towers.py")
    assert parse_frame("uv__io_poll (linux.c:1452)") == Frame("uv__io_poll", "linux.c")
    assert parse_frame("epoll_pwait (libc.so.6)") == Frame("epoll_pwait", "libc.so.6")
    assert parse_frame("0x7f8ab844524a (libc.so.6)") == Frame("?", "libc.so.6")  # unknown symbols add up per library
    assert parse_frame("_Environ.__getitem__ (<frozen os>:676)") == Frame("_Environ.__getitem__", "<frozen os>")


def test_a_line_that_is_not_a_collapsed_stack_is_refused():
    with pytest.raises(ValueError, match="line 2"):
        parse_collapsed(["a (x.py:1);b (y.py:2) 3", "a (x.py:1);b (y.py:2)"])
    assert parse_collapsed(["", "a (x.py:1) 2"]) == [((Frame("a", "x.py"),), 2)]


def test_unmatched_stacks_are_other_and_every_bucket_is_reported():
    assert bucket_of([Frame("f", "somewhere/else.py")]) == OTHER
    assert set(BUCKETS) == {b for b, *_ in RULES} | {OTHER} and BUCKETS[-1] == OTHER


def test_summary_counts_work_apart_from_waiting(stacks):
    profile = summarise(stacks)
    total = sum(c for _, c in stacks)
    waiting = sum(c for (frames, c), b in zip(stacks, EXPECTED, strict=True) if b == WAITING_BUCKET)
    assert (profile.samples, profile.waiting) == (total, waiting) and waiting > 0
    table = profile.bucket_table()
    assert [r["bucket"] for r in table] == [*BUCKETS, WAITING_BUCKET]
    assert sum(r["samples"] for r in table[:-1]) == total - waiting
    assert sum(r["pct"] for r in table[:-1]) == pytest.approx(100, abs=0.5)
    # self: leaf frames of working stacks only (no wait leaf); inclusive: Python frames, no launch chain
    self_keys = {r["function"] for r in profile.top("self", 100)}
    assert self_keys and not [k for k in self_keys if WAITING.match(k.rsplit(" (", 1)[0])]
    inclusive = profile.top("inclusive", 1000)
    assert all(r["function"].endswith(".py)") or "(<" in r["function"] for r in inclusive)
    assert not [r for r in inclusive if ENTRY.search(r["function"].rsplit(" (", 1)[1])]
    top = {r["function"]: r["samples"] for r in inclusive}
    encode = [c for frames, c in stacks if "UserTower.encode" in {f.function for f in frames}]
    assert len(encode) == 2 and top["UserTower.encode (serving_core/towers.py)"] == sum(encode)  # ORT + the gather


# ----- the command, end to end -----------------------------------------------------------------------------------
def _py_spy_or_fail() -> None:
    from loadtest.profile import ProfilerMissing, py_spy

    try:
        py_spy()
    except ProfilerMissing as exc:
        if CI:
            pytest.fail(str(exc))
        pytest.skip(str(exc))


def test_missing_py_spy_is_a_clear_error(tmp_path, monkeypatch):
    from loadtest import profile

    monkeypatch.setattr(profile.sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(profile.ProfilerMissing, match="pip install py-spy"):
        profile.py_spy()


@pytest.mark.timeout(180)
@pytest.mark.slow  # the process tier: the service, locust and py-spy as processes
def test_profile_command_sees_the_tower_and_http(scientific_bundle, scientific_dir, tmp_path):
    _py_spy_or_fail()
    from loadtest.profile import main

    out = tmp_path / "profile"
    argv = ["--bundle", str(scientific_bundle), "--data", str(scientific_dir), "--out", str(out)]
    summary = main([*argv, "--clients", "8", "--seconds", "6", "--warmup", "2", "--sample-rate", "250"])
    assert (out / "profile.txt").stat().st_size > 0 and (out / "summary.md").is_file()
    assert json.loads((out / "summary.json").read_text()) == summary
    buckets = {r["bucket"]: r["samples"] for r in summary["buckets"]}
    assert buckets["ONNX Runtime (towers)"] > 0, buckets
    assert buckets["HTTP (uvicorn + h11/httptools)"] > 0, buckets
    assert summary["requests"] > 0 and summary["errors"] == 0 and summary["cpu_ms_per_request"] > 0
    assert len(summary["top_self"]) == len(summary["top_inclusive"]) == 25
