"""Shared fixtures: paths to the real shared datasets (a failure, not a skip, in CI when missing)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MISSREC_SHARED", ROOT.parent / "shared"))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--console-screenshots",
        action="store_true",
        help="tests/test_console.py writes its screenshots to docs/figures/console-*.png (else to a temp dir)",
    )


def _shared_path(*parts: str) -> Path:
    path = SHARED.joinpath(*parts)
    if not path.exists():
        msg = f"shared dataset {path} is missing (set MISSREC_SHARED to the shared/ folder)"
        if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
            pytest.fail(msg)
        pytest.skip(msg)
    return path


@pytest.fixture(scope="session")
def scientific_dir() -> Path:
    """../shared/data/scientific: real Amazon Scientific data with real CLIP features."""
    return _shared_path("data", "scientific")


@pytest.fixture(scope="session")
def abo_dir() -> Path:
    """../shared/data/abo-samples: real product photos and metadata."""
    return _shared_path("data", "abo-samples")


# ----- Redis: the machine's server when one answers on 127.0.0.1:6379, else an embedded one we start -------------
@pytest.fixture(scope="session")
def redis_url(tmp_path_factory) -> Iterator[str]:
    """URL of a real Redis server. Tests isolate themselves with unique key prefixes (never FLUSHALL)."""
    import redis

    url = os.environ.get("MISSREC_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
    try:
        client = redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)
        client.ping()
        client.close()
        yield url
        return
    except (redis.ConnectionError, redis.TimeoutError):
        pass
    from harness.launch import free_port
    from service.embedded_redis import EmbeddedRedis

    server = EmbeddedRedis(tmp_path_factory.mktemp("redis"), port=free_port())
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def key_prefix(redis_url) -> Iterator[str]:
    """A fresh key prefix; every key under it is deleted after the test."""
    import uuid

    from tests.helpers import drop_redis_keys

    prefix = f"missrec-test-{uuid.uuid4().hex[:10]}"
    yield prefix
    drop_redis_keys(redis_url, prefix)


# ----- artefacts built once per session from the REAL Scientific data ---------------------------------------------
def _source_key(*packages: str) -> str:
    """sha256 of the sources of ``packages``: a cached artefact is reused only by the code that made it."""
    import hashlib

    digest = hashlib.sha256()
    for package in packages:
        for path in sorted((ROOT / package).rglob("*.py")):
            digest.update(path.relative_to(ROOT).as_posix().encode() + path.read_bytes())
    return digest.hexdigest()[:16]


@pytest.fixture(scope="session")
def scientific_run(scientific_dir, tmp_path_factory) -> Path:
    """A MISSRec (inductive) trained for 2 epochs on real Scientific data: RUN_DIR with checkpoint.pt.

    MISSREC_TEST_CACHE=DIR (inner loop only; CI never sets it) keeps the run between sessions, keyed by the
    sources of missrec/, so a change to the model code trains again."""
    from missrec.data import load_dataset
    from missrec.runs import save_run, train_missrec
    from missrec.train import TrainOptions

    cache = os.environ.get("MISSREC_TEST_CACHE")
    target = Path(cache) / f"scientific-run-{_source_key('missrec')}" if cache else None
    if target is not None and (target / "checkpoint.pt").is_file():
        return target
    ds = load_dataset(scientific_dir)
    run = train_missrec(ds, TrainOptions(epochs=2, progress=False), "inductive")
    return save_run(run, ds, target or tmp_path_factory.mktemp("scientific-run"))


@pytest.fixture(scope="session")
def scientific_bundle(scientific_run, scientific_dir, tmp_path_factory) -> Path:
    """Serving bundle (ONNX towers + item table + exact Flat index) of ``scientific_run`` (cached like it)."""
    from index_builder.build import build_index
    from model_export.onnx_export import export_bundle
    from serving_core.bundle import BundleError, verify_checksums

    cache = os.environ.get("MISSREC_TEST_CACHE")
    if cache:
        key = _source_key("missrec", "model_export", "serving_core", "index_builder")
        bundle = Path(cache) / f"scientific-bundle-{key}"
        try:
            if verify_checksums(bundle).index is not None:
                return bundle
        except BundleError:
            pass
    else:
        bundle = tmp_path_factory.mktemp("bundles") / "scientific"
    export_bundle(scientific_run / "checkpoint.pt", scientific_dir, bundle, overwrite=True)
    build_index(bundle, factory="Flat", device="cpu")
    return bundle


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> tuple[str, str]:
    """(model name, local checkpoint path) of a RANDOM-INIT open_clip architecture saved to disk: the real
    loading path, no pretrained weights (none can be downloaded here)."""
    from missrec.clip_encoder import TINY_MODEL, save_random_init_checkpoint

    path = save_random_init_checkpoint(TINY_MODEL, tmp_path_factory.mktemp("clip") / "tiny.pt", seed=0)
    return TINY_MODEL, str(path)
