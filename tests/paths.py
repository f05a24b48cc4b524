"""Where the tests find the repository and their own data files, wherever a test module sits under tests/."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEST_DATA = ROOT / "tests" / "data"
