"""Scale-out on one machine: one Redis, two stateless replicas of the service, locust against both.

    flock /tmp/missrec-cpu.lock .venv/bin/python scripts/scaleout_demo.py --bundle runs/scientific-bundle \\
        --data ../shared/data/scientific --abo ../shared/data/abo-samples [--rate 60] [--duration 20]

1. a redis-server on a TCP port (the binary the service embeds), AOF on, like a managed Redis;
2. replicas A and B: `missrec serve` on two ports with the same bundle, MISSREC_REDIS_URL and MISSREC_KEY_PREFIX;
3. the real users' histories written through A, read back through B (histories live in Redis, not in a replica);
4. two locust processes at once, one per replica (a load balancer would spread the same traffic), open loop;
5. items ingested on A must show up in B's recommendations (B follows the item stream), and the other way round;
6. a summary, then everything is stopped (also on errors or Ctrl-C).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import uuid
from pathlib import Path
from urllib.parse import quote

import httpx

from harness.launch import Child, start, wait_ready
from harness.ports import free_port
from loadtest import procs
from loadtest.bench import clip_checkpoint, seed_histories
from loadtest.ingest_latency import measure
from loadtest.stats import read_samples
from loadtest.traffic import DEFAULT_MIX, build_traffic, write_traffic

log = logging.getLogger("scaleout")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--data", type=Path, required=True, help="dataset of the real users that drive the traffic")
    p.add_argument("--abo", type=Path, required=True, help="ABO product photos for ingests")
    p.add_argument("--out", type=Path, default=Path("runs/scaleout"))
    p.add_argument("--rate", type=float, default=60.0, help="req/s sent to EACH replica")
    p.add_argument("--duration", type=float, default=20.0)
    p.add_argument("--probes", type=int, default=20, help="ingests on A checked on B (and B -> A)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    out = args.out.resolve()
    tag = f"so{uuid.uuid4().hex[:8]}"
    bundle_ids = json.loads((args.bundle / "items/ids.json").read_text(encoding="utf-8"))
    traffic = build_traffic(args.data, bundle_ids, args.abo)
    traffic_path = write_traffic(out / "traffic.json", traffic)
    from service.embedded_redis import EmbeddedRedis

    children: list[Child] = []
    redis_server = EmbeddedRedis(out / "redis", port=free_port(), fsync="everysec")
    try:
        env = {
            "MISSREC_REDIS_URL": redis_server.start(),
            "MISSREC_KEY_PREFIX": tag,
            "MISSREC_CLIP_MODEL": "missrec-tiny-512",
            "MISSREC_CLIP_PRETRAINED": clip_checkpoint("missrec-tiny-512", out),
            "MISSREC_DATA_DIR": str(out / "state"),
        }
        ports = [free_port(), free_port()]
        urls = [f"http://127.0.0.1:{port}" for port in ports]
        for name, port in zip("AB", ports, strict=True):
            children.append(
                procs.serve_service(args.bundle.resolve(), port, out / "logs", env, None, f"replica-{name}")
            )
        for url, child in zip(urls, children, strict=True):
            log.info("%s ready in %.1f s", url, wait_ready(url, child))

        # shared state: histories written through A are read through B
        asyncio.run(seed_histories(urls[0], traffic["users"]))
        u = traffic["users"][0]
        seen_b = httpx.get(f"{urls[1]}/v1/users/{quote(u['id'], safe='')}/history").json()["item_ids"]
        histories_shared = seen_b == u["history"]
        log.info("history of %s written via A, read via B: %s", u["id"], "same" if histories_shared else "DIFFERENT")

        # load on both replicas at once
        pids = {"replica-A": children[0].pid, "replica-B": children[1].pid, "redis": redis_server.process.pid}
        results = {}
        with procs.CpuMeter(pids) as meter:
            started = []
            for name, url in zip("AB", urls, strict=True):
                cmd = procs.locust_args(
                    url, traffic_path, out / f"locust-{name}", rate=args.rate, users=4, duration=args.duration + 3,
                    mix=DEFAULT_MIX, tag=f"{tag}-{name}", k=10,
                )  # fmt: skip
                started.append(start(f"locust-{name}", cmd, out / "logs"))
            for child in started:
                child.proc.wait(args.duration + 120)
            for name in "AB":
                stats = read_samples(out / f"locust-{name}.csv", 3.0)
                cpu = meter.usage(f"replica-{name}", stats.t_start, stats.t_stop)
                results[name] = stats.row() | {"replica_cpu": round(cpu or 0.0, 2)}
        for name, row in results.items():
            log.info("replica %s: %s", name, row)

        # an item ingested on one replica is recommended by the other
        a_to_b = measure(urls[0], [urls[1]], traffic["products"], n=args.probes, tag=f"{tag}-a2b")
        b_to_a = measure(urls[1], [urls[0]], traffic["products"], n=args.probes, tag=f"{tag}-b2a")
        summary = {
            "replicas": urls,
            "redis": redis_server.url,
            "key_prefix": tag,
            "histories_shared": histories_shared,
            "load": results,
            "total_achieved_rps": round(sum(r["achieved_rps"] for r in results.values()), 1),
            "ingest_on_A_visible_on_B": a_to_b["other1"],
            "ingest_on_B_visible_on_A": b_to_a["other1"],
            "ingest_visible_same_replica": a_to_b["same"],
        }
        print(json.dumps(summary, indent=2))
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        ok = (
            histories_shared
            and all(r["errors"] == 0 for r in results.values())
            and a_to_b["other1"].get("count") == args.probes
            and b_to_a["other1"].get("count") == args.probes
        )
        print("SCALE-OUT DEMO", "PASSED" if ok else "FAILED")
        return 0 if ok else 1
    finally:
        for child in children:
            child.stop()
        redis_server.stop()


if __name__ == "__main__":
    sys.exit(main())
