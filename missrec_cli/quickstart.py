"""``missrec quickstart`` (what ``make run`` runs): build what is missing under ``var/quickstart``, then serve.

Preparation happens in this process: the bundle (trained on ``$MISSREC_DATA``, else on SYNTHETIC data), the
demo CLIP checkpoint and, with ``--clip onnx`` (the default), its ONNX export with the parity check of ``missrec
export-clip`` (on ``--clip-samples`` photos, else on SYNTHETIC images and texts), each reused on the next run.
Training and the export import torch, so the service does not run here: this process then *replaces itself*
(``os.execv``, same PID, same terminal, Ctrl-C stops it) with ``missrec serve``, a fresh interpreter that on the
ONNX path never imports torch or open_clip. ``--clip torch`` keeps open_clip (torch) in the served process.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from missrec_cli.common import console, fail

log = logging.getLogger(__name__)

QUICKSTART_DIR = Path("var/quickstart")
DEMO_CLIP_MODEL = "missrec-tiny-512"
DEFAULT_CLIP_MODEL = "ViT-B-32"  # MISSREC_CLIP_MODEL's default (service/settings.py)
CLIP_RUNTIMES = ("onnx", "torch")


def _demo_clip(root: Path) -> tuple[str, str]:
    """A random-init open_clip checkpoint for the demo (no pretrained weights can be assumed offline)."""
    path = root / "clip-random-init.pt"
    if not path.is_file():
        from clip_features.torch_encoder import save_random_init_checkpoint

        save_random_init_checkpoint(DEMO_CLIP_MODEL, path, seed=0)
    return DEMO_CLIP_MODEL, str(path.resolve())


def _quickstart_bundle(root: Path, epochs: int) -> Path:
    from missrec.data.synthetic import generate_synthetic
    from missrec_cli.pipeline import train_export_index
    from serving_core.bundle import BundleError, verify_checksums

    bundle = root / "bundle"
    data_env = os.environ.get("MISSREC_DATA")
    if (bundle / "manifest.json").is_file():
        try:
            manifest = verify_checksums(bundle)
            if manifest.index is not None:
                console.print(f"reusing bundle {bundle} ({manifest.version})")
                return bundle
        except BundleError as exc:
            console.print(f"[yellow]rebuilding the quick-start bundle: {exc}[/]")
    if data_env:
        data = Path(data_env)
        console.print(f"training MISSRec on MISSREC_DATA={data}")
    else:
        data = root / "synthetic-data"
        if not (data / "Synthetic.train.inter").is_file():
            console.print("generating a SYNTHETIC dataset (set MISSREC_DATA to train on your own data)")
            # small enough to train in about a minute on a laptop CPU
            generate_synthetic(data, num_users=1200, num_items=800, max_seq_len=15, seed=0)
    bundle, _, metrics = train_export_index(
        data, root, epochs=epochs, patience=3, device="auto", meta={"quickstart": True}
    )
    console.print(f"trained: test {metrics['test']}")
    return bundle


def _clip_onnx(root: Path, model: str, weights: str, samples: Path | None) -> Path:
    """``root/clip-onnx``: the export of (model, weights), reused when it is intact and made from them (and, with
    ``samples``, checked on real photos), else exported now with ``missrec export-clip``'s code."""
    from clip_features.onnx_encoder import ClipOnnxError, read_manifest

    out = root / "clip-onnx"
    why = "none yet"
    if out.exists():
        try:
            m = read_manifest(out)
            if m.model_name != model or not m.made_from(weights):
                why = f"it was made from {m.model_name} {m.pretrained}"
            elif samples is not None and m.parity.get("inputs") != "real":
                why = "it was checked on SYNTHETIC images; --clip-samples gives real ones"
            else:
                console.print(f"reusing the CLIP ONNX export {out} (parity on {m.parity.get('inputs')} inputs)")
                return out
        except ClipOnnxError as exc:
            why = str(exc)
    from model_export.clip import export_clip
    from model_export.parity import ExportError

    inputs = f"the photos under {samples}" if samples is not None else "SYNTHETIC images and texts"
    console.print(f"exporting {model} to ONNX at {out} ({why}); parity check on {inputs}")
    start = time.perf_counter()
    try:
        manifest = export_clip(model, weights, out, samples, overwrite=True)
    except (ExportError, FileNotFoundError, ValueError) as exc:
        raise fail(f"CLIP ONNX export: {exc} (or run with --clip torch)") from None
    p = manifest.parity
    console.print(
        f"exported in {time.perf_counter() - start:.1f} s; parity on {p['inputs']} inputs: image "
        f"{p['image_max_abs_diff']:.2g}, text {p['text_max_abs_diff']:.2g} (<= 1e-4)"
    )
    return out


def _configure_clip(root: Path, runtime: str, samples: Path | None) -> None:
    """Set the service's MISSREC_CLIP_* for ingestion on ``runtime``."""
    env = os.environ
    if runtime == "onnx" and env.get("MISSREC_CLIP_ONNX"):
        console.print(f"ingestion through the CLIP ONNX export MISSREC_CLIP_ONNX={env['MISSREC_CLIP_ONNX']}")
        return
    if env.get("MISSREC_CLIP_PRETRAINED") == "":
        console.print("ingestion disabled (MISSREC_CLIP_PRETRAINED is empty)")
        return
    if "MISSREC_CLIP_PRETRAINED" in env:
        model, weights = env.get("MISSREC_CLIP_MODEL", DEFAULT_CLIP_MODEL), env["MISSREC_CLIP_PRETRAINED"]
    else:
        model, weights = _demo_clip(root)
        console.print(
            f"[yellow]ingestion uses a RANDOM-INIT open_clip ({model}): demo only, embeddings carry no "
            "meaning. Set MISSREC_CLIP_MODEL=ViT-B-32 MISSREC_CLIP_PRETRAINED=openai (or a local "
            "checkpoint path) for real CLIP features.[/]"
        )
    env["MISSREC_CLIP_MODEL"], env["MISSREC_CLIP_PRETRAINED"] = model, weights  # with ONNX: checked at start-up
    if runtime == "onnx":
        env["MISSREC_CLIP_ONNX"] = str(_clip_onnx(root, model, weights, samples))
        console.print("ingestion through ONNX Runtime: the service process imports no torch (--clip torch: open_clip)")
    else:
        console.print("ingestion through open_clip (torch) in the service process (--clip torch)")


def quickstart(
    port: Annotated[int, typer.Option(help="Port.")] = 8000,
    host: Annotated[str, typer.Option(help="Bind address.")] = "127.0.0.1",
    epochs: Annotated[int, typer.Option(help="Training epochs when a bundle has to be built.")] = 8,
    no_serve: Annotated[bool, typer.Option("--no-serve", help="Build the bundle and CLIP export, then exit.")] = False,
    clip: Annotated[
        str,
        typer.Option(
            "--clip",
            help="Ingestion runtime: onnx (open_clip exported to ONNX once, cached; the service imports no torch) "
            "or torch (open_clip in the service process).",
        ),
    ] = "onnx",
    clip_samples: Annotated[
        Path | None,
        typer.Option(help="Real photos and .txt product texts for the export's parity check (else SYNTHETIC ones)."),
    ] = None,
) -> None:
    """The main job: build a bundle if none is configured (train on $MISSREC_DATA, else SYNTHETIC data) and the
    CLIP ONNX export, then serve on the port with an embedded Redis, and print example calls."""
    if clip not in CLIP_RUNTIMES:
        raise fail(f"--clip must be one of {', '.join(CLIP_RUNTIMES)}, not {clip!r}")
    if clip == "torch" and os.environ.get("MISSREC_CLIP_ONNX"):  # refused before any work
        raise fail(
            f"--clip torch asks for open_clip in the service, but MISSREC_CLIP_ONNX={os.environ['MISSREC_CLIP_ONNX']} "
            "configures the ONNX encoder: unset it, or use --clip onnx"
        )
    root = QUICKSTART_DIR.resolve()
    root.mkdir(parents=True, exist_ok=True)
    bundle = (
        Path(os.environ["MISSREC_BUNDLE"]) if os.environ.get("MISSREC_BUNDLE") else _quickstart_bundle(root, epochs)
    )
    os.environ["MISSREC_BUNDLE"] = str(bundle.resolve())
    os.environ.setdefault("MISSREC_DATA_DIR", str(root / "state"))
    _configure_clip(root, clip, clip_samples)
    if no_serve:
        console.print(f"bundle ready at {bundle}")
        return
    from serving_core.bundle import read_manifest

    manifest = read_manifest(bundle)
    ids = json.loads((bundle / "items/ids.json").read_text())
    a, b = ids[1], ids[2]
    base = f"http://{host}:{port}"
    ct = "-H 'content-type: application/json'"
    print(
        f"""
MISSRec service on {base}  (bundle {manifest.version}, {manifest.num_items - 1} items; docs: {base}/docs)
  curl -s {base}/readyz
  curl -s -X POST {base}/v1/users/u1/events {ct} -d '{{"item_ids": ["{a}", "{b}"]}}'
  curl -s -X POST {base}/v1/recommend {ct} -d '{{"user_id": "u1", "k": 5, "explain": true}}'
  curl -s -X POST {base}/v1/recommend {ct} -d '{{"history": ["{a}"], "k": 5}}'
  curl -s -X POST {base}/v1/items -F item_id=new-1 -F 'text=Cordless drill. Tools. Acme.' -F image=@photo.jpg
  curl -s {base}/metrics | grep missrec_stage
""",
        flush=True,
    )  # plain print: rich would wrap the commands
    level = logging.getLevelName(logging.getLogger().getEffectiveLevel())
    serve = ["serve", "--host", host, "--port", str(port)]
    argv = [sys.executable, "-m", "missrec_cli.main", "--log-level", level, *serve]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, argv)  # `missrec serve` in this PID: a fresh interpreter, without what training loaded


def register(app: typer.Typer) -> None:
    app.command()(quickstart)
