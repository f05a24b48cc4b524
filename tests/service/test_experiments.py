"""A/B experiment end to end on real data: two MISSRec bundles of the Scientific catalogue (seed 0, 2 epochs, 300-d
and seed 1, 1 epoch, 128-d) as variants; real test users' histories replayed as events, a recommendation, then each
user's held-out next item sent as an event with its recommendation_id. The counts in Redis equal ours, a retried
events call counts nothing twice, a replica restarted mid-experiment loses nothing, and ending promotes the winner."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.experiments import assign, difference_interval
from tests.service_helpers import make_app

KEY = "exp-key"
AUTH = {"X-API-Key": KEY}
K = 10
USERS = 300


def _test_users(scientific_dir: Path, n: int) -> list[tuple[list[str], str]]:
    index = dict(
        reversed(line.split("\t")) for line in (scientific_dir / "Scientific.item2index").read_text().splitlines()
    )
    rows = (scientific_dir / "Scientific.test.inter").read_text().splitlines()[1 : n + 1]
    out = []
    for line in rows:
        _, hist, target = line.split("\t")
        out.append(([index[t] for t in hist.split()], index[target]))
    return out


def _app(swap_root, redis_url, prefix, tiny_clip, tmp):
    # Redis calls may wait up to 5 s (default 0.5): the counting is checked here, not the fail-fast path (tested by
    # tests/harness/test_outage.py), and a starved 2-core CI machine must not turn a slow call into a 503
    return make_app(
        swap_root / "a", redis_url, prefix, tiny_clip, tmp, api_key=KEY, warmup=False, redis_timeout_seconds=5.0
    )


def _loaded(c: TestClient) -> None:
    """Wait until this replica has read the experiment and loaded the variant that is not its serving bundle."""
    experiments = c.app.state.service.experiments
    deadline = time.monotonic() + 120
    while not experiments.catalogues:
        experiments._checked = 0.0
        c.portal.call(experiments.refresh)
        assert time.monotonic() < deadline
        time.sleep(0.2)


def test_assignment_is_stable_and_follows_the_shares():
    variants = [{"name": "a", "share": 0.3}, {"name": "b", "share": 0.7}]
    got = [assign("x", f"u{i}", variants) for i in range(4000)]
    assert got == [assign("x", f"u{i}", variants) for i in range(4000)]
    assert 0.27 < got.count("a") / 4000 < 0.33
    d = difference_interval({"impressions": 100, "hits": 30}, {"impressions": 100, "hits": 20})
    assert d["low"] < 0.1 < d["high"] and d["difference"] == pytest.approx(0.1)


def test_experiment_end_to_end_on_real_data(swap_root, redis_url, key_prefix, tiny_clip, tmp_path, scientific_dir):
    users = _test_users(scientific_dir, USERS)
    ours = {"a": [0, 0], "b": [0, 0]}  # impressions, hits
    variants = {"variants": [{"name": "a", "bundle": "a", "share": 0.5}, {"name": "b", "bundle": "b", "share": 0.5}]}

    def replay(c: TestClient, start: int, stop: int) -> None:
        for u in range(start, stop):
            history, target = users[u]
            user = f"exp-user-{u}"
            body = {"item_ids": history, "idempotency_key": f"h{u}"}
            assert c.post(f"/v1/users/{user}/events", json=body).status_code == 200
            rec = c.post("/v1/recommend", json={"user_id": user, "k": K}).json()
            assert rec["variant"] == assign("ab", user, variants["variants"]) and rec["recommendation_id"]
            shown = [i["item_id"] for i in rec["items"]]
            ours[rec["variant"]][0] += 1
            ours[rec["variant"]][1] += target in shown
            event = {"item_ids": [target], "recommendation_id": rec["recommendation_id"], "idempotency_key": f"t{u}"}
            for _ in range(2):  # a retry with the same key: counted once
                assert c.post(f"/v1/users/{user}/events", json=event).status_code == 200
            # the same item again without a key nor an id: attributed to the same recommendation, not counted again
            assert c.post(f"/v1/users/{user}/events", json={"item_ids": [target]}).status_code == 200

    with TestClient(_app(swap_root, redis_url, key_prefix, tiny_clip, tmp_path / "r0"), headers=AUTH) as c:
        r = c.put("/v1/admin/experiments/ab", json=variants, headers=AUTH)
        assert r.status_code == 201, r.text
        bad = {"variants": [{"name": "a", "bundle": "a", "share": 0.5}, {"name": "b", "bundle": "b", "share": 0.6}]}
        assert c.put("/v1/admin/experiments/ab", json=bad, headers=AUTH).status_code == 422
        _loaded(c)
        replay(c, 0, USERS // 2)
    with TestClient(_app(swap_root, redis_url, key_prefix, tiny_clip, tmp_path / "r1"), headers=AUTH) as c:  # restart
        _loaded(c)
        replay(c, USERS // 2, USERS)
        stats = c.get("/v1/admin/experiments/ab", headers=AUTH).json()
        by = {v["name"]: v for v in stats["variants"]}
        assert [by[v]["impressions"] for v in "ab"] == [ours[v][0] for v in "ab"]
        assert sum(ours[v][0] for v in "ab") == USERS
        assert [by[v]["hits"] for v in "ab"] == [ours[v][1] for v in "ab"]
        assert [by[v]["interactions"] for v in "ab"] == [ours[v][1] for v in "ab"]
        diff = by["b"]["difference_vs_a"]
        print(f"\nonline hit rate@{K}: " + ", ".join(f"{v} {by[v]['hits']}/{by[v]['impressions']}" for v in "ab")
              + f"; b - a = {diff['difference']:.4f} [{diff['low']:.4f}, {diff['high']:.4f}]")  # fmt: skip
        metrics = c.get("/metrics").text
        assert 'missrec_experiment_total{experiment="ab",kind="hits",variant="a"}' in metrics
        end = c.post("/v1/admin/experiments/ab/end", json={"promote": True}, headers=AUTH).json()
        assert end["state"] == "ended" and end["promoted"]["variant"] in "ab"
        after = c.post("/v1/recommend", json={"user_id": "exp-user-0", "k": K}).json()
        assert after["variant"] is None and after["recommendation_id"] is None
        assert c.app.state.service.experiments.catalogues == {}  # the variant's catalogue was let go


def test_offline_ordering_of_the_two_variants(swap_root, scientific_dir):
    """The offline hit rate@10 of both bundles on the same users, for comparison with the online figures."""
    from service.catalogue import Catalogue
    from service.recommender import serve
    from service.serving_model import ServingModel
    from service.settings import Settings

    users = _test_users(scientific_dir, USERS)
    rates = {}
    for name in ("a", "b"):
        model = ServingModel.load(swap_root / name, Settings(bundle=swap_root / name, onnx_provider="cpu"))
        snap = Catalogue(model).current
        rows = [np.asarray([snap.row(i) for i in h]) for h, _ in users]
        served = serve(snap, rows, [K] * len(rows), [set(r.tolist()) for r in rows])
        hits = sum(snap.row(t) in s.rows.tolist() for (_, t), s in zip(users, served, strict=True))
        rates[name] = hits / len(users)
    print(f"\noffline hit rate@{K} over the same {USERS} users: a {rates['a']:.4f}, b {rates['b']:.4f}")


def test_missrec_experiment_drives_it_from_the_command_line(swap_root, redis_url, key_prefix, tiny_clip, tmp_path):
    from typer.testing import CliRunner

    from harness.launch import InProcessServer
    from missrec_cli.main import app as cli

    runner = CliRunner()
    with InProcessServer(_app(swap_root, redis_url, key_prefix, tiny_clip, tmp_path)) as server:
        args = ["experiment", "cli-ab", "--url", server.url, "--api-key", KEY]
        started = runner.invoke(cli, [*args, "--variant", "a=a:0.4", "--variant", "b=b:0.6"])
        assert started.exit_code == 0, started.output
        shown = runner.invoke(cli, args)
        assert shown.exit_code == 0 and "0 impressions" in shown.output
        bad = runner.invoke(cli, [*args, "--variant", "a=a:0.5", "--variant", "b=b:0.6"])
        assert bad.exit_code == 2
        ended = runner.invoke(cli, [*args, "--end"])
        assert ended.exit_code == 0 and "ended" in ended.output
