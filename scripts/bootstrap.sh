#!/usr/bin/env bash
# Create or reuse the project's virtual environment and install what it needs.
# Re-installs only when pyproject.toml changed since the last install (stamp file inside the venv).
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
