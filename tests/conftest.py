"""Shared test fixtures: where the real data lives, and the project root on sys.path."""

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def real_data_dir():
    """The real data directory (EMPRL_DATA). Skips when absent, unless EMPRL_REQUIRE_DATA=1 (CI),
    where it fails."""
    d = os.environ.get("EMPRL_DATA")
    if d and (Path(d) / "empatheticdialogues" / "train.csv").exists():
        return Path(d)
    if os.environ.get("EMPRL_REQUIRE_DATA") == "1":
        pytest.fail(f"EMPRL_REQUIRE_DATA=1 but the real data is not at EMPRL_DATA={d!r}")
    pytest.skip("real data not found: set EMPRL_DATA to a data directory")
