"""Bundle against bundle, through the serving path: which of two bundles recommends the held-out events better.

``missrec evaluate-bundle --bundle NEW --against CURRENT --data DIR`` loads each bundle exactly as the service does
(:meth:`service.serving_model.ServingModel.load`: ONNX towers, FAISS index) into a :class:`service.catalogue.
Catalogue` whose live items are the dataset's: dataset items a bundle does not hold are ingested from the
dataset's raw features through that bundle's item tower (as a swap re-embeds ingested items), bundle items the
dataset does not hold are deleted. Every user row of the split (the held-out last event by default) is then served
as the service serves it, through :func:`service.recommender.serve`: user tower over the history, exact top-k over
the index and the catalogue tail, the history excluded, k = the largest cut-off. A target's rank is its position in
the served list (past the list: a miss). NDCG@10 per user gives the paired bootstrap interval of NEW - CURRENT
(:func:`missrec.evaluation.stats.paired_bootstrap`) and the verdict: ``ahead`` (interval above zero), ``behind``
or ``not distinguishable``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from missrec.data.dataset import SeqDataset, load_dataset
from missrec.evaluation.metrics import metrics_from_ranks, ndcg_per_row
from missrec.evaluation.stats import PairedInterval, paired_bootstrap
from service.catalogue import Catalogue, Snapshot
from service.recommender import serve
from service.serving_model import ServingModel
from service.settings import Settings
from service.store import ItemRecord
from serving_core.bundle import MISSREC_FUSION

KS = (10, 50)
BATCH = 256


@dataclass(frozen=True)
class BundleScore:
    bundle: str
    version: str
    model_kind: str
    metrics: dict[str, float]
    ndcg_per_user: np.ndarray = field(repr=False)
    ingested: int  # dataset items this bundle did not hold, embedded by its item tower
    deleted: int  # bundle items the dataset does not hold
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "ndcg_per_user"}


@dataclass(frozen=True)
class BundleComparison:
    new: BundleScore
    current: BundleScore
    interval: PairedInterval  # NDCG@10, new - current
    split: str
    users: int

    @property
    def verdict(self) -> str:
        return self.interval.verdict

    def to_dict(self) -> dict[str, Any]:
        return {
            "split": self.split,
            "users": self.users,
            "new": self.new.to_dict(),
            "current": self.current.to_dict(),
            "ndcg@10_difference": self.interval.to_dict(),
            "verdict": self.verdict,
        }


def catalogue_for(model: ServingModel, ds: SeqDataset) -> tuple[Snapshot, int, int]:
    """A catalogue over ``model`` whose live items are exactly the dataset's -> (snapshot, ingested, deleted)."""
    catalogue = Catalogue(model)
    mods = model.manifest.modalities
    wanted = set(ds.item_ids)
    records = []
    lacking = [m for m in mods if m not in ds.features]
    for row, item_id in enumerate(ds.item_ids, start=1):
        if item_id in model.bundle_rows:
            continue
        if lacking:
            raise ValueError(f"the bundle's item tower needs {lacking} features, the dataset has none")
        arrays = {f"feature_{m}": ds.features[m][row].astype(np.float32).tobytes() for m in mods}
        records.append(ItemRecord(item_id=item_id, version=len(records) + 1, text="", arrays=arrays))
    ingested = len(records)
    for item_id in model.bundle_rows:
        if item_id not in wanted:
            records.append(ItemRecord(item_id=item_id, version=len(records) + 1, deleted=True))
    catalogue.apply(records)  # records of no bundle (bundle_version "") are embedded by this bundle's item tower
    return catalogue.current, ingested, len(records) - ingested


def score_bundle(bundle: Path, ds: SeqDataset, split: str = "test", settings: Settings | None = None) -> BundleScore:
    """Serve every row of ``split`` from ``bundle`` and score the served lists (see the module docstring)."""
    started = time.perf_counter()
    settings = settings or Settings(onnx_provider="cpu", faiss_device="cpu")
    model = ServingModel.load(Path(bundle), settings)
    snap, ingested, deleted = catalogue_for(model, ds)
    rows = ds.split(split)
    k = max(KS)
    ranks = np.full(len(rows), np.iinfo(np.int64).max, dtype=np.int64)
    for start in range(0, len(rows), BATCH):
        stop = min(start + BATCH, len(rows))
        histories, targets = [], []
        for r in range(start, stop):
            items = [ds.item_ids[i - 1] for i in rows.histories[r, : rows.lengths[r]]]
            known, _ = snap.rows_for(items)
            histories.append(np.asarray(known, dtype=np.int64))
            targets.append(snap.row(ds.item_ids[rows.targets[r] - 1]))
        served = serve(snap, histories, [k] * len(histories), [set(h.tolist()) for h in histories])
        for one, b, target in zip(served, range(start, stop), targets, strict=True):
            hit = np.flatnonzero(one.rows == target)
            if hit.size:
                ranks[b] = int(hit[0])
    fusion = model.manifest.scorer.kind == MISSREC_FUSION
    return BundleScore(
        bundle=str(bundle),
        version=model.version,
        model_kind=model.manifest.model_kind + (" (fusion)" if fusion else ""),
        metrics=metrics_from_ranks(np.minimum(ranks, 10 * k), KS),
        ndcg_per_user=ndcg_per_row(ranks, 10),
        ingested=ingested,
        deleted=deleted,
        seconds=round(time.perf_counter() - started, 2),
    )


def evaluate_bundles(
    new: Path, current: Path, data: Path, *, split: str = "test", resamples: int = 10_000, seed: int = 0
) -> BundleComparison:
    """Score ``new`` and ``current`` on the same rows of ``data`` and compare them per user."""
    ds = load_dataset(data)
    a, b = score_bundle(new, ds, split), score_bundle(current, ds, split)
    interval = paired_bootstrap(a.ndcg_per_user, b.ndcg_per_user, resamples=resamples, seed=seed)
    return BundleComparison(new=a, current=b, interval=interval, split=split, users=len(ds.split(split)))
