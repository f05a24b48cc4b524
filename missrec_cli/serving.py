"""Serving commands of the ``missrec`` CLI: export, export-clip, build-index, serve, swap, shadow (quickstart: its own
module)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from missrec_cli.common import console, fail

if TYPE_CHECKING:
    import httpx

log = logging.getLogger(__name__)


def export(
    checkpoint: Annotated[Path, typer.Option("--checkpoint", help="checkpoint.pt: MISSRec, MSM4SR or MMSRec.")],
    data: Annotated[Path, typer.Option("--data", help="The dataset the checkpoint was trained on.")],
    out: Annotated[Path, typer.Option("--out", help="Bundle directory to create.")],
    overwrite: Annotated[bool, typer.Option(help="Replace an existing bundle.")] = False,
) -> None:
    """Export towers (ONNX, parity-checked), item table and manifest into a serving bundle."""
    from missrec.data.dataset import DatasetError
    from missrec.models.checkpoint import CheckpointError
    from model_export.bundle import export_bundle
    from model_export.parity import ExportError
    from serving_core.bundle import BundleError

    try:
        manifest = export_bundle(checkpoint, data, out, overwrite=overwrite)
    except (ExportError, BundleError, CheckpointError, DatasetError, FileExistsError) as exc:
        raise fail(str(exc)) from None
    parity = manifest.export.get("parity", {})
    scorer = manifest.scorer
    fusion = f", K={manifest.num_interests}, alpha={scorer.alpha:.4f}" if scorer.kind == "missrec_fusion" else ""
    console.print(
        f"exported {manifest.model_kind}: {manifest.num_items - 1} items, scorer {scorer.kind}{fusion}; "
        f"parity {parity}; bundle {manifest.version} at {out}"
    )


def export_clip(
    model: Annotated[str, typer.Option("--model", help="open_clip architecture, e.g. ViT-B-32.")],
    pretrained: Annotated[str, typer.Option("--pretrained", help="open_clip tag or local checkpoint path.")],
    out: Annotated[Path, typer.Option("--out", help="CLIP ONNX directory to create (MISSREC_CLIP_ONNX).")],
    samples: Annotated[
        Path | None,
        typer.Option(
            "--samples",
            help="Real photos and product texts (.txt lines) for the parity check; without it the check runs on "
            "SYNTHETIC images and texts generated for it.",
        ),
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing directory.")] = False,
) -> None:
    """Export open_clip's image and text encoders to ONNX (parity-checked against open_clip, <= 1e-4, on --samples
    or SYNTHETIC inputs)."""
    from model_export.clip import export_clip as run_export
    from model_export.parity import ExportError

    try:
        manifest = run_export(model, pretrained, out, samples, overwrite=overwrite)
    except (ExportError, FileExistsError, FileNotFoundError, ValueError) as exc:
        raise fail(str(exc)) from None
    console.print(f"exported {manifest.model_name} CLIP encoders ({manifest.dim}-d) to {out}; parity {manifest.parity}")


def build_index(
    bundle: Annotated[Path, typer.Option("--bundle", help="Bundle directory from `missrec export`.")],
    factory: Annotated[str, typer.Option(help="FAISS index_factory string; Flat = exact.")] = "Flat",
    device: Annotated[str, typer.Option(help="auto, cpu or gpu.")] = "auto",
    float16: Annotated[
        bool, typer.Option(help="Also write float16 copies of the item vectors for the compact exact re-scoring.")
    ] = True,
) -> None:
    """Build the FAISS index over the bundle's static item vectors (with a recall report vs exact)."""
    import dataclasses

    from index_builder.build import build_index as run_build
    from serving_core.bundle import BundleError

    if device not in ("auto", "cpu", "gpu"):
        raise fail("--device must be auto, cpu or gpu")
    try:
        info = run_build(bundle, factory=factory, device=device, float16=float16)
    except (BundleError, RuntimeError, ValueError) as exc:
        raise fail(str(exc)) from None
    summary = dataclasses.asdict(info)
    report = summary["details"].pop("recall_report", None)
    console.print_json(data=summary)
    if report:
        console.print_json(data=report)


def serve(
    bundle: Annotated[Path | None, typer.Option("--bundle", help="Bundle directory (else MISSREC_BUNDLE).")] = None,
    host: Annotated[str, typer.Option(help="Bind address.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 8000,
    workers: Annotated[int, typer.Option(help="uvicorn worker processes.")] = 1,
) -> None:
    """Run the recommendation service (settings from MISSREC_* environment variables)."""
    import uvicorn

    if bundle is not None:
        os.environ["MISSREC_BUNDLE"] = str(bundle.resolve())
    if not os.environ.get("MISSREC_BUNDLE"):
        raise fail("no bundle: pass --bundle or set MISSREC_BUNDLE (or run `missrec quickstart`)")
    from pydantic import ValidationError

    from service.settings import Settings

    try:
        settings = Settings()  # refused here, in one line, rather than in uvicorn's import of the app
    except ValidationError as exc:
        problems = "; ".join(f"MISSREC_{'_'.join(map(str, e['loc'])).upper()}: {e['msg']}" for e in exc.errors())
        raise fail(f"refusing to start: {problems}") from None
    uvicorn.run(
        "service.main:app",
        host=host,
        port=port,
        workers=workers,
        log_level="info",
        access_log=settings.access_log,  # also applied by the app itself (service/app.py)
        timeout_graceful_shutdown=10,
    )


def swap(
    url: Annotated[str, typer.Option("--url", help="Base URL of a replica (or the load balancer).")],
    bundle: Annotated[str, typer.Option("--bundle", help="Bundle directory, inside MISSREC_BUNDLE_ROOT there.")],
    api_key: Annotated[
        str | None, typer.Option("--api-key", envvar="MISSREC_API_KEY", help="X-API-Key (default: MISSREC_API_KEY).")
    ] = None,
    wait: Annotated[bool, typer.Option(help="Wait until the replica serves it (or refused it).")] = True,
    timeout: Annotated[float, typer.Option(help="Seconds to wait.")] = 300.0,
    require_better: Annotated[
        bool,
        typer.Option(
            "--require-better",
            help="First compare --bundle with --against on --data (missrec evaluate-bundle, here, on the same paths) "
            "and announce only if it is ahead (paired NDCG@10 interval above zero).",
        ),
    ] = False,
    against: Annotated[Path | None, typer.Option(help="The bundle serving now (with --require-better).")] = None,
    data: Annotated[Path | None, typer.Option(help="Dataset with held-out events (with --require-better).")] = None,
) -> None:
    """Point every replica at another bundle, with no downtime (a rollback: the previous bundle). Exit 0 once the
    replica at --url serves it, 1 if it refused it, a later swap superseded it or --require-better found it not
    ahead, 2 if the call was refused."""
    import time

    import httpx

    if require_better:
        if against is None or data is None:
            raise fail("--require-better needs --against CURRENT and --data DIR")
        from lifecycle.evaluate import evaluate_bundles

        try:
            cmp = evaluate_bundles(Path(bundle), against, data)
        except (ValueError, OSError) as exc:  # BundleError and DatasetError are ValueErrors
            raise fail(str(exc)) from None
        iv = cmp.interval
        console.print(
            f"NDCG@10 {cmp.new.metrics['ndcg@10']:.4f} vs {cmp.current.metrics['ndcg@10']:.4f}: "
            f"{iv.mean_diff:+.4f} [{iv.low:+.4f}, {iv.high:+.4f}] over {iv.users} users: {cmp.verdict}"
        )
        if cmp.verdict != "ahead":
            console.print("[bold red]not announced:[/] the new bundle is not ahead of the current one")
            raise typer.Exit(code=1)
    headers = {"X-API-Key": api_key} if api_key else {}
    base = url.rstrip("/")
    try:
        r = httpx.post(f"{base}/v1/admin/bundle", json={"bundle": bundle}, headers=headers, timeout=timeout)
    except httpx.HTTPError as exc:
        raise fail(f"{base}: {exc}") from None
    if r.status_code != 202:
        raise fail(f"{r.status_code} {_error_text(r)}")
    announced = r.json()
    console.print(f"announced {announced['version']} ({announced['bundle']}, generation {announced['generation']})")
    if not wait:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            s = httpx.get(f"{base}/v1/admin/bundle", headers=headers, timeout=10.0)
        except httpx.HTTPError:
            s = None  # a replica restarting behind the URL: ask again
        if s is not None and s.status_code == 200:
            status = s.json()
            latest = status["announced"] or {}
            if latest.get("generation", 0) > announced["generation"]:
                console.print(f"[yellow]superseded by generation {latest['generation']} ({latest['version']})[/]")
                raise typer.Exit(code=1)
            if status["state"] == "failed" and latest.get("generation") == announced["generation"]:
                console.print(f"[bold red]refused:[/] {status['error']}; still serving {status['active']['version']}")
                raise typer.Exit(code=1)
            active = status["active"]
            if status["state"] == "active" and active["generation"] == announced["generation"]:
                took = status["last_swap_seconds"]
                console.print(f"serving {active['version']}" + (f" (swapped in {took:.2f} s)" if took else ""))
                return
        time.sleep(0.2)
    console.print(f"[bold red]timeout:[/] not serving {announced['version']} after {timeout:g} s")
    raise typer.Exit(code=1)


def shadow(
    url: Annotated[str, typer.Option("--url", help="Base URL of the replica to shadow on.")],
    bundle: Annotated[
        str | None, typer.Option("--bundle", help="Candidate bundle directory, inside MISSREC_BUNDLE_ROOT there.")
    ] = None,
    fraction: Annotated[float, typer.Option(help="Share of recommend requests scored by the candidate too.")] = 0.1,
    stop: Annotated[bool, typer.Option("--stop", help="Stop shadowing.")] = False,
    api_key: Annotated[
        str | None, typer.Option("--api-key", envvar="MISSREC_API_KEY", help="X-API-Key (default: MISSREC_API_KEY).")
    ] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the candidate to load.")] = 300.0,
) -> None:
    """Score a candidate bundle beside the serving one on a fraction of one replica's recommendations (overlap@k
    and latency per model in /metrics and GET /v1/admin/shadow); clients only see the serving bundle."""
    import time

    import httpx

    headers = {"X-API-Key": api_key} if api_key else {}
    base = url.rstrip("/")
    if stop == (bundle is not None):
        raise fail("give either --bundle (start) or --stop")
    try:
        if stop:
            r = httpx.delete(f"{base}/v1/admin/shadow", headers=headers, timeout=30.0)
            if r.status_code != 204:
                raise fail(f"{r.status_code} {_error_text(r)}")
            console.print("shadow off")
            return
        r = httpx.put(f"{base}/v1/admin/shadow", json={"bundle": bundle, "fraction": fraction}, headers=headers,
                      timeout=timeout)  # fmt: skip
        if r.status_code != 202:
            raise fail(f"{r.status_code} {_error_text(r)}")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = httpx.get(f"{base}/v1/admin/shadow", headers=headers, timeout=10.0).json()
            if status["state"] == "active":
                console.print(f"shadow active: {status['version']} on {status['fraction']:.0%} of recommendations")
                return
            if status["state"] != "loading":
                console.print(f"[bold red]shadow {status['state']}:[/] {status['error']}")
                raise typer.Exit(code=1)
            time.sleep(0.2)
    except httpx.HTTPError as exc:
        raise fail(f"{base}: {exc}") from None
    console.print(f"[bold red]timeout:[/] the candidate did not load in {timeout:g} s")
    raise typer.Exit(code=1)


def _error_text(r: httpx.Response) -> str:
    try:
        err = r.json()["error"]
        return f"{err['code']}: {err['message']}"
    except (ValueError, KeyError, TypeError):
        return r.text


def register(app: typer.Typer) -> None:
    app.command(name="export")(export)
    app.command(name="export-clip")(export_clip)
    app.command(name="build-index")(build_index)
    app.command()(serve)
    app.command()(swap)
    app.command()(shadow)
