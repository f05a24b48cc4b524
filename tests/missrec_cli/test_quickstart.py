"""`make run`'s job, `missrec quickstart`, as a new user runs it: no bundle, no Redis, no data configured.

It must build a bundle on SYNTHETIC data and the ONNX export of its (random-init) CLIP, parity-checked on SYNTHETIC
images; serve with an embedded Redis from a process that never loads torch; take events, recommend (explained),
ingest a real product photo with open_clip's features (<= the export's tolerance); stop cleanly on Ctrl-C; reuse
its bundle and export the next time; and with --clip torch serve with open_clip (torch) in the process instead.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis

from harness.launch import wait_ready
from harness.ports import free_port
from tests.paths import ROOT

pytestmark = pytest.mark.slow  # the process tier: a training run and a uvicorn process with its own redis-server

PARITY_ATOL = 1e-4  # model_export.parity.PARITY_ATOL: what the export guarantees


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MISSREC_")}  # nothing configured
    return env | {"PYTHONPATH": str(ROOT)}


def _loads_torch(pid: int) -> bool:
    """True when torch's native library is mapped into the process (``import torch`` maps torch/lib/libtorch_cpu.so;
    nothing unloads it)."""
    return "libtorch_cpu" in Path(f"/proc/{pid}/maps").read_text()


@contextlib.contextmanager
def _quickstart(cwd: Path, port: int, log: Path, *args: str) -> Iterator[tuple[subprocess.Popen, httpx.Client]]:
    """A served ``missrec quickstart``, ready; stopped with Ctrl-C (SIGINT to its group), which must exit 0."""
    cmd = [sys.executable, "-m", "missrec_cli.main", "quickstart", "--epochs", "1", "--port", str(port), *args]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=_env(), cwd=cwd,
            start_new_session=True,
        )  # fmt: skip
    try:
        wait_ready(f"http://127.0.0.1:{port}", None, 300)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as c:
            yield proc, c
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C on `make run`
        assert proc.wait(60) == 0, log.read_text(errors="replace")[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _stored_features(root: Path, item_id: str) -> dict[str, np.ndarray]:
    """The raw CLIP features the service stored for an ingested item, read from its embedded Redis."""
    from service.store.items import ItemRecord

    client = redis.Redis(unix_socket_path=str(root / "state/redis/redis.sock"))
    try:
        record = ItemRecord.from_hash(item_id, client.hgetall(f"missrec:{{items}}:item:{item_id}"))
    finally:
        client.close()
    return {m: np.frombuffer(record.arrays[f"feature_{m}"], dtype=np.float32) for m in ("text", "image")}


def test_quickstart_builds_serves_ingests_and_reuses_its_bundle(tmp_path, abo_products):
    port = free_port()
    log = tmp_path / "quickstart.log"
    root = tmp_path / "var/quickstart"
    bundle, clip_onnx = root / "bundle", root / "clip-onnx"
    product = abo_products[0]
    photo = product["images"][0].read_bytes()
    with _quickstart(tmp_path, port, log) as (proc, c):
        checks = c.get("/readyz").json()["checks"]
        assert checks["redis"] == "ok" and checks["ingestion"] == "ok", checks
        # the served process (the quickstart replaced itself with `missrec serve`) never loaded torch
        assert b"serve" in Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")
        assert not _loads_torch(proc.pid)
        ids = json.loads((bundle / "items/ids.json").read_text(encoding="utf-8"))[1:]
        assert json.loads((bundle / "manifest.json").read_text())["index"] is not None
        assert c.post("/v1/users/u1/events", json={"item_ids": ids[:2]}).status_code == 200
        r = c.post("/v1/recommend", json={"user_id": "u1", "k": 5, "explain": True})
        assert r.status_code == 200, r.text
        items = r.json()["items"]
        assert len(items) == 5 and not {i["item_id"] for i in items} & set(ids[:2])
        because = [i["explanation"]["because"] for i in items]
        assert all(b and {x["item_id"] for x in b} <= set(ids[:2]) for b in because)  # explained by the history
        new = c.post(
            "/v1/items",
            data={"item_id": "new-1", "text": product["text"]},
            files={"image": ("photo.jpg", photo, "image/jpeg")},
        )
        assert new.status_code == 201, new.text
        assert c.get("/v1/items/new-1").status_code == 200
        r = c.post("/v1/recommend", json={"history": ["new-1"], "k": 3})
        assert r.status_code == 200 and len(r.json()["items"]) == 3
        stored = _stored_features(root, "new-1")
        assert not _loads_torch(proc.pid)  # ingestion did not load it either
    text = log.read_text(errors="replace")
    assert "parity check on SYNTHETIC images and texts" in text, text[-3000:]
    clip = json.loads((clip_onnx / "clip.json").read_text())
    assert clip["parity"]["inputs"] == "SYNTHETIC" and clip["parity"]["images"] >= 8
    assert max(clip["parity"]["image_max_abs_diff"], clip["parity"]["text_max_abs_diff"]) <= PARITY_ATOL
    # the real photo, ingested through ONNX Runtime, has open_clip's features on the same checkpoint
    from clip_features.torch_encoder import ClipEncoder

    expected = ClipEncoder(clip["model_name"], str(root / "clip-random-init.pt")).encode_item(product["text"], photo)
    for modality in ("text", "image"):
        assert np.abs(stored[modality] - expected[modality]).max() <= PARITY_ATOL, modality

    built = {p: p.stat().st_mtime_ns for p in (bundle / "manifest.json", clip_onnx / "clip.json")}
    again = subprocess.run(
        [sys.executable, "-m", "missrec_cli.main", "quickstart", "--epochs", "1", "--no-serve"],
        check=False,
        env=_env(),
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=300,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in built} == built  # reused, not retrained or exported again
    assert b"reusing the CLIP ONNX export" in again.stdout

    # --clip torch: the same quick start with open_clip (torch) in the served process, which ingests with it
    with _quickstart(tmp_path, free_port(), tmp_path / "torch.log", "--clip", "torch") as (proc, c):
        assert c.get("/readyz").json()["checks"]["ingestion"] == "ok"
        assert _loads_torch(proc.pid)  # the probe above sees torch where it is loaded
        new = c.post(
            "/v1/items",
            data={"item_id": "new-2", "text": product["text"]},
            files={"image": ("photo.jpg", photo, "image/jpeg")},
        )
        assert new.status_code == 201, new.text
        stored = _stored_features(root, "new-2")
    for modality in ("text", "image"):  # open_clip itself (its thread count may move the last bits)
        assert np.abs(stored[modality] - expected[modality]).max() <= PARITY_ATOL, modality
    assert {p: p.stat().st_mtime_ns for p in built} == built


def test_clip_torch_with_an_onnx_export_configured_is_refused_before_any_work(tmp_path):
    cmd = [sys.executable, "-m", "missrec_cli.main", "quickstart", "--clip", "torch", "--no-serve"]
    env = _env() | {"MISSREC_CLIP_ONNX": str(tmp_path / "clip-onnx")}
    done = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "MISSREC_CLIP_ONNX" in done.stdout + done.stderr
    assert not (tmp_path / "var/quickstart/bundle").exists()  # nothing trained
