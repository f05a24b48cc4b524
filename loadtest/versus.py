"""Before and after, side by side, in one sitting: the load bench against the service of another checkout and
against this one, interleaved, then one table of the figures the aims are about.

    flock /tmp/missrec-cpu.lock python -m loadtest.versus --baseline /path/to/main-checkout --rounds 2 \\
        --out runs/versus -- --bundle runs/scientific-bundle --data ../shared/data/scientific --mix history=1 \\
        --sat-users 16 --fractions 0.5 --no-bare --no-model-work --ingest-probes 0 --no-other-replica

Everything after ``--`` goes to ``python -m loadtest.bench`` unchanged (its own --out is set per run). The
baseline's service runs with ``PYTHONPATH=<baseline>`` (the bench, locust and the traffic stay this checkout's),
the rest with this checkout; ``--also NAME=SETTING`` adds a variant of this checkout with one more service setting
(e.g. ``nofreeze=MISSREC_GC_FREEZE=false``). This VM's speed drifts between minutes, so the variants alternate
round by round (before, after, ...; before, after, ...) rather than running back to back.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    bench = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(prog="python -m loadtest.versus", description=__doc__.split("\n")[0])
    p.add_argument("--baseline", type=Path, required=True, help="checkout whose service is 'before'")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--also", action="append", default=[], help="NAME=MISSREC_SETTING=VALUE: one more variant")
    return p.parse_args(own), bench


def figures(summary: dict[str, Any]) -> dict[str, str]:
    """The figures of one bench run that the aims are about, as table cells."""
    rows = {r["target_rps"]: r for r in summary["table"]}
    half = summary.get("half_max") or {}
    h = rows.get(f"{half.get('target', -2):g}", {})
    lone, mx, c1 = rows.get(f"{summary.get('lone', {}).get('rate', 5.0):g}", {}), rows.get("max", {}), rows.get("lone")

    def ms(r: dict, k: str) -> str:
        return f"{r[k]:.2f}" if r.get(k) is not None else "-"

    return {
        "max req/s": str(mx.get("svc_rps", "-")),
        "CPU ms/req at max": ms(mx, "svc_cpu_ms_req"),
        "lone closed p50 / p99": f"{ms(c1, 'svc_p50')} / {ms(c1, 'svc_p99')}" if c1 else "-",
        "open-loop lone p50 / p99": f"{ms(lone, 'svc_p50')} / {ms(lone, 'svc_p99')}",
        "half rate": f"{half.get('target', 0):g}",
        "half p50 / p99": f"{ms(h, 'svc_p50')} / {ms(h, 'svc_p99')}",
    }


def main(argv: list[str] | None = None) -> list[tuple[int, str, dict[str, str]]]:
    args, bench = parse_args(argv)
    variants: list[tuple[str, dict[str, str]]] = [
        ("before", {"PYTHONPATH": str(args.baseline.resolve())}),
        ("after", {}),
    ]
    for extra in args.also:
        name, setting = extra.split("=", 1)
        key, value = setting.split("=", 1)
        variants.append((name, {key: value}))
    results = []
    for rnd in range(1, args.rounds + 1):
        for name, env in variants:
            out = args.out / f"{name}-{rnd}"
            cmd = [sys.executable, "-m", "loadtest.bench", *bench, "--out", str(out)]
            cmd += [arg for k, v in env.items() for arg in ("--env", f"{k}={v}")]
            print(f"== round {rnd}, {name}: {' '.join(cmd[1:])}", flush=True)
            subprocess.run(cmd, check=True, env=os.environ | {"PYTHONPATH": os.getcwd()})
            summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
            results.append((rnd, name, figures(summary)))
    cols = list(results[0][2])
    print("| round | service | " + " | ".join(cols) + " |")
    print("|---|---|" + "---|" * len(cols))
    for rnd, name, f in results:
        print(f"| {rnd} | {name} | " + " | ".join(f[c] for c in cols) + " |")
    (args.out / "versus.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return results


if __name__ == "__main__":
    main()
