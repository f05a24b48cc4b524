"""`make run`'s job, `missrec quickstart`, as a new user runs it: no bundle, no Redis, no data configured.

It must build a bundle on SYNTHETIC data, serve it with an embedded Redis, take events, recommend (explained),
ingest a real product photo, stop cleanly on Ctrl-C, and reuse its bundle the next time.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import httpx
import pytest

from harness.launch import wait_ready
from harness.ports import free_port
from tests.paths import ROOT

pytestmark = pytest.mark.slow  # the process tier: a training run and a uvicorn process with its own redis-server


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MISSREC_")}  # nothing configured
    return env | {"PYTHONPATH": str(ROOT)}


def test_quickstart_builds_serves_ingests_and_reuses_its_bundle(tmp_path, abo_products):
    port = free_port()
    log = tmp_path / "quickstart.log"
    cmd = [sys.executable, "-m", "missrec_cli.main", "quickstart", "--epochs", "1", "--port", str(port)]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=_env(), cwd=tmp_path,
            start_new_session=True,
        )  # fmt: skip
    bundle = tmp_path / "var/quickstart/bundle"
    try:
        wait_ready(f"http://127.0.0.1:{port}", None, 300)
        ids = json.loads((bundle / "items/ids.json").read_text(encoding="utf-8"))[1:]
        assert json.loads((bundle / "manifest.json").read_text())["index"] is not None
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as c:
            assert c.get("/readyz").json()["checks"]["redis"] == "ok"
            assert c.post("/v1/users/u1/events", json={"item_ids": ids[:2]}).status_code == 200
            r = c.post("/v1/recommend", json={"user_id": "u1", "k": 5, "explain": True})
            assert r.status_code == 200, r.text
            items = r.json()["items"]
            assert len(items) == 5 and not {i["item_id"] for i in items} & set(ids[:2])
            because = [i["explanation"]["because"] for i in items]
            assert all(b and {x["item_id"] for x in b} <= set(ids[:2]) for b in because)  # explained by the history
            product = abo_products[0]
            new = c.post(
                "/v1/items",
                data={"item_id": "new-1", "text": product["text"]},
                files={"image": ("photo.jpg", product["images"][0].read_bytes(), "image/jpeg")},
            )
            assert new.status_code == 201, new.text
            assert c.get("/v1/items/new-1").status_code == 200
            r = c.post("/v1/recommend", json={"history": ["new-1"], "k": 3})
            assert r.status_code == 200 and len(r.json()["items"]) == 3
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C on `make run`
        assert proc.wait(60) == 0, log.read_text(errors="replace")[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    built = (bundle / "manifest.json").stat().st_mtime_ns
    again = subprocess.run(
        [*cmd, "--no-serve"],
        check=False,
        env=_env(),
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=300,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert (bundle / "manifest.json").stat().st_mtime_ns == built  # reused, not retrained
