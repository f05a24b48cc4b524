"""loadtest.versus: its own options vs the bench's, and the side-by-side figures of a bench summary."""

from __future__ import annotations

from pathlib import Path

from loadtest.versus import figures, parse_args


def _row(target: str, rps: float, p50: float, p99: float, cpu: float | None = None) -> dict:
    return {"target_rps": target, "svc_rps": rps, "svc_p50": p50, "svc_p99": p99, "svc_cpu_ms_req": cpu}


def test_options_before_the_separator_are_its_own_the_rest_go_to_the_bench():
    own, bench = parse_args(["--baseline", "/b", "--out", "o", "--also", "x=MISSREC_A=1", "--", "--bundle", "B"])
    assert own.baseline == Path("/b") and own.rounds == 2 and own.also == ["x=MISSREC_A=1"]
    assert bench == ["--bundle", "B"]


def test_figures_pick_the_maximum_the_lone_client_and_the_half_rate():
    summary = {
        "table": [
            _row("max", 500.0, 30.0, 50.0, 1.8),
            _row("5", 5.0, 6.0, 9.0),
            _row("250", 249.0, 8.0, 30.5),
            _row("lone", 210.0, 4.5, 8.7),
        ],
        "half_max": {"target": 250.0, "p99_ms": 30.5},
    }
    f = figures(summary)
    assert f["max req/s"] == "500.0" and f["CPU ms/req at max"] == "1.80"
    assert f["lone closed p50 / p99"] == "4.50 / 8.70" and f["open-loop lone p50 / p99"] == "6.00 / 9.00"
    assert f["half rate"] == "250" and f["half p50 / p99"] == "8.00 / 30.50"
    assert figures({"table": [_row("max", 1.0, 1.0, 1.0)]})["lone closed p50 / p99"] == "-"
