"""The image runs the same service as outside it: every MISSREC_* variable the Dockerfile sets is a Settings field
with a valid value, its CMD parses as `missrec serve` options, and the health check and volume fit the app."""

from __future__ import annotations

import hashlib
import json
import re
import shlex

import pytest
import typer.main

from missrec_cli.main import app as cli_app
from service.settings import Settings
from tests.paths import ROOT


def _instructions(text: str) -> list[tuple[str, str, str]]:
    """(stage, INSTRUCTION, arguments) of a Dockerfile, line continuations joined, comments dropped."""
    out, stage, buf = [], "", ""
    for raw in text.splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        line, buf = buf + line, ""
        word, _, rest = line.partition(" ")
        if word.upper() == "FROM":
            stage = rest.split(" AS ")[-1].strip() if " AS " in rest else rest.strip()
        out.append((stage, word.upper(), rest.strip()))
    return out


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str, str]]:
    return _instructions((ROOT / "Dockerfile").read_text(encoding="utf-8"))


def _runtime_stages(instructions) -> list[str]:
    return sorted({s for s, ins, _ in instructions if ins == "CMD"})


def _env(instructions, stage: str) -> dict[str, str]:
    env: dict[str, str] = {}
    for s, ins, rest in instructions:
        if s == stage and ins == "ENV":
            env |= dict(part.split("=", 1) for part in shlex.split(rest))
    return env


def test_parser_sees_cpu_and_gpu_runtime_stages(dockerfile):
    assert _runtime_stages(dockerfile) == ["cpu", "gpu"]


def test_every_missrec_env_is_a_valid_setting(dockerfile):
    for stage in _runtime_stages(dockerfile):
        env = {k: v for k, v in _env(dockerfile, stage).items() if k.startswith("MISSREC_")}
        assert env, f"stage {stage} sets no MISSREC_ variable"
        fields = {k.removeprefix("MISSREC_").lower(): v for k, v in env.items()}
        unknown = sorted(set(fields) - set(Settings.model_fields))
        assert not unknown, f"stage {stage}: {unknown} are not service settings"
        settings = Settings(**fields)  # values must validate as well
        assert str(settings.bundle) == env["MISSREC_BUNDLE"]


def test_cmd_is_valid_missrec_serve_invocation(dockerfile):
    serve = typer.main.get_command(cli_app).commands["serve"]
    for stage in _runtime_stages(dockerfile):
        entry = json.loads(next(r for s, i, r in dockerfile if s == stage and i == "ENTRYPOINT"))
        cmd = json.loads(next(r for s, i, r in dockerfile if s == stage and i == "CMD"))
        assert entry == ["missrec"] and cmd[0] == "serve"
        params = serve.make_context("serve", cmd[1:]).params  # raises on unknown options or bad values
        expose = next(r for s, i, r in dockerfile if s == stage and i == "EXPOSE")
        assert str(params["port"]) == expose and params["host"] == "0.0.0.0"


def test_healthcheck_volume_and_user(dockerfile):
    from service.app import create_app

    paths = set(create_app(Settings()).openapi()["paths"])
    for stage in _runtime_stages(dockerfile):
        health = next(r for s, i, r in dockerfile if s == stage and i == "HEALTHCHECK")
        url = re.search(r"http://127\.0\.0\.1:(\d+)(/\w+)", health)
        cmd = json.loads(next(r for s, i, r in dockerfile if s == stage and i == "CMD"))
        assert url and url.group(2) in paths and url.group(1) == cmd[cmd.index("--port") + 1]
        volume = json.loads(next(r for s, i, r in dockerfile if s == stage and i == "VOLUME"))
        # the bundle, and (torch-free cpu image) the ONNX CLIP encoders MISSREC_CLIP_ONNX points at when mounted
        assert volume[0] == _env(dockerfile, stage)["MISSREC_BUNDLE"] and set(volume[1:]) <= {"/clip"}
        user = next(r for s, i, r in dockerfile if s == stage and i == "USER")
        assert user.split(":")[0] not in ("0", "root")


def test_readme_settings_exist():
    """The README's settings table names real settings (the same variables inside and outside the image)."""
    names = set(re.findall(r"`MISSREC_([A-Z_]+)`", (ROOT / "README.md").read_text(encoding="utf-8")))
    names -= {"DATA"}  # MISSREC_DATA is read by `missrec quickstart`, not a service setting
    assert names and not sorted(n.lower() for n in names if n.lower() not in Settings.model_fields)


def test_the_build_stage_copies_every_package(dockerfile):
    """The wheel is built from the copied folders: a package left out would be missing from the image."""
    import tomllib

    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py") if any(p.parent.match(pat) for pat in include)}
    copied = {args.split()[0] for _, word, args in dockerfile if word == "COPY" and "--from" not in args}
    assert packages and packages <= copied, f"not copied into the build stage: {sorted(packages - copied)}"


def test_the_dockerfile_was_built_and_smoke_tested():
    """Every change to the Dockerfile needs a real build: scripts/build_image.py builds the cpu target (buildah, a
    debootstrapped base), runs the service from the built image (readyz, recommend, ingest) and records the
    Dockerfile's sha256 in docs/image-build.json. Too slow for every CI run, so CI checks the record instead."""
    record = json.loads((ROOT / "docs" / "image-build.json").read_text(encoding="utf-8"))
    actual = hashlib.sha256((ROOT / "Dockerfile").read_bytes()).hexdigest()
    assert record["dockerfile_sha256"] == actual, (
        "the Dockerfile changed since its last real build: run `sudo python3 scripts/build_image.py` "
        "(buildah + debootstrap, about 5 minutes) and commit the docs/image-build.json it writes with the change"
    )
    smoke = record["smoke"]
    assert smoke["readyz"]["status"] == 200, smoke["readyz"]
    assert smoke["recommend"]["status"] == 200 and smoke["recommend"]["body"]["items"], smoke["recommend"]
    assert smoke["ingest"]["status"] == 201, smoke["ingest"]
