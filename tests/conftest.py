"""Shared fixtures: the real digit domains (skip where ../shared is absent), a clean FLWR_HOME."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIGITS = PROJECT_ROOT.parent / "shared" / "data" / "digits"


@pytest.fixture(scope="session")
def shared_digits() -> Path:
    """Path to ../shared/data/digits; skips the test with the reason where it is absent."""
    if not SHARED_DIGITS.is_dir():
        pytest.skip(f"real digit domains not found at {SHARED_DIGITS} (../shared is absent)")
    return SHARED_DIGITS


@pytest.fixture()
def flwr_home(tmp_path, monkeypatch) -> Path:
    """Point FLWR_HOME and HOME at a temporary folder so tests never touch the user's."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("FLWR_HOME", str(home / ".flwr"))
    return home


@pytest.fixture()
def app_dir(tmp_path) -> Path:
    """A copy of the Flower App for `flwr run` (it may rewrite pyproject.toml: never the repo's)."""
    target = tmp_path / "app"
    ignore = shutil.ignore_patterns(
        ".git", ".venv", "tests", "__pycache__", "*.egg-info", "results", "*.png", ".ecos-cache"
    )
    shutil.copytree(PROJECT_ROOT, target, ignore=ignore)
    return target
