"""`missrec quickstart` as a new user runs it, measured: the one-off build (bundle + CLIP ONNX export), then the
served process with the default ONNX CLIP path and with ``--clip torch``: time to ready, whether torch is mapped
into it, and its memory (/proc/PID/status) after an ingest of a real ABO photo and a few recommendations.

    flock /tmp/missrec-cpu.lock .venv/bin/python scripts/quickstart_memory.py --work /tmp/qs-memory \
        --abo ../shared/data/abo-samples --json runs/quickstart-memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from harness.abo import abo_products
from harness.launch import ROOT, SHARED, wait_ready
from harness.ports import free_port
from loadtest.memory import status_mib

CMD = [sys.executable, "-m", "missrec_cli.main", "quickstart"]


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("MISSREC_")} | {"PYTHONPATH": str(ROOT)}


def served(work: Path, clip: str, product: dict, epochs: int, requests: int) -> dict:
    port, log = free_port(), work / f"serve-{clip}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([*CMD, "--epochs", str(epochs), "--port", str(port), "--clip", clip], cwd=work,
                                env=_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        ready_s = wait_ready(f"http://127.0.0.1:{port}", None, 600)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as c:
            photo = product["images"][0].read_bytes()
            r = c.post("/v1/items", data={"item_id": f"m-{clip}", "text": product["text"]},
                       files={"image": ("p.jpg", photo, "image/jpeg")})  # fmt: skip
            assert r.status_code == 201, r.text
            for _ in range(requests):
                r = c.post("/v1/recommend", json={"history": [f"m-{clip}"], "k": 10})
                assert r.status_code == 200, r.text
        maps = Path(f"/proc/{proc.pid}/maps").read_text()
        return {
            "clip": clip,
            "pid_cmdline": Path(f"/proc/{proc.pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip(),
            "ready_s": round(ready_s, 1),
            "torch_mapped": "libtorch_cpu" in maps,
            "memory_mib": status_mib(proc.pid),
            "requests": requests,
        }
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/qs-memory"), help="Emptied, then the quick start's cwd.")
    p.add_argument("--abo", type=Path, default=SHARED / "data" / "abo-samples")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--requests", type=int, default=20)
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    shutil.rmtree(a.work, ignore_errors=True)
    a.work.mkdir(parents=True)
    start = time.perf_counter()
    build = subprocess.run([*CMD, "--epochs", str(a.epochs), "--no-serve"], cwd=a.work, env=_env(),
                           capture_output=True, text=True, check=True)  # fmt: skip
    report = {"build_s": round(time.perf_counter() - start, 1), "build_log": build.stdout.splitlines()}
    product = abo_products(a.abo)[0]
    report["served"] = [served(a.work, clip, product, a.epochs, a.requests) for clip in ("onnx", "torch")]
    print(json.dumps(report, indent=2))
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
