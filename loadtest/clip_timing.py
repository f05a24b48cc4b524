"""How long open_clip takes to encode one new item (real ABO photo + text), per architecture and thread count.

    flock /tmp/missrec-cpu.lock .venv/bin/python -m loadtest.clip_timing --abo ../shared/data/abo-samples \\
        --models missrec-tiny-512 ViT-B-32 --threads 1 2

The weights are RANDOM-INIT (no pretrained weights can be downloaded here); the cost of a forward pass does not
depend on the weight values, so the times hold for the pretrained ViT-B-32 that production would use. This is the
``ingest_encode`` stage of the service (decode + resize + image tower + text tower), without the item tower.
"""

from __future__ import annotations

import argparse
import base64
import json
import time
from pathlib import Path

import numpy as np

from harness.abo import abo_photos


def time_model(model: str, products: list[dict], threads: int, repeats: int) -> dict[str, float]:
    import torch

    from clip_features.torch_encoder import ClipEncoder

    torch.set_num_threads(threads)
    encoder = ClipEncoder.random_init(model)
    images = [base64.b64decode(p["image_base64"]) for p in products]
    for p, img in zip(products[:2], images[:2], strict=False):  # warm-up, discarded
        encoder.encode_item(p["text"], img)
    item, image_only, text_only = [], [], []
    for _ in range(repeats):
        for p, img in zip(products, images, strict=True):
            t0 = time.perf_counter()
            encoder.encode_item(p["text"], img)
            t1 = time.perf_counter()
            encoder.encode_image(img)
            t2 = time.perf_counter()
            encoder.encode_text(p["text"])
            t3 = time.perf_counter()
            item.append(t1 - t0)
            image_only.append(t2 - t1)
            text_only.append(t3 - t2)

    def ms(values: list[float], q: float) -> float:
        return round(1e3 * float(np.percentile(values, q)), 1)

    return {
        "model": model,
        "threads": threads,
        "items": len(item),
        "item_p50_ms": ms(item, 50),
        "item_p99_ms": ms(item, 99),
        "image_p50_ms": ms(image_only, 50),
        "text_p50_ms": ms(text_only, 50),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m loadtest.clip_timing", description=__doc__.split("\n")[0])
    p.add_argument("--abo", type=Path, required=True)
    p.add_argument("--models", nargs="+", default=["missrec-tiny-512", "ViT-B-32"])
    p.add_argument("--threads", type=int, nargs="+", default=[1])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    products = abo_photos(args.abo)
    rows = [time_model(m, products, t, args.repeats) for m in args.models for t in args.threads]
    print(f"{'model':<18} {'threads':>7} {'items':>5} {'item p50':>9} {'item p99':>9} {'image p50':>9} {'text p50':>9}")
    for r in rows:
        print(
            f"{r['model']:<18} {r['threads']:>7} {r['items']:>5} {r['item_p50_ms']:>9} {r['item_p99_ms']:>9} "
            f"{r['image_p50_ms']:>9} {r['text_p50_ms']:>9}"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
