"""The service refuses to start, with one clear line, on a corrupted or mismatched bundle, or on items stored in
Redis that its bundle cannot serve (the real bundle trained on Scientific data, real Redis, real uvicorn)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import pytest
import redis.asyncio as aredis
from fastapi.testclient import TestClient

from harness.launch import ROOT
from harness.ports import free_port
from service.replication import StartupRefused
from service.store import ItemRecord, ItemStore
from serving_core.bundle import FORMAT_VERSION, BundleWriter, read_manifest
from tests.service_helpers import make_app

pytestmark = pytest.mark.slow  # the process tier: the service as a subprocess


def _copy(bundle: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(bundle, tmp_path / "bundle"))


def _refinalize(root: Path) -> None:
    """Record the current files in the manifest, so the checksums pass and only the deeper checks can object."""
    BundleWriter(root).finalize(read_manifest(root))


def test_serve_refuses_a_corrupted_bundle(scientific_bundle, redis_url, tmp_path):
    root = _copy(scientific_bundle, tmp_path)
    tower = root / "user_tower.onnx"
    data = bytearray(tower.read_bytes())
    data[len(data) // 2] ^= 0x01
    tower.write_bytes(bytes(data))
    port = free_port()
    env = {
        **os.environ,
        "MISSREC_REDIS_URL": redis_url,
        "MISSREC_CLIP_PRETRAINED": "",
        "MISSREC_DATA_DIR": str(tmp_path),
    }
    started = time.monotonic()
    out = subprocess.run(
        [str(Path(sys.executable).parent / "missrec"), "serve", "--bundle", str(root), "--port", str(port)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=120,
        check=False,
    )
    log = out.stdout + out.stderr
    assert out.returncode != 0, log[-3000:]
    lines = [line for line in log.splitlines() if "refusing to start" in line]
    assert lines, log[-3000:]
    assert "invalid bundle" in lines[0] and "user_tower.onnx fails its checksum" in lines[0], lines[0]
    assert log.index("refusing to start") < log.index("Traceback")  # the reason comes first, not after a stack
    print(f"refused in {time.monotonic() - started:.1f} s: {lines[0]}")


def _format_version(root: Path) -> str:
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["format_version"] = FORMAT_VERSION + 1
    (root / "manifest.json").write_text(json.dumps(manifest))
    return f"format version {FORMAT_VERSION + 1}, this code reads {FORMAT_VERSION}"


def _vector_width(root: Path) -> str:
    vectors = np.load(root / "items" / "text.npy")
    np.save(root / "items" / "text.npy", np.ascontiguousarray(vectors[:, :-1]))
    _refinalize(root)
    return rf"items/text.npy: shape \({vectors.shape[0]}, {vectors.shape[1] - 1}\), expected"


def _index_dims(root: Path) -> str:
    manifest = read_manifest(root)
    n, hidden = manifest.num_items, manifest.dims.hidden
    index = faiss.IndexFlatIP(64)
    index.add(np.zeros((n, 64), dtype=np.float32))
    faiss.write_index(index, str(root / "index" / "index.faiss"))
    _refinalize(root)
    return f"{n} x 64 vectors, manifest says {n} x {hidden}"


class _OpensAFile:
    """Unpickling this creates ``path``: proof of code execution if a loader ever unpickles bundle files."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple:
        return (open, (str(self.path), "w"))


def _pickled_npy(root: Path) -> str:
    marker = root.parent / "unpickled"
    np.save(root / "items" / "popularity.npy", np.array([_OpensAFile(marker)], dtype=object), allow_pickle=True)
    _refinalize(root)
    return "items/popularity.npy: not a plain .npy array"


def _no_manifest(root: Path) -> str:
    (root / "manifest.json").unlink()
    return "is not a bundle: manifest.json is missing"


def _older_format(root: Path) -> str:
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["format_version"] = 1
    (root / "manifest.json").write_text(json.dumps(manifest))
    return "bundle format version 1 is older than the 2 this code reads; rebuild it with this version"


@pytest.mark.parametrize(
    "damage", [_format_version, _older_format, _vector_width, _index_dims, _pickled_npy, _no_manifest]
)
def test_app_refuses_a_mismatched_bundle(damage, scientific_bundle, redis_url, key_prefix, tiny_clip, tmp_path):
    root = _copy(scientific_bundle, tmp_path)
    expected = damage(root)
    app = make_app(root, redis_url, key_prefix, tiny_clip, tmp_path, warmup=False)
    with pytest.raises(StartupRefused, match="refusing to start: invalid bundle .*" + expected), TestClient(app):
        pass
    assert not (tmp_path / "unpickled").exists()


def test_app_refuses_stored_items_its_bundle_cannot_serve(
    scientific_bundle, redis_url, key_prefix, tiny_clip, tmp_path
):
    """An item ingested under another model (768-d CLIP features) is in Redis: serving without it would lose an
    acknowledged write, serving it is impossible, so the service does not start and says which item and why."""
    bad = ItemRecord(
        item_id="from-a-768d-model",
        text="t",
        bundle_version="other-bundle",
        arrays={
            "feature_text": np.zeros(768, np.float32).tobytes(),
            "feature_image": np.zeros(768, np.float32).tobytes(),
        },
    )

    async def put() -> None:
        client = aredis.Redis.from_url(redis_url)
        await ItemStore(client, prefix=key_prefix).put_item(bad, origin="test")
        await client.aclose()

    asyncio.run(put())
    app = make_app(scientific_bundle, redis_url, key_prefix, tiny_clip, tmp_path, warmup=False)
    expected = r"'from-a-768d-model' \(written by bundle other-bundle\): feature_text is 768-d, bundle .* expects 512-d"
    with pytest.raises(StartupRefused, match=expected), TestClient(app):
        pass
