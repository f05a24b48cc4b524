"""A SYNTHETIC large catalogue on top of a trained bundle: the real items first, then synthetic ones, same towers.

    python -m loadtest.scale_bundle --base runs/scientific-bundle --data ../shared/data/scientific \\
        --items 1000000 --out runs/bundle-1m [--factory IVF4096,Flat --nprobe 32]

There is no million-item trained dataset, so the extra items are made the way new items enter the service: raw
512-d features per modality go through the bundle's own item tower (item_tower.onnx: adapters, normalised vectors,
interest clusters). The features are SYNTHETIC, in the generator's style (topic centres + noise), with real items as
the topics: feature = a f_i + (1 - a) f_j + noise * sigma * g, for two real items i, j (drawn by popularity),
a ~ U(0, 1), sigma the per-dimension standard deviation of the real features, g standard normal. Rows 1..n of the
base bundle (the real items) are kept unchanged, so the real users' histories stay valid and the benchmark drives
the big catalogue with the same traffic. The user tower, centroids and fusion parameters are the base bundle's.
The index (default: the ANN index chosen in the bundle issue, IVF4096,Flat with nprobe 32) is built with
index_builder.build, its recall report computed against exact search with the REAL users' vectors.

Memory: about 4 x items x 300 x 4 bytes while writing (1.2 GB per array at 1M items), more while indexing.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np

from index_builder.build import build_index
from serving_core.bundle import BundleWriter, IndexInfo, ItemTable, creation_info, read_bundle
from serving_core.towers import open_towers

log = logging.getLogger("loadtest.scale_bundle")
SYNTHETIC_PREFIX = "SYN"


def synthetic_features(
    real: dict[str, np.ndarray], weights: np.ndarray, n: int, rng: np.random.Generator, noise: float
) -> dict[str, np.ndarray]:
    """(n, F_m) SYNTHETIC features per modality around pairs of real items (rows >= 1 of real[m])."""
    pairs = rng.choice(np.arange(1, weights.shape[0]), size=(n, 2), p=weights[1:] / weights[1:].sum())
    a = rng.random((n, 1), dtype=np.float32)
    out = {}
    for m, f in real.items():
        sigma = f[1:].std(axis=0).astype(np.float32)
        g = rng.standard_normal((n, f.shape[1]), dtype=np.float32)
        out[m] = a * f[pairs[:, 0]] + (1 - a) * f[pairs[:, 1]] + np.float32(noise) * sigma * g
    return out


def scale_bundle(
    base: Path,
    data: Path,
    items: int,
    out: Path,
    *,
    factory: str = "IVF4096,Flat",
    nprobe: int | None = 32,
    noise: float = 0.5,
    chunk: int = 50_000,
    seed: int = 0,
    recall_queries: int = 500,
    overwrite: bool = False,
) -> IndexInfo:
    """Write the bundle ``out`` with ``items`` items (base items first) and its index; returns the index info."""
    from missrec.data.dataset import load_dataset

    if out.exists():
        if not overwrite:
            raise FileExistsError(f"{out} exists (pass --overwrite)")
        shutil.rmtree(out)
    bundle = read_bundle(base)
    manifest, table, centroids = bundle.manifest, bundle.table, bundle.centroids
    if manifest.scorer.transductive:
        raise ValueError("transductive bundles have trained ID vectors: scale an inductive bundle")
    ds = load_dataset(data)
    if table.ids[1:] != list(ds.item_ids):
        raise ValueError(f"{data} is not the dataset of {base} (item ids differ)")
    n_real = table.num_items - 1
    if items <= n_real:
        raise ValueError(f"--items must exceed the {n_real} real items of the base bundle")
    n_rows, dim = items + 1, manifest.dims.hidden
    modalities = manifest.modalities
    towers = open_towers(bundle, "cpu")
    tower = towers.item
    tokens = np.empty((n_rows, dim), np.float32)
    vectors = {m: np.empty((n_rows, dim), np.float32) for m in modalities}
    clusters = {m: np.empty(n_rows, np.int64) for m in modalities}
    tokens[: table.num_items] = table.tokens
    for m in modalities:
        vectors[m][: table.num_items] = table.vectors[m]
        clusters[m][: table.num_items] = table.clusters[m]
    rng = np.random.default_rng(seed)
    weights = table.popularity.astype(np.float64) + 1.0
    real = {m: ds.features[m] for m in modalities}
    started = time.perf_counter()
    for start in range(table.num_items, n_rows, chunk):
        stop = min(n_rows, start + chunk)
        feats = synthetic_features(real, weights, stop - start, rng, noise)
        enc = tower.encode(feats.get("text"), feats.get("image"))
        tokens[start:stop] = enc["tokens"]
        for m in modalities:
            vectors[m][start:stop] = enc[m]
            clusters[m][start:stop] = enc[f"{m}_cluster"]
        log.info("item tower: %d / %d rows (%.0f s)", stop, n_rows, time.perf_counter() - started)
    width = len(str(items))
    big = ItemTable(
        ids=[*table.ids, *(f"{SYNTHETIC_PREFIX}{i:0{width}d}" for i in range(1, items - n_real + 1))],
        tokens=tokens,
        vectors=vectors,
        clusters=clusters,
        popularity=np.concatenate([table.popularity, np.zeros(items - n_real, np.float32)]),
        id_vectors=None,
        texts=[*table.texts, *([""] * (items - n_real))] if table.texts is not None else None,
    )
    big.validate(manifest.dims, manifest.scorer, manifest.num_interests)
    writer = BundleWriter(out)
    writer.write_item_table(big)
    writer.write_centroids(centroids)
    for graph in manifest.graphs.values():
        shutil.copyfile(base / graph.file, writer.path(graph.file))
    created = creation_info(
        "loadtest.scale_bundle",
        SYNTHETIC=f"{items - n_real} synthetic items (item tower over synthetic features) after {n_real} real ones",
        base=str(base),
        base_version=manifest.version,
        noise=noise,
        seed=seed,
    )
    # the base's float16 copies describe its own rows: build_index writes the new table's
    writer.finalize(dataclasses.replace(manifest, num_items=n_rows, index=None, created=created, rescore_vectors={}))
    log.info("item table of %d rows written in %.0f s", n_rows, time.perf_counter() - started)

    # real users' vectors for the recall report (histories of the test split; rows are the base bundle's)
    user = towers.user
    test = ds.test
    pick = rng.choice(len(test), size=min(recall_queries, len(test)), replace=False)
    users = user.encode([test.histories[r, : test.lengths[r]] for r in pick])
    del tokens, vectors, clusters, big, table
    gc.collect()
    params = {"nprobe": nprobe} if nprobe else None
    info = build_index(out, factory, "cpu", params=params, user_vectors=users, recall_queries=len(users))
    log.info("index %s built in %.0f s: %s", factory, info.details["build_seconds"], info.details.get("recall_report"))
    return info


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m loadtest.scale_bundle", description=__doc__.split("\n")[0])
    p.add_argument("--base", type=Path, required=True, help="trained bundle (its real items come first)")
    p.add_argument("--data", type=Path, required=True, help="the base bundle's dataset (real features as topics)")
    p.add_argument("--items", type=int, required=True, help="items in the new bundle (real + synthetic)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--factory", default="IVF4096,Flat", help="FAISS index_factory string (Flat = exact)")
    p.add_argument("--nprobe", type=int, default=32, help="IVF lists probed (0 = the index default)")
    p.add_argument("--noise", type=float, default=0.5, help="noise around the topic centres, in feature stds")
    p.add_argument("--chunk", type=int, default=50_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--recall-queries", type=int, default=500, help="real users in the index recall report")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    nprobe = args.nprobe if "IVF" in args.factory and args.nprobe else None
    info = scale_bundle(
        args.base, args.data, args.items, args.out, factory=args.factory, nprobe=nprobe, noise=args.noise,
        chunk=args.chunk, seed=args.seed, recall_queries=args.recall_queries, overwrite=args.overwrite,
    )  # fmt: skip
    print(json.dumps({k: v for k, v in dataclasses.asdict(info).items() if k != "ids"}, indent=2))


if __name__ == "__main__":
    main()
