"""The suite's own model cache: converted presets never go into the user's cache.

``PARLEY_CACHE_DIR`` is pointed, for the whole run and every ``parley`` the tests start,
at ``PARLEY_TEST_CACHE_DIR`` if set, else ``.parley-cache/models`` inside this checkout
(git ignores it). Per checkout rather than per run: converting the presets takes 20-60 s,
which every run would pay again in a fresh directory.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def suite_cache_dir(env: Mapping[str, str]) -> Path:
    """Where the tests keep converted models, given the environment."""
    chosen = env.get("PARLEY_TEST_CACHE_DIR")
    return Path(chosen).expanduser() if chosen else REPO / ".parley-cache" / "models"


def pytest_configure(config: pytest.Config) -> None:
    """Point ``PARLEY_CACHE_DIR`` at the tests' cache before any test runs."""
    os.environ["PARLEY_CACHE_DIR"] = str(suite_cache_dir(os.environ))
