"""Ingest latency of one item, open_clip on torch against the exported graphs on ONNX Runtime, one thread each.

    flock /tmp/missrec-cpu.lock .venv/bin/python scripts/clip_onnx_benchmark.py \\
        --abo ../shared/data/abo-samples --work /tmp/clip-bench --model ViT-B-32 --repeats 5

The model is a RANDOM-INIT ``--model`` (no pretrained weights can be downloaded here) saved with
``save_random_init_checkpoint`` and loaded back through open_clip's loader, then exported with ``missrec export-clip``'s
code (parity-checked); the cost of a forward pass does not depend on the weight values, so the times hold for the
pretrained ViT-B-32. One item = what ingestion's ``ingest_encode`` stage does: decode + preprocess + image tower,
tokenize + text tower (``encode_item``), on the real ABO photos and product texts. Both runtimes run in this one
process on one intra-op thread, item by item alternately (torch, ORT, torch, ...), so drift on a shared machine hits
both alike. Printed: per-item latency (p50, p90, mean) per runtime, the torch / ORT ratio, and the max |difference|
of the features the two give.
"""

from __future__ import annotations

import argparse
import base64
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--abo", type=Path, required=True, help="ABO samples: photos + metadata.txt per product")
    p.add_argument("--work", type=Path, required=True, help="where the checkpoint and the CLIP ONNX directory go")
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--repeats", type=int, default=5, help="passes over the items")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)

    import onnxruntime as ort
    import torch

    from clip_features.onnx_encoder import OnnxClipEncoder
    from clip_features.preprocess import file_sha256
    from clip_features.torch_encoder import ClipEncoder, save_random_init_checkpoint
    from harness.abo import abo_photos
    from model_export.clip import export_clip

    torch.set_num_threads(1)
    checkpoint = args.work / f"{args.model}-random-init.pt"
    if not checkpoint.is_file():
        save_random_init_checkpoint(args.model, checkpoint, seed=0)
    clip_dir = args.work / f"{args.model}-onnx"
    manifest_path = clip_dir / "clip.json"
    fresh = manifest_path.is_file() and json.loads(manifest_path.read_text())["checkpoint_sha256"] == file_sha256(
        checkpoint
    )
    export_s = None
    if not fresh:
        t0 = time.perf_counter()
        export_clip(args.model, checkpoint, clip_dir, args.abo, overwrite=True)
        export_s = time.perf_counter() - t0
    encoders = {"torch": ClipEncoder(args.model, checkpoint), "onnxruntime": OnnxClipEncoder(clip_dir, threads=1)}
    items = [(p["text"], base64.b64decode(p["image_base64"])) for p in abo_photos(args.abo)]
    for encoder in encoders.values():  # warm-up, discarded
        for text, image in items[:2]:
            encoder.encode_item(text, image)
    times: dict[str, list[float]] = {name: [] for name in encoders}
    parts: dict[str, list[float]] = {f"{name} {m}": [] for name in encoders for m in ("image", "text")}
    diff = {"text": 0.0, "image": 0.0}
    for _ in range(args.repeats):
        for text, image in items:
            features = {}
            for name, encoder in encoders.items():
                t0 = time.perf_counter()
                features[name] = encoder.encode_item(text, image)
                t1 = time.perf_counter()
                encoder.encode_image(image)
                t2 = time.perf_counter()
                encoder.encode_text(text)
                times[name].append(t1 - t0)
                parts[f"{name} image"].append(t2 - t1)
                parts[f"{name} text"].append(time.perf_counter() - t2)
            for m, worst in diff.items():
                diff[m] = max(worst, float(np.abs(features["torch"][m] - features["onnxruntime"][m]).max()))

    def stats(values: list[float]) -> dict[str, float]:
        ms = 1e3 * np.asarray(values)
        return {"p50_ms": float(np.median(ms)), "p90_ms": float(np.percentile(ms, 90)), "mean_ms": float(ms.mean())}

    rows = {name: stats(values) for name, values in times.items()}
    part_rows = {name: stats(values) for name, values in parts.items()}
    ratio = {k: rows["torch"][k] / rows["onnxruntime"][k] for k in rows["torch"]}
    report = {
        "model": f"{args.model} (random init, seed 0)",
        "items": len(items),
        "repeats": args.repeats,
        "threads": 1,
        "versions": {"torch": torch.__version__, "onnxruntime": ort.__version__, "python": platform.python_version()},
        "export_s": export_s,
        "latency": rows,
        "latency_by_tower": part_rows,
        "torch_over_ort": ratio,
        "max_abs_feature_diff": diff,
    }
    print(f"{args.model}, one thread, {len(items)} real ABO items x {args.repeats} passes (encode_item = image + text)")
    print(f"{'runtime':<12} {'p50 ms':>8} {'p90 ms':>8} {'mean ms':>8}")
    for name, r in rows.items():
        print(f"{name:<12} {r['p50_ms']:>8.1f} {r['p90_ms']:>8.1f} {r['mean_ms']:>8.1f}")
    print(f"{'torch / ORT':<12} {ratio['p50_ms']:>7.2f}x {ratio['p90_ms']:>7.2f}x {ratio['mean_ms']:>7.2f}x")
    for m in ("image", "text"):
        t, o = part_rows[f"torch {m}"]["p50_ms"], part_rows[f"onnxruntime {m}"]["p50_ms"]
        print(f"{m + ' only':<12} p50 torch {t:.1f} ms, ORT {o:.1f} ms: {t / o:.2f}x")
    print(f"max |torch - ORT| feature difference: text {diff['text']:.2e}, image {diff['image']:.2e}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report


if __name__ == "__main__":
    main()
