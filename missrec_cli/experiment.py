"""``missrec experiment``: start, show or end an A/B experiment between bundles on a running service
(service.experiments; the HTTP routes under /v1/admin/experiments)."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.markup import escape

from missrec_cli.common import console, fail


def experiment(
    name: Annotated[str, typer.Argument(help="Experiment name (letters, digits, _ and -).")],
    url: Annotated[str, typer.Option("--url", help="Base URL of a replica.")],
    variant: Annotated[
        list[str] | None,
        typer.Option("--variant", help="NAME=BUNDLE:SHARE, repeated (starts the experiment), e.g. a=bundles/a:0.5."),
    ] = None,
    end: Annotated[bool, typer.Option("--end", help="End the experiment.")] = False,
    promote: Annotated[
        bool, typer.Option("--promote", help="With --end: swap to the variant with the best hit rate.")
    ] = False,
    api_key: Annotated[
        str | None, typer.Option("--api-key", envvar="MISSREC_API_KEY", help="X-API-Key (default: MISSREC_API_KEY).")
    ] = None,
) -> None:
    """Start an experiment (--variant ... twice or more), end it (--end [--promote]), or show its per-variant
    impressions, hits, hit rate@k and the 95 % interval of each variant's difference from the first."""
    import httpx

    headers = {"X-API-Key": api_key} if api_key else {}
    base = f"{url.rstrip('/')}/v1/admin/experiments/{name}"
    try:
        if variant:
            variants = []
            for spec in variant:
                vname, _, rest = spec.partition("=")
                bundle, _, share = rest.rpartition(":")
                try:
                    variants.append({"name": vname, "bundle": bundle, "share": float(share)})
                except ValueError:
                    raise fail(f"--variant {spec!r}: expected NAME=BUNDLE:SHARE") from None
            r = httpx.put(base, json={"variants": variants}, headers=headers, timeout=60.0)
            expected = 201
        elif end:
            r = httpx.post(f"{base}/end", json={"promote": promote}, headers=headers, timeout=300.0)
            expected = 200
        else:
            r = httpx.get(base, headers=headers, timeout=30.0)
            expected = 200
    except httpx.HTTPError as exc:
        raise fail(f"{url}: {exc}") from None
    if r.status_code != expected:
        try:
            err = r.json()["error"]
            raise fail(f"{r.status_code} {err['code']}: {err['message']}")
        except (ValueError, KeyError, TypeError):
            raise fail(f"{r.status_code} {r.text[:200]}") from None
    body = r.json()
    if "variants" in body and body["variants"] and "impressions" in body["variants"][0]:
        console.print(f"experiment {escape(name)}: {body['state']}")
        for v in body["variants"]:
            rate = "–" if v["hit_rate"] is None else f"{v['hit_rate']:.4f}"
            line = f"  {escape(v['name'])}: {v['impressions']} impressions, {v['hits']} hits, hit rate {rate}"
            diff = next((d for k, d in v.items() if k.startswith("difference_vs_") and d), None)
            if diff:
                line += f", difference {diff['difference']:+.4f} [{diff['low']:+.4f}, {diff['high']:+.4f}]"
            console.print(line)
        if "promoted" in body:
            console.print(f"promoted {escape(body['promoted']['variant'])}")
    else:
        console.print(escape(json.dumps(body)))


def register(app: typer.Typer) -> None:
    app.command()(experiment)
