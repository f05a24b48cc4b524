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
import datetime as dt
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from image_smoke import IMAGE_TAG, cpu_lock, log, sh, smoke  # noqa: E402

SUITE = "bookworm"  # the Debian release of the Dockerfile's default BASE_IMAGE (python:3.11-slim-bookworm)
BASE_TAG = f"localhost/missrec-base:{SUITE}"
TINY_CLIP = "missrec-tiny-512"


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
            "import sys; from clip_features.torch_encoder import save_random_init_checkpoint as s; "
            f"s('{TINY_CLIP}', sys.argv[1], seed=0)"
        )
        sh(str(python), "-c", code, str(checkpoint), env=env)
    if not (clip / "clip.json").is_file():  # the image has no torch: ingestion runs the exported ONNX encoders
        sh(*missrec, "export-clip", "--model", TINY_CLIP, "--pretrained", str(checkpoint), "--out", str(clip),
           "--samples", str(abo), "--overwrite", locked=True, env=env)  # fmt: skip
    return bundle, clip, "real: MISSRec trained on ../shared/data/scientific, exported, Flat index"


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
