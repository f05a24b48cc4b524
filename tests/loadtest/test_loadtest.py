"""Load-test plumbing: the bare baseline app, sample and histogram statistics (numpy oracles), a short open-loop
locust run against the bare app, the benchmark's options and report, and the SYNTHETIC scale-bundle tool."""

from __future__ import annotations

import csv
import json
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from harness.launch import wait_ready
from harness.ports import free_port
from loadtest import procs
from loadtest.stats import Histogram, read_samples, stage_deltas
from tests.paths import ROOT


def test_bare_app_has_the_service_shapes():
    from loadtest.bare_app import app

    with TestClient(app) as client:
        body = client.post("/v1/recommend", json={"user_id": "u1", "k": 7}).json()
        assert len(body["items"]) == 7 and body["exact"] is True and body["fallback"] is None
        assert client.post("/v1/recommend", json={"history": ["a", "b"], "k": 3}).json()["history_length"] == 2
        assert client.post("/v1/recommend", json={"user_id": "u1", "history": ["a"]}).status_code == 422
        assert client.post("/v1/users/u1/events", json={"item_ids": ["a"]}).json()["history_length"] == 1
        r = client.post("/v1/items", json={"item_id": "n1", "text": "x", "image_base64": "aGk="})
        assert r.status_code == 201 and r.json()["item_id"] == "n1"


def test_histogram_quantiles_bracket_the_true_quantiles():
    from service.metrics import LATENCY_BUCKETS, Metrics

    rng = np.random.default_rng(0)
    first, second = rng.lognormal(-5.5, 0.8, 3000), rng.lognormal(-4.5, 0.5, 2000)
    metrics = Metrics()
    for x in first:
        metrics.stage.labels("search").observe(x)
    before = metrics.render().decode()
    for x in second:
        metrics.stage.labels("search").observe(x)
    h = stage_deltas(before, metrics.render().decode())["stage:search"]  # only what happened in between
    assert h.count == second.size and h.total == pytest.approx(second.sum())
    bounds = [0.0, *LATENCY_BUCKETS, np.inf]
    for q in (0.5, 0.9, 0.99):
        true = np.quantile(second, q)
        lo = max(b for b in bounds if b <= true)
        hi = min(b for b in bounds if b >= true)
        assert lo <= h.quantile(q) <= hi


def test_histogram_quantile_in_overflow_bucket_is_last_bound():
    h = Histogram([(0.1, 0.0), (float("inf"), 5.0)], total=5.0, count=5.0)
    assert h.quantile(0.5) == 0.1


def _write_samples(path: Path, rows: list[tuple], duration: float, rate: float) -> None:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["kind", "sched_s", "lag_ms", "latency_ms", "latency_sched_ms", "status"])
        w.writerows(rows)
    meta = {"t0": 100.0, "stopped": 100.0 + duration, "duration_s": duration, "rate": rate, "in_flight_at_stop": 0}
    path.with_suffix(".json").write_text(json.dumps(meta))


def test_read_samples_drops_warmup_and_counts_errors(tmp_path):
    rows = [("user", 0.5, 0.1, 999.0, 999.0, 200)]  # in the warm-up: ignored
    rows += [("user", 1.0 + i / 100, 0.1, float(i), float(i), 200) for i in range(1, 101)]
    rows += [("events", 1.5, 0.1, 5.0, 5.0, 503)]
    _write_samples(tmp_path / "s.csv", rows, duration=11.0, rate=10.0)
    stats = read_samples(tmp_path / "s.csv", warmup_s=1.0)
    assert stats.requests == 101 and stats.errors == 1 and stats.achieved == pytest.approx(10.0)
    assert stats.p50 == pytest.approx(np.percentile(np.arange(1, 101), 50))
    assert stats.p99 == pytest.approx(np.percentile(np.arange(1, 101), 99))
    assert stats.kinds["events"]["errors"] == 1 and stats.sustained is True
    assert (stats.t_start, stats.t_stop) == (101.0, 111.0)


@pytest.mark.slow  # the process tier: locust and the bare app as processes
def test_open_loop_locust_run_against_the_bare_app(tmp_path):
    """A 4 s open-loop run at 40 req/s: the locustfile, the pacing and the samples, end to end (about 10 s)."""
    traffic = {
        "users": [{"id": f"u{i}", "history": [f"i{j}" for j in range(i % 5 + 1)]} for i in range(50)],
        "items": [f"i{j}" for j in range(20)],
        "item_weights": [1.0] * 20,
        "products": [{"text": "a lamp.", "image_base64": "aGk="}],
    }
    (tmp_path / "traffic.json").write_text(json.dumps(traffic))
    port = free_port()
    bare = procs.serve_bare(port, tmp_path / "logs", None)
    try:
        wait_ready(f"http://127.0.0.1:{port}", bare, 60)
        cmd = procs.locust_args(
            f"http://127.0.0.1:{port}", tmp_path / "traffic.json", tmp_path / "run", rate=40, users=2, duration=4,
            mix="user=40,history=20,events=20,ingest=10,explain=10", tag="t", k=5,
        )  # fmt: skip
        started = time.monotonic()
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
        assert (tmp_path / "run.csv").is_file(), out.stderr[-2000:]
    finally:
        bare.stop()
    stats = read_samples(tmp_path / "run.csv", warmup_s=1.0)
    assert stats.errors == 0 and set(stats.kinds) == {"user", "history", "events", "ingest", "explain"}
    assert 30 <= stats.achieved <= 50, stats.achieved  # paced at the target rate, not as fast as possible
    assert (tmp_path / "run_stats.csv").is_file() and time.monotonic() - started < 30


def test_bench_options_and_report(capsys):
    from loadtest.bench import parse_args
    from loadtest.report import main_table, print_report
    from loadtest.stats import RunStats

    args = parse_args(["--bundle", "b", "--data", "d", "--out", "o", "--rates", "10", "20", "--no-pin"])
    assert args.rates == [10.0, 20.0] and args.service_cpus == "" and args.onnx_provider == "auto"
    assert parse_args(["--bundle", "b", "--data", "d", "--out", "o", "--faiss-device", "gpu"]).faiss_device == "gpu"
    assert (
        args.explain_cost == 0
        and parse_args(["--bundle", "b", "--data", "d", "--out", "o", "--explain-cost", "3"]).explain_cost == 3
    )

    def run(name, target, achieved, p99, cpu):
        s = RunStats(target, 10.0, int(achieved * 10), 0, achieved, 1.0, 2.0, p99, 0.1, 0)
        return {"name": name, "stats": s, "cpu": {"service": cpu, "locust": 0.2}, "stages": {}}

    service = [
        run("service-max", 0, 400, 50, 1.0),
        run("service-r5", 5, 5, 4, 0.1),
        run("service-r200", 200, 199, 9, 0.6),
    ]
    bare = [run("bare-max", 0, 2000, 5, 1.0), run("bare-r5", 5, 5, 1, 0.01), run("bare-r200", 200, 200, 1, 0.1)]
    rows = main_table(service, bare)
    assert rows[2]["svc_cpu_ms_req"] == pytest.approx(1e3 * 0.6 / 199)
    summary = print_report(rows, service, bare, None, args)
    assert summary["ratio"] == pytest.approx(0.2) and summary["half_max"]["p99_ms"] == 9
    assert summary["lone"]["rate"] == 5 and summary["lone"]["service_p50_ms"] == summary["lone"]["bare_p50_ms"]
    printed = capsys.readouterr().out
    assert "ratio 0.20" in printed and "lone request (5 req/s" in printed


@pytest.mark.slow
def test_scale_bundle_keeps_real_items_and_builds_the_index(scientific_bundle, scientific_dir, tmp_path):
    from loadtest.scale_bundle import SYNTHETIC_PREFIX, scale_bundle
    from serving_core.bundle import read_bundle

    base_table = read_bundle(scientific_bundle).table
    n_real = base_table.num_items - 1
    out = tmp_path / "big"
    info = scale_bundle(
        scientific_bundle, scientific_dir, n_real + 3000, out, factory="IVF32,Flat", nprobe=8, chunk=1000,
        recall_queries=50,
    )  # fmt: skip
    big = read_bundle(out)  # checksums, shapes, cluster ranges
    manifest, table = big.manifest, big.table
    assert manifest.num_items == table.num_items == n_real + 3001 and "SYNTHETIC" in manifest.created
    assert table.ids[: n_real + 1] == base_table.ids and table.ids[-1].startswith(SYNTHETIC_PREFIX)
    np.testing.assert_array_equal(table.tokens[: n_real + 1], base_table.tokens)
    synthetic = table.vectors["text"][n_real + 1 :]
    assert np.allclose(np.linalg.norm(synthetic, axis=1), 1.0, atol=1e-4)  # through the item tower: unit vectors
    assert len({tuple(r) for r in np.round(synthetic[:200], 4)}) == 200  # distinct items, not copies
    assert info.ntotal == table.num_items and info.details["recall_report"]["source"] == "user vectors"
    assert manifest.index.factory == "IVF32,Flat" and manifest.index.params["nprobe"] == 8
    assert set(manifest.rescore_vectors) == set(table.half) == {"text", "image"}  # float16 copies for the re-scoring
    assert (out / "user_tower.onnx").read_bytes() == (scientific_bundle / "user_tower.onnx").read_bytes()


@pytest.mark.slow  # the process tier: two replicas, Redis and locust as processes
def test_scaleout_demo_two_replicas_one_redis(scientific_bundle, scientific_dir, abo_dir, tmp_path, capsys):
    """The scale-out guide's local example, short: 2 replicas + Redis, locust on both, ingests seen across."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("scaleout_demo", ROOT / "scripts" / "scaleout_demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    args = ["--bundle", str(scientific_bundle), "--data", str(scientific_dir), "--abo", str(abo_dir)]
    code = demo.main([*args, "--out", str(tmp_path / "so"), "--rate", "15", "--duration", "4", "--probes", "3"])
    printed = capsys.readouterr().out
    assert code == 0, printed[-3000:]
    summary = json.loads((tmp_path / "so" / "summary.json").read_text())
    assert summary["histories_shared"] and summary["total_achieved_rps"] > 20
    assert summary["ingest_on_A_visible_on_B"]["count"] == 3 and summary["ingest_on_B_visible_on_A"]["count"] == 3
    assert summary["ingest_on_A_visible_on_B"]["p99_ms"] < 1000  # the stream carries items across within 1 s


def test_memory_reads_the_status_fields_and_the_bundle_mappings(tmp_path):
    """loadtest.memory's readings of a live process (this one): /proc/PID/status fields and the resident part of
    the file mappings under a directory."""
    import os

    from loadtest.memory import FIELDS, mapped_mib, status_mib

    if not Path("/proc/self/smaps").is_file():
        pytest.skip("needs /proc (Linux)")
    np.save(tmp_path / "a.npy", np.ones((4096, 256), np.float32))  # 4 MiB
    mapped = np.load(tmp_path / "a.npy", mmap_mode="r")
    assert float(mapped.sum()) == 4096 * 256  # every page touched
    status = status_mib(os.getpid())
    assert set(FIELDS) <= set(status) and status["VmRSS"] >= status["RssAnon"] > 0
    assert 3.5 <= mapped_mib(os.getpid(), tmp_path) <= 4.5
    assert mapped_mib(os.getpid(), tmp_path / "elsewhere") == 0
