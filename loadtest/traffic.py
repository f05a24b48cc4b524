"""The traffic file of a load test: real users with their histories, the item pool for events, product photos.

The locustfile reads only this JSON file (it talks HTTP and never imports the model or the service); the benchmark
writes it from a dataset in the atomic format (real Scientific users by default) and checks it against a bundle.

    {"users": [{"id": "A2...", "history": ["B00...", ...]}, ...],     # oldest first, the users' test histories
     "items": ["B00...", ...], "item_weights": [...],                  # events pick items by training popularity
     "products": [{"text": "...", "image_base64": "..."}, ...]}        # real ABO photos + text for ingests
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from harness.abo import abo_photos

DEFAULT_MIX = "user=80,history=7.5,events=12,ingest=0.5"  # relative weights of the request kinds (locustfile)


def build_traffic(data_dir: Path, bundle_ids: list[str], abo_dir: Path | None, max_history: int = 50) -> dict:
    """Traffic of the real users of ``data_dir`` whose items all exist in the bundle (item ids ``bundle_ids``)."""
    from missrec.data.dataset import load_dataset

    ds = load_dataset(data_dir)
    known = set(bundle_ids)
    users = []
    test = ds.test
    for r in range(len(test)):
        rows = test.histories[r, : test.lengths[r]].tolist()
        history = [ds.item_ids[i - 1] for i in rows][-max_history:]
        if history and all(i in known for i in history):
            users.append({"id": ds.user_ids[int(test.users[r])], "history": history})
    counts = np.bincount(ds.train.targets, minlength=ds.num_items)[1:].astype(np.float64) + 1.0
    items = [(j, i) for j, i in enumerate(ds.item_ids) if i in known]
    return {
        "source": str(data_dir),
        "users": users,
        "items": [i for _, i in items],
        "item_weights": [round(float(counts[j]), 3) for j, _ in items],
        "products": abo_photos(abo_dir) if abo_dir else [],
    }


def write_traffic(path: Path, traffic: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(traffic), encoding="utf-8")
    return path


def read_traffic(path: str | Path) -> dict:
    traffic = json.loads(Path(path).read_text(encoding="utf-8"))
    if not traffic.get("users") or not traffic.get("items"):
        raise ValueError(f"{path}: a traffic file needs users and items")
    return traffic
