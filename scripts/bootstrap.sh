#!/usr/bin/env bash
# Create or reuse the project's virtual environment and install what it needs.
# Re-installs only when pyproject.toml changed since the last install (stamp file inside the venv).
# Usage: scripts/bootstrap.sh [--browser]   (--browser: also a Chromium for the console's browser tests)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${MISSREC_VENV:-.venv}
PY=${PYTHON:-python3}
if ! "$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)'; then
    echo "bootstrap: Python >= 3.11 is required ($PY is $("$PY" --version 2>&1))" >&2
    exit 1
fi
if [ ! -x "$VENV/bin/python" ]; then
    echo "bootstrap: creating virtual environment in $VENV"
    "$PY" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
fi
stamp="$VENV/.missrec-installed"
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "bootstrap: installing the project and its dependencies (first run downloads torch, a few GB)"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e ".[all,dev]"
    echo "$want" > "$stamp"
fi
# The console's browser tests (tests/service/test_console.py) drive the system's Chromium (Playwright downloads no
# browser here). Only the test bootstrap (`--browser`, from `make test`) installs Debian's when none is on PATH and
# we may (root with apt-get), else says how; `make run` never installs a browser.
[ "${1:-}" = "--browser" ] || exit 0
if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && [ -z "${MISSREC_NO_APT:-}" ]; then
        echo "bootstrap: installing chromium for the console's browser tests (apt-get)"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
    else
        echo "bootstrap: no chromium on PATH: the console's browser tests will skip (and fail under CI);" \
             "install it (Debian: apt-get install chromium) or set MISSREC_CHROMIUM to a Chromium binary" >&2
    fi
fi
