"""Lifecycle commands of the ``missrec`` CLI: snapshot (a dataset from a deployment) and evaluate-bundle."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from missrec_cli.common import console, fail


def snapshot(
    redis_url: Annotated[str, typer.Option("--redis", help="Redis URL of the deployment (read only).")],
    bundle: Annotated[Path, typer.Option("--bundle", help="The bundle the deployment serves now.")],
    data: Annotated[Path, typer.Option("--data", help="The dataset that bundle was built from (its items' features).")],
    out: Annotated[Path, typer.Option("--out", help="Dataset directory to write (atomic format + snapshot.json).")],
    cluster: Annotated[bool, typer.Option("--cluster", help="Connect with the Redis Cluster client.")] = False,
    prefix: Annotated[str, typer.Option(help="The service's MISSREC_KEY_PREFIX.")] = "missrec",
    merge: Annotated[
        Path | None, typer.Option(help="An older dataset whose histories come first (events that aged out of Redis).")
    ] = None,
    name: Annotated[str, typer.Option(help="Dataset name (<Name>.train.inter ...).")] = "Snapshot",
    overwrite: Annotated[bool, typer.Option(help="Replace an existing OUT.")] = False,
    max_user_events: Annotated[
        int, typer.Option(min=3, help="Most events read per user (the latest; the service keeps far fewer).")
    ] = 10_000,
) -> None:
    """Write every user history and every live item of a deployment as a training dataset (chronological
    leave-one-out), with a manifest of where it came from and what was left out."""
    from lifecycle.snapshot import SnapshotError, take_snapshot
    from missrec.data.dataset import DatasetError
    from serving_core.bundle import BundleError

    try:
        snap = take_snapshot(
            redis_url, bundle, data, out, prefix=prefix, cluster=cluster, merge=merge, name=name,
            overwrite=overwrite, progress=True, max_user_events=max_user_events,
        )  # fmt: skip
    except (SnapshotError, BundleError, DatasetError, OSError) as exc:
        raise fail(str(exc)) from None
    except Exception as exc:  # redis-py's connection and response errors
        if type(exc).__module__.startswith("redis"):
            raise fail(f"Redis at {redis_url}: {exc}") from None
        raise
    console.print_json(json.dumps(snap.manifest["counts"]))
    if skipped := snap.manifest["counts"]["bad_records"]:
        first = escape(snap.manifest["bad_records"][0])
        console.print(f"skipped {skipped} malformed Redis records (first: {first}; up to 5 listed in snapshot.json)")
    console.print(
        f"wrote {snap.dataset.name} ({len(snap.dataset.item_ids)} items, {len(snap.dataset.user_ids)} users) to {out}"
    )


def evaluate_bundle(
    bundle: Annotated[Path, typer.Option("--bundle", help="The candidate bundle.")],
    against: Annotated[Path, typer.Option("--against", help="The bundle serving now.")],
    data: Annotated[Path, typer.Option("--data", help="Dataset whose held-out rows both are scored on.")],
    split: Annotated[str, typer.Option(help="Rows to score: test (held-out last events) or valid.")] = "test",
    out: Annotated[Path | None, typer.Option(help="Write the comparison as JSON.")] = None,
    require_better: Annotated[
        bool, typer.Option("--require-better", help="Exit 1 unless NEW is ahead (interval above zero).")
    ] = False,
) -> None:
    """Compare two bundles through the serving path (ONNX towers + index, history excluded) on held-out events,
    with a paired bootstrap interval of the per-user NDCG@10 difference."""
    from lifecycle.evaluate import evaluate_bundles
    from missrec.data.dataset import DatasetError
    from serving_core.bundle import BundleError

    if split not in ("test", "valid"):
        raise fail(f"--split must be test or valid, got {split!r}")
    try:
        cmp = evaluate_bundles(bundle, against, data, split=split)
    except (BundleError, DatasetError, ValueError) as exc:
        raise fail(str(exc)) from None
    table = Table(title=f"{cmp.split} rows of {data} ({cmp.users} users), served with history excluded")
    metrics = list(cmp.new.metrics)
    for col in ("bundle", "version", *metrics, "embedded", "seconds"):
        table.add_column(col)
    for label, s in (("new", cmp.new), ("current", cmp.current)):
        table.add_row(label, s.version, *(f"{s.metrics[m]:.4f}" for m in metrics), str(s.ingested), f"{s.seconds}")
    console.print(table)
    iv = cmp.interval
    console.print(
        f"NDCG@10 new - current: {iv.mean_diff:+.4f}, {iv.level:.0%} paired bootstrap interval "
        f"[{iv.low:+.4f}, {iv.high:+.4f}] over {iv.users} users: [bold]{cmp.verdict}[/]"
    )
    if out is not None:
        out.write_text(json.dumps(cmp.to_dict(), indent=2) + "\n", encoding="utf-8")
    if require_better and cmp.verdict != "ahead":
        console.print("[bold red]refused:[/] the new bundle is not ahead of the current one")
        raise typer.Exit(code=1)


def register(app: typer.Typer) -> None:
    app.command()(snapshot)
    app.command(name="evaluate-bundle")(evaluate_bundle)
