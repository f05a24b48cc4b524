"""Shared fixtures: paths to the real shared datasets (a failure, not a skip, in CI when missing)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.paths import ROOT

SHARED = Path(os.environ.get("MISSREC_SHARED", ROOT.parent / "shared"))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--console-screenshots",
        action="store_true",
        help="tests/service/test_console.py writes its screenshots to docs/figures/console-*.png (else to a temp dir)",
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
def scientific_full_dir() -> Path:
    """../shared/data/scientific-full: the full Amazon Scientific (UniSRec processing), text only, 384-d MiniLM."""
    return _shared_path("data", "scientific-full")


@pytest.fixture(scope="session")
def abo_dir() -> Path:
    """../shared/data/abo-samples: real product photos and metadata."""
    return _shared_path("data", "abo-samples")


@pytest.fixture(scope="session")
def abo_products(abo_dir) -> list[dict]:
    """The real ABO products (id, text, photo paths), read by the one reader (:func:`harness.abo.abo_products`)."""
    from harness.abo import abo_products as read

    return read(abo_dir)


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
    from harness.ports import free_port
    from service.embedded_redis import EmbeddedRedis

    server = EmbeddedRedis(tmp_path_factory.mktemp("redis"), port=free_port())
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory):
    """A real 3-master Redis Cluster on 127.0.0.1 (slots split evenly), started from the redis-server binary."""
    import subprocess
    import time

    import redis

    from harness.ports import cluster_ports
    from service.embedded_redis import redis_server_binary

    base = tmp_path_factory.mktemp("cluster")
    ports = cluster_ports(3)
    procs = []
    for port in ports:
        d = base / str(port)
        d.mkdir()
        procs.append(subprocess.Popen(
            [redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
             "--cluster-config-file", str(d / "nodes.conf"), "--dir", str(d), "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        ))  # fmt: skip
    try:
        clients = [redis.Redis(host="127.0.0.1", port=p) for p in ports]
        deadline = time.monotonic() + 10
        for c in clients:
            while True:
                try:
                    c.ping()
                    break
                except redis.ConnectionError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
        bounds = [0, 5461, 10923, 16384]
        for c, lo, hi in zip(clients, bounds, bounds[1:], strict=False):
            c.execute_command("CLUSTER", "ADDSLOTS", *range(lo, hi))
        for c in clients[1:]:
            c.execute_command("CLUSTER", "MEET", "127.0.0.1", ports[0])
        while time.monotonic() < deadline + 20:
            infos = [c.execute_command("CLUSTER", "INFO") for c in clients]
            text = [i.decode() if isinstance(i, bytes) else str(i) for i in infos]
            if all("cluster_state:ok" in t for t in text):
                break
            time.sleep(0.1)
        else:
            raise RuntimeError("cluster did not converge")
        yield f"redis://127.0.0.1:{ports[0]}/0"
    finally:
        for p in procs:
            p.terminate()
            p.wait(5)


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


def _trained_run(data: Path, tmp_path_factory, name: str, epochs: int, seed: int = 0, **config) -> Path:
    """MISSRec (inductive) trained on ``data``: RUN_DIR with checkpoint.pt.

    MISSREC_TEST_CACHE=DIR (inner loop only; CI never sets it) keeps the run between sessions, keyed by the
    sources of missrec/, so a change to the model code trains again."""
    from missrec.data.dataset import load_dataset
    from missrec.recipes.missrec import train_missrec
    from missrec.training.loop import TrainOptions
    from missrec.training.run import save_run

    cache = os.environ.get("MISSREC_TEST_CACHE")
    target = Path(cache) / f"{name}-{_source_key('missrec')}" if cache else None
    if target is not None and (target / "checkpoint.pt").is_file():
        return target
    ds = load_dataset(data)
    run = train_missrec(ds, TrainOptions(epochs=epochs, seed=seed, progress=False), "inductive", config=config or None)
    return save_run(run, ds, target or tmp_path_factory.mktemp(name))


def _exported_bundle(run: Path, data: Path, tmp_path_factory, name: str) -> Path:
    """Serving bundle (ONNX towers + item table + exact Flat index) of ``run`` (cached like it)."""
    from index_builder.build import build_index
    from model_export.bundle import export_bundle
    from serving_core.bundle import BundleError, verify_checksums

    cache = os.environ.get("MISSREC_TEST_CACHE")
    if cache:
        key = _source_key("missrec", "model_export", "serving_core", "index_builder")
        bundle = Path(cache) / f"{name}-{key}"
        try:
            if verify_checksums(bundle).index is not None:
                return bundle
        except BundleError:
            pass
    else:
        bundle = tmp_path_factory.mktemp("bundles") / name
    export_bundle(run / "checkpoint.pt", data, bundle, overwrite=True)
    build_index(bundle, factory="Flat", device="cpu")
    return bundle


@pytest.fixture(scope="session")
def scientific_run(scientific_dir, tmp_path_factory) -> Path:
    """A MISSRec (inductive) trained for 2 epochs on real Scientific data: RUN_DIR with checkpoint.pt."""
    return _trained_run(scientific_dir, tmp_path_factory, "scientific-run", epochs=2)


@pytest.fixture(scope="session")
def scientific_bundle(scientific_run, scientific_dir, tmp_path_factory) -> Path:
    """Serving bundle (ONNX towers + item table + exact Flat index) of ``scientific_run`` (cached like it)."""
    return _exported_bundle(scientific_run, scientific_dir, tmp_path_factory, "scientific-bundle")


@pytest.fixture(scope="session")
def scientific_bundle_b(scientific_dir, tmp_path_factory) -> Path:
    """A second, different bundle of the same catalogue (bundle swaps): MISSRec trained 1 epoch with seed 1 and
    128-d hidden vectors instead of 300 (other towers, other vector widths, the same raw feature widths)."""
    run = _trained_run(scientific_dir, tmp_path_factory, "scientific-run-b", epochs=1, seed=1, hidden=128)
    return _exported_bundle(run, scientific_dir, tmp_path_factory, "scientific-bundle-b")


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> tuple[str, str]:
    """(model name, local checkpoint path) of a RANDOM-INIT open_clip architecture saved to disk: the real
    loading path, no pretrained weights (none can be downloaded here)."""
    from clip_features.torch_encoder import TINY_MODEL, save_random_init_checkpoint

    path = save_random_init_checkpoint(TINY_MODEL, tmp_path_factory.mktemp("clip") / "tiny.pt", seed=0)
    return TINY_MODEL, str(path)


@pytest.fixture(scope="session")
def tiny_clip_onnx(tiny_clip, abo_dir, tmp_path_factory) -> Path:
    """``tiny_clip`` exported by ``missrec export-clip``'s code (parity-checked on the real ABO photos and texts)."""
    from model_export.clip import export_clip

    out = tmp_path_factory.mktemp("clip-onnx") / "tiny"
    export_clip(tiny_clip[0], tiny_clip[1], out, abo_dir)
    return out


# ----- MSM4SR and MMSRec bundles from the REAL Scientific data (export and serving tests) -------------------------
SEED_MODELS = {
    # kind -> (family, trainer name, overrides): one epoch each. MMSRec at hidden 64 (spec: 512) keeps the test
    # fast; the export and serving paths do not depend on the width.
    "msm4sr": ("msm4sr", "train_msm4sr", {}),
    "msm4sr-transductive": ("msm4sr", "train_msm4sr", {"mode": "transductive"}),
    # the ID + content hybrid: transductive, each item's ID dropped with probability 0.5 per training step
    "msm4sr-hybrid": ("msm4sr", "train_msm4sr", {"mode": "transductive", "id_dropout": 0.5}),
    "mmsrec": ("mmsrec", "train_mmsrec", {"hidden": 64, "n_heads": 2, "ff_dim": 256}),
}


@pytest.fixture(scope="session")
def seed_bundles(scientific_dir, tmp_path_factory):
    """kind -> (run dir with checkpoint.pt, bundle with an exact Flat index), built on first use per kind (cached
    under MISSREC_TEST_CACHE like ``scientific_bundle``)."""
    from index_builder.build import build_index
    from missrec.data.dataset import load_dataset
    from missrec.families import family
    from missrec.training.loop import TrainOptions
    from missrec.training.run import save_run
    from model_export.bundle import export_bundle
    from serving_core.bundle import BundleError, verify_checksums

    cache = os.environ.get("MISSREC_TEST_CACHE")
    key = _source_key("missrec", "model_export", "serving_core", "index_builder")
    built: dict[str, tuple[Path, Path]] = {}

    def get(kind: str) -> tuple[Path, Path]:
        if kind in built:
            return built[kind]
        root = Path(cache) / f"seed-{kind}-{key}" if cache else tmp_path_factory.mktemp(f"seed-{kind}")
        run, bundle = root / "run", root / "bundle"
        try:
            if cache and (run / "checkpoint.pt").is_file() and verify_checksums(bundle).index is not None:
                built[kind] = run, bundle
                return built[kind]
        except BundleError:
            pass
        name, trainer, overrides = SEED_MODELS[kind]
        ds = load_dataset(scientific_dir)
        result = getattr(family(name).recipe(), trainer)(ds, TrainOptions(epochs=1, progress=False), **overrides)
        save_run(result, ds, run)
        export_bundle(run / "checkpoint.pt", scientific_dir, bundle, overwrite=True)
        build_index(bundle, factory="Flat", device="cpu", progress=False)
        built[kind] = run, bundle
        return built[kind]

    return get


@pytest.fixture(scope="module")
def swap_root(scientific_bundle, scientific_bundle_b, tmp_path_factory) -> Path:
    """A MISSREC_BUNDLE_ROOT (one per test module) with the two real bundles as a/ and b/ (copies: a symlink out of
    the root is refused)."""
    import shutil

    root = tmp_path_factory.mktemp("bundle-root")
    shutil.copytree(scientific_bundle, root / "a")
    shutil.copytree(scientific_bundle_b, root / "b")
    return root


# ----- tiers ------------------------------------------------------------------------------------------------------
# oracle: marked in its modules (seconds); slow: the process tier, marked in its modules, plus every test that uses
# a Redis Cluster (redis-server processes of its own); service: the in-process service tier, every other test that
# talks to the real Redis (the app in this process). `pytest -m "not slow"` is the inner loop.
PROCESS_FIXTURES = frozenset({"redis_cluster"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        if names & PROCESS_FIXTURES:
            item.add_marker(pytest.mark.slow)
        if "redis_url" in names and item.get_closest_marker("slow") is None:
            item.add_marker(pytest.mark.service)
