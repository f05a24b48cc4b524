"""Shared fixtures: paths to the real shared datasets (a failure, not a skip, in CI when missing)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MISSREC_SHARED", ROOT.parent / "shared"))


def _shared_path(*parts: str) -> Path:
    path = SHARED.joinpath(*parts)
    if not path.exists():
        msg = f"shared dataset {path} is missing (set MISSREC_SHARED to the shared/ folder)"
        if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
            pytest.fail(msg)
        pytest.skip(msg)
    return path


@pytest.fixture(scope="session")
def scientific_dir() -> Path:
    """../shared/data/scientific: real Amazon Scientific data with real CLIP features."""
    return _shared_path("data", "scientific")


@pytest.fixture(scope="session")
def abo_dir() -> Path:
    """../shared/data/abo-samples: real product photos and metadata."""
    return _shared_path("data", "abo-samples")
