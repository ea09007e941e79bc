"""Fixtures shared across test modules."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An ``ALIGNFAKE_CACHE`` root holding the embedded tiny model, built once per test session.

    With ``ALIGNFAKE_CACHE`` set in the environment (CI can keep it between runs) that cache is used, and the
    model is only built when its recipe or corpus changed; otherwise a fresh temporary root."""
    from alignfake.tinymodel import ensure_tiny_model

    env = os.environ.get("ALIGNFAKE_CACHE")
    root = Path(env).expanduser() if env else tmp_path_factory.mktemp("alignfake-cache")
    ensure_tiny_model(root / "models")
    return root


@pytest.fixture(scope="session")
def tiny_model(tiny_model_cache: Path) -> Path:
    """Directory of the embedded tiny model (a normal Hugging Face model directory)."""
    from alignfake.tinymodel import ensure_tiny_model

    return ensure_tiny_model(tiny_model_cache / "models")
